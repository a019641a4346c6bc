"""Quiet, lazy imports of megatron-core's dataset modules.

Importing `megatron.core` pulls in its optimizer and FSDP code, which warn that Transformer Engine and
Apex are absent; those warnings say nothing about data, so they are hidden here. The import costs
seconds, so callers import it only when they need it.
"""

import warnings


def indexed_dataset():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets import indexed_dataset as module
    return module
