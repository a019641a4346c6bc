"""Mixture of experts: megatron-core's dropless `MoELayer` (its router, all-gather token dispatcher and experts)
as the MLP of the layers `ModelShape.moe` names; the rest of the model is unchanged (model/transformer.py).

Upstream gpt-neox's semantics (megatron/model/router.py, moe.py), mapped onto megatron-core's options:
- sinkhorn: training picks each token's k experts by Sinkhorn-balanced scores (upstream's three iterations,
  `upstream_sinkhorn`; megatron-core's own iterates to convergence) and weights them by the sigmoid (k = 1) or
  softmax (k > 1) of its logits; evaluation picks the top k of those. No load-balancing loss: Sinkhorn balances.
- topk: softmax over all experts, the k largest, their raw weights (upstream); `normalize_weights` renormalises
  the k weights to sum 1 (Mixtral's), which is megatron-core's top-k-then-softmax.
- `aux_loss_coeff` > 0 (topk): the Switch load-balancing loss of each MoE layer, times the coefficient, is added
  to the training loss (megatron-core attaches its gradient to the routing weights; `set_aux_loss_scale`).
- every token reaches its experts (dropless; no capacity factor). Experts have no biases (as upstream's).
Experts are megatron-core's SequentialMLP (one parameter set per expert); where torch's grouped GEMM has a kernel
(CUDA, bf16) they run as two grouped GEMMs over all local experts (`grouped_forward`; `moe_grouped_gemm`), else
one after another. The CPU shims for megatron-core's CUDA-only calls are in neox_fork/parallel/groups.py, with
the dense layers' ones.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core import tensor_parallel as tp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from neox_fork.errors import UserError
from neox_fork.model.shape import ModelShape

LBL = "load_balancing_loss"  # megatron-core's tracker name for the topk router's loss


def transformer_config(s: ModelShape, mp: ModelParallelConfig, init, output_init,
                       activation: Callable) -> TransformerConfig:
    """megatron-core's config for one MoE layer of this shape (upstream's keys mapped as the module doc says)."""
    m = s.moe
    topk = m.router_type == "topk"
    return TransformerConfig(
        num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
        ffn_hidden_size=s.ffn_hidden_size, moe_ffn_hidden_size=s.ffn_hidden_size,
        gated_linear_unit=s.mlp_gated, activation_func=activation, add_bias_linear=False,
        bias_activation_fusion=False, init_method=init, output_layer_init_method=output_init,
        use_cpu_initialization=True, perform_initialization=mp.perform_initialization,
        params_dtype=mp.params_dtype, bf16=mp.bf16, fp16=mp.fp16,
        # TP > 1: experts split over the TP group as the dense MLP is (megatron-core's default expert tensor
        # parallel size), and MoEMLP hands each TP rank its slice of the tokens (megatron-core's sequence parallel)
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        sequence_parallel=parallel_state.get_tensor_model_parallel_world_size() > 1,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),  # the groups' (1 alone)
        num_moe_experts=m.num_experts, moe_router_topk=m.top_k,
        moe_router_load_balancing_type=("aux_loss" if m.aux_loss_coeff else "none") if topk else "sinkhorn",
        moe_aux_loss_coeff=m.aux_loss_coeff, moe_router_pre_softmax=not m.normalize_weights,
        moe_router_dtype="fp32" if m.router_fp32 else None, moe_input_jitter_eps=m.jitter_eps,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
    )


def upstream_sinkhorn(cost: torch.Tensor, tol: float = 1e-4, max_iter: int = 3) -> torch.Tensor:
    """Upstream gpt-neox's Sinkhorn normalisation (megatron/model/router.py): columns start at
    1 / (experts x column sum) and it stops after three iterations. megatron-core's starts from ones and
    iterates to convergence, which can pick other experts: training routes as upstream does."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), device=cost.device, dtype=cost.dtype)
    d1 = 1 / (cost.size(1) * torch.sum(cost, 0))
    d1_old = d1
    for _ in range(max_iter):
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + 1e-8)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + 1e-8)
        converged = torch.mean(torch.abs(d1_old - d1)) < tol
        d1_old = d1
        if converged:
            break
    return d1 * cost * d0.unsqueeze(1)


class Router(TopKRouter):
    """megatron-core's TopKRouter, with upstream's Sinkhorn iterations (`upstream_sinkhorn`) choosing the
    experts in training (the weights, sigmoid for k = 1 and softmax for k > 1 of the logits, are the same), and
    upstream's jitter: in training only."""

    def apply_input_jitter(self, input: torch.Tensor) -> torch.Tensor:
        """Upstream jitters in training only; megatron-core's would in evaluation too."""
        return super().apply_input_jitter(input) if self.training else input

    def sinkhorn_load_balancing(self, logits: torch.Tensor):
        if not self.training:
            return super().sinkhorn_load_balancing(logits)
        with torch.no_grad():
            _, indices = torch.topk(upstream_sinkhorn(logits.float()), k=self.topk, dim=1)
        if self.topk == 1:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, indices, True)
        return scores * routing_map, routing_map


class Experts(SequentialMLP):
    """megatron-core's SequentialMLP holding this expert-parallel rank's experts, whose initial weights are those
    of the same experts in a one-process model: each rank draws every expert's weights in order (the same
    generator state as one process) and keeps its own, so EP changes where experts live, not what they are."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        ep, rank = pg_collection.ep.size(), pg_collection.ep.rank()

        def draw(n):
            for _ in range(n):
                MLP(config, submodules, ffn_hidden_size=config.moe_ffn_hidden_size, is_expert=True,
                    tp_group=pg_collection.expt_tp)

        draw(rank * num_local_experts)
        super().__init__(num_local_experts, config, submodules, pg_collection)
        draw((ep - rank - 1) * num_local_experts)
        self.grouped: bool | None = None  # moe_grouped_gemm (MoEMLP sets it); None: `grouped_kernel` decides

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        """[tokens, h] sorted by expert -> ([tokens, h], None), as SequentialMLP's; grouped: see `grouped_forward`."""
        expert = self.local_experts[0]
        weights = (expert.linear_fc1.weight, expert.linear_fc2.weight)
        kernel = grouped_kernel(*weights)
        if self.grouped is False or (self.grouped is None and not kernel) \
                or self.config.moe_apply_probs_on_input or hidden.shape[0] == 0:  # no token reached these experts
            return super().forward(hidden, tokens_per_expert, probs)
        if weights[0].is_cuda and not kernel:
            raise UserError(f"moe_grouped_gemm: true needs bf16 experts whose sizes are multiples of 8 on a CUDA "
                            f"device of compute capability 8+ (these are {weights[0].dtype}, fc1 "
                            f"{list(weights[0].shape)} and fc2 {list(weights[1].shape)} on "
                            f"{torch.cuda.get_device_name(weights[0].device)}); use moe_grouped_gemm: null to run "
                            "them one after another there")
        return grouped_forward(self, hidden, tokens_per_expert, probs), None


# 16 bytes of bf16: torch's CUDA grouped GEMM needs rows aligned so. Each expert's token group is padded to a
# multiple of this many rows (the weight gradient's GEMM contracts over tokens; torchtitan pads so for bf16), and
# the kernel is used where every weight dimension is a multiple of it.
GROUP_ROWS = 8


def grouped_kernel(fc1: torch.Tensor, fc2: torch.Tensor) -> bool:
    """Whether torch's grouped_mm has a kernel for experts with these weights: bf16 on a CUDA device of compute
    capability 8+, every dimension a multiple of 8 (the kernel's 16-byte row alignment). Elsewhere it runs a loop
    of GEMMs (CPU) or not at all (fp32 on CUDA), and experts run one after another."""
    return (fc1.is_cuda and fc1.dtype == torch.bfloat16 and hasattr(torch.nn.functional, "grouped_mm")
            and torch.cuda.get_device_capability(fc1.device)[0] >= 8
            and all(d % GROUP_ROWS == 0 for d in (*fc1.shape, *fc2.shape)))


def grouped_forward(experts: SequentialMLP, hidden: torch.Tensor, tokens_per_expert: torch.Tensor,
                    probs: torch.Tensor) -> torch.Tensor:
    """The local experts of `experts` over their tokens in two grouped GEMMs (torch.nn.functional.grouped_mm):
    the same products, activation and routing-weight scaling as megatron-core's MLP on each expert's slice
    (its unfused path: fc1, act(first half) x second half when gated, times the token's weight in the input's
    dtype, fc2), with no communication, as expert linears have none (the token dispatcher reduces over TP).
    The weights stay one parameter per expert (checkpoints, ZeRO shards and the HF and universal mappings are
    the same either way); they are stacked for the two GEMMs, a copy of the expert weights per forward."""
    config = experts.config
    counts = tokens_per_expert.to(device=hidden.device, dtype=torch.long)
    padded = (counts + GROUP_ROWS - 1) // GROUP_ROWS * GROUP_ROWS
    # row i of the sorted tokens goes to its expert's padded block at the same offset within it
    rows = torch.arange(hidden.shape[0], device=hidden.device) + torch.repeat_interleave(
        torch.cumsum(padded, 0) - padded - (torch.cumsum(counts, 0) - counts), counts,
        output_size=hidden.shape[0])
    x = hidden.new_zeros(int(padded.sum()), hidden.shape[1]).index_copy(0, rows, hidden)
    offsets = torch.cumsum(padded, 0).to(torch.int32)
    fc1 = torch.stack([e.linear_fc1.weight for e in experts.local_experts])  # [E, out, h]
    fc2 = torch.stack([e.linear_fc2.weight for e in experts.local_experts])  # [E, h, f]
    inner = torch.nn.functional.grouped_mm(x, fc1.transpose(1, 2), offs=offsets)
    if config.gated_linear_unit:
        gate, linear = torch.chunk(inner, 2, dim=-1)
        inner = config.activation_func(gate) * (linear + config.glu_linear_offset)
    else:
        inner = config.activation_func(inner)
    scale = probs.new_zeros(x.shape[0]).index_copy(0, rows, probs)
    inner = (inner * scale.unsqueeze(-1)).to(inner.dtype)
    return torch.nn.functional.grouped_mm(inner, fc2.transpose(1, 2), offs=offsets).index_select(0, rows)


_EXPERT = re.compile(r"(.*\.mlp\.moe\.experts\.local_experts\.)(\d+)(\..*)")


def is_expert(name: str) -> bool:
    """Whether a parameter (our name) belongs to an expert: split over EP, its ZeRO state per EP rank."""
    return _EXPERT.fullmatch(name) is not None


def global_expert_names(state: dict, ep_rank: int, local_experts: int) -> dict:
    """A rank's state with its local expert indices made global (rank x local experts + index); the rest as is."""
    out = {}
    for name, tensor in state.items():
        m = _EXPERT.fullmatch(name)
        out[f"{m[1]}{ep_rank * local_experts + int(m[2])}{m[3]}" if m else name] = tensor
    return out


def local_expert_names(state: dict, ep_rank: int, local_experts: int) -> dict:
    """The inverse of global_expert_names: this rank's experts under local indices, other ranks' experts left out."""
    out = {}
    for name, tensor in state.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            out[name] = tensor
        elif ep_rank * local_experts <= int(m[2]) < (ep_rank + 1) * local_experts:
            out[f"{m[1]}{int(m[2]) - ep_rank * local_experts}{m[3]}"] = tensor
    return out


def gather_experts(state: dict, group, local_experts: int) -> dict:
    """Every expert of every EP rank in `group` (a collective over it) under global names: what a one-process
    model's state holds. The dense tensors are this rank's (equal on every EP rank)."""
    import torch.distributed as dist

    ep = dist.get_world_size(group=group)
    out = {}
    for name, tensor in state.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            out[name] = tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(ep)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        for r, part in enumerate(parts):
            out[f"{m[1]}{r * local_experts + int(m[2])}{m[3]}"] = part
    return out


def expert_parallel_states(state: dict, num_experts: int) -> tuple[dict, dict]:
    """(every expert, this rank's own experts), both under global names, of this rank's model `state`: what a
    checkpoint's layer files and EP rank 0's mp_rank file hold, and what the other EP ranks' files hold.
    A collective over the expert-parallel group; without expert parallelism both are `state`."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep == 1:
        return state, state
    local = num_experts // ep
    full = gather_experts(state, parallel_state.get_expert_model_parallel_group(), local)
    return full, global_expert_names(state, parallel_state.get_expert_model_parallel_rank(), local)


def own_experts(state: dict, num_experts: int) -> dict:
    """A saved state (global expert names) as this rank's model names it: its own experts only."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    return state if ep == 1 else local_expert_names(state, parallel_state.get_expert_model_parallel_rank(),
                                                    num_experts // ep)


class MoEMLP(nn.Module):
    """An MoE layer in the MLP's place: [b, s, h] -> [b, s, h]. After each forward it holds `tokens_per_expert`
    (this rank's tokens routed to each expert) and `load_balancing_loss` (unscaled; None without one); an
    activation-checkpoint recompute repeats the same values, so they are kept, not summed."""

    def __init__(self, s: ModelShape, mp: ModelParallelConfig, layer_number: int, init, output_init,
                 activation: Callable):
        super().__init__()
        config = transformer_config(s, mp, init, output_init, activation)
        experts = ModuleSpec(module=Experts, submodules=MLPSubmodules(
            linear_fc1=tp.ColumnParallelLinear, linear_fc2=tp.RowParallelLinear))
        self.moe = MoELayer(config, MoESubmodules(router=Router, experts=experts), layer_number=layer_number)
        self.moe.set_layer_number(layer_number + 1)  # megatron-core counts layers from 1
        self.moe.experts.grouped = s.moe.grouped_gemm
        self.layer_index = layer_number
        self.sequence_parallel = False  # this forward's input is this TP rank's sequence slice (NeoXModel sets it)
        self.tokens_per_expert: torch.Tensor | None = None
        self.load_balancing_loss: torch.Tensor | None = None
        self.moe.router.register_forward_hook(self._count_tokens)

    def _count_tokens(self, router, inputs, outputs) -> None:
        _, routing_map = outputs
        self.tokens_per_expert = routing_map.sum(dim=0).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # megatron-core adds each layer's loss into a process-wide tracker; here it holds this forward's only
        # (a recompute repeats the same value; another model in the process may have left other layer counts)
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        tracker.pop(LBL, None)
        group = parallel_state.get_tensor_model_parallel_group()
        if self.sequence_parallel:  # [s/TP, b, h]: this rank's tokens already, as megatron-core's MoE expects
            out, _ = self.moe(x)
        elif self.training and group.size() > 1:
            out = self._tokens_split_over(group, x)
        else:  # token order does not matter to routing: [b, s, h] is taken as is (TP > 1 in evaluation: every
            out, _ = self.moe(x)  # TP rank routes all tokens, the same; the experts' outputs are still summed once)
        tracked = tracker.pop(LBL, None)
        self.load_balancing_loss = tracked["values"][self.layer_index].clone() if tracked is not None else None
        return out

    def _tokens_split_over(self, group, x: torch.Tensor) -> torch.Tensor:
        """Training at TP > 1: each TP rank routes its 1/TP of the (replicated) tokens, as megatron-core's MoE
        expects under sequence parallelism; every rank gets all outputs back. Backward: the split's gradient is
        gathered, the gather's is split (not summed: each rank's copy of the output feeds the same loss). The
        router sees a slice, so its gradient is summed over the TP group (`sequence_parallel`; megatron-core's
        mark) and the load-balancing loss is each rank's part of the whole (megatron-core's reduce over TP)."""
        if x.numel() // x.shape[-1] % group.size():
            raise ValueError(f"MoE at tensor parallel {group.size()} splits the {x.numel() // x.shape[-1]} tokens "
                             "of a micro-batch over its ranks: use a micro-batch x seq_length divisible by it")
        tokens = tp.scatter_to_sequence_parallel_region(x.reshape(-1, 1, x.shape[-1]), group=group)
        out, _ = self.moe(tokens)
        return tp.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False,
                                                       group=group).reshape(x.shape)


def set_aux_loss_scale(scale: float) -> None:
    """The factor the load-balancing loss's gradient gets, to match the language-model loss's: DeepSpeed divides
    that by the gradient-accumulation steps inside its backward, which megatron-core's attached gradient skips."""
    moe_utils.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale))


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def add_step_metrics(metrics: dict, model: nn.Module, micro_batches: int) -> None:
    """After a micro-batch's forward and backward: add its MoE numbers into the step's `metrics`.
    moe_lbl: the load-balancing loss (unscaled) summed over MoE layers, as the loss adds it, averaged over
    micro-batches; moe_tokens/layer{i}/expert{e}: tokens routed to that expert in this step on this rank."""
    layers = moe_layers(model)
    _sum_over_tensor_parallel(layers)
    losses = [m.load_balancing_loss for m in layers if m.load_balancing_loss is not None]
    if losses:
        metrics["moe_lbl"] = metrics.get("moe_lbl", 0.0) + float(sum(losses)) / micro_batches
    for m in layers:
        if m.tokens_per_expert is None:
            continue
        for e, count in enumerate(m.tokens_per_expert.tolist()):
            key = f"moe_tokens/layer{m.layer_index}/expert{e}"
            metrics[key] = metrics.get(key, 0.0) + float(count)
        m.tokens_per_expert = m.load_balancing_loss = None


def _sum_over_tensor_parallel(layers: list[MoEMLP]) -> None:
    """Training at TP > 1 routes 1/TP of the tokens on each TP rank: each layer's counts and load-balancing loss
    part become the micro-batch's (one all-reduce over the TP group)."""
    import torch.distributed as dist

    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1 or not layers or layers[0].tokens_per_expert is None:
        return
    parts = [t.float().reshape(-1) for m in layers for t in (m.tokens_per_expert, m.load_balancing_loss)
             if t is not None]
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=group)
    for m in layers:
        for attr in ("tokens_per_expert", "load_balancing_loss"):
            t = getattr(m, attr)
            if t is not None:
                n = t.numel()
                setattr(m, attr, flat[:n].reshape(t.shape))
                flat = flat[n:]
