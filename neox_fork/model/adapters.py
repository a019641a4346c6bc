"""LoRA adapters around the model's tensor-parallel linears (issue 37).

Each adapted linear W (out x in) computes W x + s B A dropout(x), with A (r x in), B (out x r), s = alpha / r
(alpha / sqrt(r) with rsLoRA), B zero at the start and A drawn as peft draws it (uniform in +-1/sqrt(in), the
bound of kaiming_uniform_(a=sqrt(5))). The base weight is frozen; only A and B train.

Under tensor parallelism nothing is gathered that the base layer does not gather:
    column-parallel W (rows split):    A whole on every rank, B split by rows as W (same stride);
                                       h = A x is replicated, and its gradient (a partial sum per rank, each rank
                                       seeing its rows of B) is summed over the TP group: an all-reduce of r
                                       numbers per token in the backward only.
    row-parallel W (columns split):    A split by columns as W, B whole on every rank; h = A_r x_r is a partial
                                       sum, all-reduced in the forward (r numbers per token), then B h is whole.
Under sequence parallelism (activations [s, b, h], positions split over the TP ranks) the adapter does what its
base does: a column-parallel adapter gathers its input's positions, a row-parallel one reduce-scatters A x (and its
B, seeing this rank's positions, has its gradient summed over the TP group, as the norms').
A is drawn whole from one generator seeded by the config's seed, in layer order, and each rank keeps its slice,
so TP=1 and TP=N start from the same adapters; the dropout mask is drawn over the whole input and sliced the
same way, so they train alike with dropout on.

The adapter is a child module `lora` of the linear it adapts (parameters `...query_key_value.lora.A` and
`.lora.B`), applied by a forward hook, so the base weights keep their names and every checkpoint and export
of the base model reads them unchanged.

QLoRA (`adapter: qlora`): while training, the base linears are held in bitsandbytes' 4-bit NF4 (quantize_base,
after the base weights are loaded); the adapters train in the training dtype. Checkpoints, generation and the
export use the full-precision base the checkpoint names (as peft merges onto a dequantized base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core import tensor_parallel as tp
from torch import nn

ADAPTER_NAME = "lora"  # the child module's name: adapter tensors are the ones with ".lora." in their name


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query_key_value", "dense", "linear1", "linear2")
    rslora: bool = False
    seed: int = 1234

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    quantize_base: bool = False  # QLoRA: the frozen base linears in NF4 while training (quantize_base)

    @classmethod
    def from_config(cls, c) -> "LoraSpec | None":
        if not c.adapter:
            return None
        return cls(r=c.lora_r, alpha=float(c.lora_alpha), dropout=c.lora_dropout, targets=c.lora_targets,
                   rslora=c.use_rslora, seed=c.seed, quantize_base=c.adapter == "qlora")


def is_adapter(name: str) -> bool:
    """Whether a parameter/state-dict name is an adapter tensor."""
    return f".{ADAPTER_NAME}." in f".{name}"


class LoRA(nn.Module):
    """The adapter of one megatron-core parallel linear: s B A dropout(x) for this rank's part of the output."""

    def __init__(self, base: nn.Module, spec: LoraSpec, generator: torch.Generator):
        super().__init__()
        self.row = isinstance(base, tp.RowParallelLinear)
        self.scale, self.p = spec.scale, spec.dropout
        self.enabled = True
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        out_local, in_local = base.weight.shape
        self.in_full = in_local * self.tp_size if self.row else in_local
        bound = 1.0 / math.sqrt(self.in_full)  # peft's kaiming_uniform_(a=sqrt(5)) on A (r x in)
        a_full = torch.empty(spec.r, self.in_full).uniform_(-bound, bound, generator=generator)
        dtype = base.weight.dtype
        if self.row:  # A split by columns like W; B whole
            a = a_full[:, self.tp_rank * in_local:(self.tp_rank + 1) * in_local]
            self.A = nn.Parameter(a.to(dtype).clone())
            self.B = nn.Parameter(torch.zeros(out_local, spec.r, dtype=dtype))
            tp.set_tensor_model_parallel_attributes(self.A, True, 1, 1)
            if getattr(base, "sequence_parallel", False):  # B sees this rank's positions only: its gradient is
                self.B.sequence_parallel = True  # summed over the TP group (parallel.sum_sequence_parallel_grads)
        else:  # A whole; B split by rows like W, with its stride (the gated MLP's [up_r; gate_r])
            self.A = nn.Parameter(a_full.to(dtype))
            self.B = nn.Parameter(torch.zeros(out_local, spec.r, dtype=dtype))
            tp.set_tensor_model_parallel_attributes(self.B, True, 0, getattr(base.weight, "partition_stride", 1))
        device = base.weight.device
        if device.type != "cpu":
            self.to(device)

    def dropped(self, x: torch.Tensor, sequence_first: bool = False) -> torch.Tensor:
        """Dropout of the adapter's input: the mask of the whole input (drawn alike on every TP rank from the
        default generator, in [batch, sequence] order as at TP=1), this rank's columns of it when the input is
        split (row-parallel)."""
        if not self.training or self.p == 0.0:
            return x
        local = x.shape[-1]
        if sequence_first:  # sequence parallelism: [s, b, h], the whole sequence here (see forward)
            keep = x.new_empty(x.shape[1], x.shape[0], self.in_full).bernoulli_(1.0 - self.p).transpose(0, 1)
        else:
            keep = x.new_empty(*x.shape[:-1], self.in_full).bernoulli_(1.0 - self.p)
        if self.row:
            keep = keep[..., self.tp_rank * local:(self.tp_rank + 1) * local]
        return x * keep * (1.0 / (1.0 - self.p))

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """Under sequence parallelism ([s, b, h] activations) a column-parallel base gathers its input's positions
        and a row-parallel one reduce-scatters its output over them; the adapter does the same with its own (its
        input gathered as the base gathers it; r numbers per token reduce-scattered)."""
        if sequence_parallel and not self.row:  # backward: this rank's positions of the (complete) input gradient
            x = tp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        h = F.linear(self.dropped(x, sequence_parallel), self.A.to(x.dtype))
        if self.row and sequence_parallel:
            h = tp.reduce_scatter_to_sequence_parallel_region(h)  # this rank's positions of the sum A x
        elif self.row:
            h = tp.reduce_from_tensor_model_parallel_region(h)  # sum of the ranks' partial A x
        else:
            h = tp.copy_to_tensor_model_parallel_region(h)  # backward: sum of the ranks' partial dL/dh
        return F.linear(h, self.B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """s B A: this rank's part of the adapter as a change of W (its shape and split)."""
        return (self.B.float() @ self.A.float()) * self.scale


def _add_adapter(module: nn.Module, args, output):
    """Forward hook of an adapted linear: megatron-core linears return (output, bias)."""
    out, bias = output
    adapter = getattr(module, ADAPTER_NAME)
    if not adapter.enabled:
        return output
    return out + adapter(args[0], bool(getattr(module, "sequence_parallel", False))).to(out.dtype), bias


def add_lora(model: nn.Module, spec: LoraSpec) -> list[nn.Module]:
    """Give each target linear of each layer an adapter (drawn in layer order from `spec.seed`) and freeze every
    other parameter. Returns the adapted linears."""
    generator = torch.Generator().manual_seed(spec.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for layer in model.layers:
        linears = {"query_key_value": layer.attention.query_key_value, "dense": layer.attention.dense,
                   "linear1": layer.mlp.linear1, "linear2": layer.mlp.linear2}
        for name in spec.targets:
            linear = linears[name]
            linear.add_module(ADAPTER_NAME, LoRA(linear, spec, generator))
            linear.register_forward_hook(_add_adapter)
            adapted.append(linear)
    return adapted


def _forward_4bit(self, x: torch.Tensor, weight=None, **_):
    """A megatron-core parallel linear's forward on its NF4 weight (bitsandbytes' matmul_4bit, which runs on the
    CPU too), with the same tensor-parallel communication: a column-parallel layer's input gradient is summed over
    the TP group, a row-parallel layer's partial outputs are. Returns (output, None) with any bias added."""
    import bitsandbytes as bnb

    w = self.weight
    row = isinstance(self, tp.RowParallelLinear)
    if not row:
        x = tp.copy_to_tensor_model_parallel_region(x)
    out = bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state)
    if row:
        out = tp.reduce_from_tensor_model_parallel_region(out)
    if self.bias is not None:
        out = out + self.bias
    return out, None


def quantize_base(model: nn.Module) -> int:
    """QLoRA: every linear of every transformer layer (adapted or not) keeps its weight in bitsandbytes' 4-bit NF4
    (blocks of 64, as QLoRA) and computes through it; the embeddings, norms and output head stay as they are.
    Run after the base weights are loaded (it replaces them). Returns the number of weights quantized."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.layers:
        for linear in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.linear1, layer.mlp.linear2):
            w = linear.weight
            q = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64)
            q = q.to(w.device)  # quantizes
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(w, attr):
                    setattr(q, attr, getattr(w, attr))
            linear.weight = q
            linear.forward = _forward_4bit.__get__(linear)
            count += 1
    return count


def adapters_of(model: nn.Module) -> list[LoRA]:
    return [m for m in model.modules() if isinstance(m, LoRA)]


class adapters_disabled:
    """Within the block the model computes its base (adapters off), e.g. a reference model without a copy."""

    def __init__(self, model: nn.Module):
        self.adapters = adapters_of(model)

    def __enter__(self):
        for a in self.adapters:
            a.enabled = False

    def __exit__(self, *exc):
        for a in self.adapters:
            a.enabled = True


def adapter_sharding(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    """{adapter tensor name: (dim, stride) of its split over TP ranks, or None when every rank holds it whole},
    for checkpoint.store.merge_tp_shards / split_tp."""
    return {name: (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
            for name, p in model.named_parameters() if is_adapter(name)}


def merge_into(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A merged (TP=1) state with adapters -> the base state with W + s B A in place of each adapted W, in W's
    dtype (the product in fp32); the adapter tensors are left out."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for name in state:
        if name.endswith(f".{ADAPTER_NAME}.A"):
            prefix = name[: -len(f".{ADAPTER_NAME}.A")]
            a, b = state[name].float(), state[f"{prefix}.{ADAPTER_NAME}.B"].float()
            w = out[f"{prefix}.weight"]
            out[f"{prefix}.weight"] = (w.float() + scale * (b @ a)).to(w.dtype)
    return out
