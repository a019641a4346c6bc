"""The one dtype map: our names ('bf16', 'fp16', 'fp32': what configs, checkpoints and command lines say)
and what each is in torch, in a Hugging Face config.json and in a GPT-NeoX config's `precision`."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> our name."""
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def hf_dtype_name(name: str) -> str:
    """config.json's `torch_dtype`: torch's own name ('bfloat16', 'float16', 'float32')."""
    return str(TORCH_DTYPES[name]).removeprefix("torch.")


def neox_precision(name: str) -> str:
    """GPT-NeoX's `precision` value: it spells out bfloat16 and keeps fp16/fp32 as they are."""
    return "bfloat16" if name == "bf16" else name
