"""Lazy import of megatron-core's dataset modules.

Importing `megatron.core` costs seconds (and pulls in its optimizer and FSDP code, whose warning about
Transformer Engine and Apex the package hides: see neox_fork/__init__.py), so callers import it only when
they need it.
"""


def indexed_dataset():
    from megatron.core.datasets import indexed_dataset as module

    return module
