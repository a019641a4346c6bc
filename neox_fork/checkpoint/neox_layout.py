"""GPT-NeoX's layer indices and tensor names <-> this project's state-dict names.

GPT-NeoX builds the model as a sequence of layers and names tensors by their index in it:

    0        the embedding        word_embeddings.weight (+ position_embeddings.weight, learned positions)
    1        a function (no tensors)
    2..L+1   transformer layer i = idx - 2, with the layer's own names (attention.query_key_value.weight, ...)
    L+2      a function (no tensors)
    L+3      the final norm       norm.<param>
    L+4      the output layer     final_linear.weight; with tied embeddings, the embedding again; a reward
                                  model (train_impl rm) has rm_linear.weight [1, hidden] there instead

With `pipe_parallel_size >= 1` each index is its own file (names as above, no prefix); with 0 they are
`sequential.{idx}.<name>` keys of the mp_rank files' `module`. Our names differ only in the prefixes:
`layers.{i}.<name>`, `final_norm.<param>`, `output_layer.weight`. The mapping is by prefix, so any
parameter a model variant adds inside a layer (biases, RMSNorm `scale`, ...) maps without a table here.

One tensor differs in its row order under grouped-query attention: our fused QKV holds, per key/value head,
[its query heads, k, v] (so it splits over TP ranks by whole groups), while GPT-NeoX's holds, per TP rank,
[the rank's query heads; its keys; its values]. With one query head per key/value head both are GPT-NeoX's
per-head [q, k, v]. `to_neox`/`from_neox` reorder those rows when given the rank's `QKVGroups`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

EMBEDDING_PREFIXES = ("word_embeddings.", "position_embeddings.")
FINAL_NORM = ("final_norm.", "norm.")  # (ours, GPT-NeoX's)
OUTPUT = ("output_layer.", "final_linear.")
REWARD_HEAD = "rm_linear."  # train_impl rm: in the output layer's place, the same name in both
# tensors GPT-NeoX saves that are not parameters here (recomputed from the config)
_NOT_PARAMETERS = re.compile(r".*(rotary_emb\.inv_freq|_extra_state)$")


class QKVGroups(NamedTuple):
    """The fused QKV geometry of one TP rank: key/value heads on it, query heads per key/value head, head size."""

    kv_heads: int
    group: int
    head_dim: int


def split_qkv(t: torch.Tensor, g: QKVGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused rows [kv heads, (q x group, k, v), head_dim] -> q, k, v rows (weights or biases)."""
    rest = t.shape[1:]
    t = t.view(g.kv_heads, g.group + 2, g.head_dim, *rest)
    return (t[:, :g.group].reshape(-1, *rest), t[:, g.group].reshape(-1, *rest),
            t[:, g.group + 1].reshape(-1, *rest))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: QKVGroups) -> torch.Tensor:
    """q, k, v rows -> our fused rows (the inverse of split_qkv)."""
    rest = q.shape[1:]
    parts = (q.view(g.kv_heads, g.group, g.head_dim, *rest), k.view(g.kv_heads, 1, g.head_dim, *rest),
             v.view(g.kv_heads, 1, g.head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _is_qkv(key: str) -> bool:
    return re.fullmatch(r"attention\.query_key_value\.(weight|bias)", key) is not None


def _qkv_to_neox(key: str, t: torch.Tensor, g: QKVGroups | None) -> torch.Tensor:
    return torch.cat(split_qkv(t, g)) if g and g.group > 1 and _is_qkv(key) else t


def _qkv_from_neox(key: str, t: torch.Tensor, g: QKVGroups | None) -> torch.Tensor:
    if not (g and g.group > 1 and _is_qkv(key)):
        return t
    kv_rows = g.kv_heads * g.head_dim
    return fuse_qkv(*t.split([kv_rows * g.group, kv_rows, kv_rows]), g)


def num_layers_of(state: dict[str, torch.Tensor]) -> int:
    return 1 + max((int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)


def to_neox(state: dict[str, torch.Tensor], num_layers: int | None = None,
            qkv: QKVGroups | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """One TP rank's state -> {layer index: that layer's tensors under GPT-NeoX's names and row order}."""
    n = num_layers_of(state) if num_layers is None else num_layers
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name.startswith(EMBEDDING_PREFIXES):
            idx, key = 0, name
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            idx, key = int(m[1]) + 2, m[2]
            tensor = _qkv_to_neox(key, tensor, qkv)
        elif name.startswith(FINAL_NORM[0]):
            idx, key = n + 3, FINAL_NORM[1] + name.removeprefix(FINAL_NORM[0])
        elif name.startswith(OUTPUT[0]):
            idx, key = n + 4, OUTPUT[1] + name.removeprefix(OUTPUT[0])
        elif name.startswith(REWARD_HEAD):
            idx, key = n + 4, name
        else:
            raise ValueError(f"no GPT-NeoX layer for parameter {name!r}; add its prefix to checkpoint/neox_layout.py")
        layers.setdefault(idx, {})[key] = tensor
    if n + 4 not in layers and 0 in layers:  # tied embeddings: the embedding closes the model again
        layers[n + 4] = dict(layers[0])
    return dict(sorted(layers.items()))


def from_neox(layers: dict[int, dict[str, torch.Tensor]], qkv: QKVGroups | None = None) -> dict[str, torch.Tensor]:
    """One TP rank's {layer index: tensors under GPT-NeoX's names} -> our state (tied copies and buffers
    dropped)."""
    state: dict[str, torch.Tensor] = {}
    for idx, tensors in sorted(layers.items()):
        for key, tensor in tensors.items():
            if _NOT_PARAMETERS.fullmatch(key):
                continue
            if key.startswith(EMBEDDING_PREFIXES):
                if idx == 0:
                    state[key] = tensor
                continue  # the tied embedding's second appearance
            if key.startswith(OUTPUT[1]):
                state[OUTPUT[0] + key.removeprefix(OUTPUT[1])] = tensor
            elif key.startswith(REWARD_HEAD):
                state[key] = tensor
            elif key.startswith(FINAL_NORM[1]):
                state[FINAL_NORM[0] + key.removeprefix(FINAL_NORM[1])] = tensor
            else:
                state[f"layers.{idx - 2}.{key}"] = _qkv_from_neox(key, tensor, qkv)
    return state


def to_sequential(layers: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Layer dicts -> the `module` of a `pipe_parallel_size: 0` mp_rank file."""
    return {f"sequential.{idx}.{key}": t for idx, tensors in layers.items() for key, t in tensors.items()}


def from_sequential(module: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]] | None:
    """The layer dicts of a `sequential.{idx}.*` module; None when the module is in our own names."""
    if not any(k.startswith("sequential.") for k in module):
        return None
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in module.items():
        m = re.fullmatch(r"sequential\.(\d+)\.(.+)", name)
        if m:
            layers.setdefault(int(m[1]), {})[m[2]] = tensor
    return layers
