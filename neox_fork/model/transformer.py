"""The GPT-NeoX model family (GPT-NeoX/Pythia, Llama, StableLM), built from megatron-core tensor-parallel layers.

    tokens -> word embedding (vocab-parallel) [+ learned positions]
           -> num_layers x block -> final norm -> output head (column-parallel over the vocabulary)
    block: x + attn(n1(x)) ; x + mlp(n2(x))      sequential residual (Llama, StableLM)
           x + attn(n1(x)) + mlp(n2(x))           gpt_j_residual: parallel (Pythia, GPT-NeoX-20B)

Attention: fused QKV projection, one [q heads of the group..., k, v] block of rows per key/value head (with
as many key/value heads as query heads this is GPT-NeoX's per-head [q, k, v] layout), so grouped-query
attention splits over tensor-parallel ranks by whole groups; rotary on the first `rotary_pct` of each head
(rotate-half), causal. MLP: `linear1` then the activation then `linear2`; when gated, `linear1` holds
[up; gate] for this rank's slice and computes act(gate) * up. Norms: LayerNorm (optional bias) or RMSNorm
(`scale`). Which of these a config picks is decided in neox_fork/config/neox_config.py; the same code runs at any
tensor-parallel size: each rank holds its heads, its slice of the MLP and of the vocabulary.

This module knows nothing of launch, data or checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core import tensor_parallel as tp
from torch import nn

from neox_fork.model import fused, moe, rope_scaling
from neox_fork.model.adapters import LoraSpec, add_lora
from neox_fork.model.attention import DocumentMask, attention, ulysses
from neox_fork.model.shape import ModelShape
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.config.rules import check_runnable
from neox_fork.parallel.groups import RNG_TRACKER, checkpoint, context_group, gather_sequence

def tp_args(mp: ModelParallelConfig) -> dict:
    """Arguments every megatron-core parallel layer takes: its config and the tensor-parallel group."""
    return {"config": mp, "tp_group": parallel_state.get_tensor_model_parallel_group()}


def init_method(name: str, std: float, num_layers: int, hidden_size: int):
    """GPT-NeoX's initialisers: normal, scaled_normal (std / sqrt(2L)), small_init, wang_init."""
    if name == "normal":
        sigma = std
    elif name == "scaled_normal":
        sigma = std / math.sqrt(2.0 * num_layers)
    elif name == "small_init":
        sigma = math.sqrt(2 / (5 * hidden_size))
    elif name == "wang_init":
        sigma = 2 / num_layers / math.sqrt(hidden_size)
    else:
        raise ValueError(f"unknown init method {name}")
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=sigma)


class Rotary(nn.Module):
    """cos/sin tables for the first `dim` dims of each head (frequencies duplicated, rotate-half), scaled as the
    config's `rope_scaling` says (model/rope_scaling.py): cos and sin are multiplied by the type's attention
    factor, as transformers does. `dynamic` and `longrope` depend on the call's longest position (transformers:
    max(position_ids) + 1), so a forward picks or recomputes its frequencies; the others are fixed.

    The frequencies stay fp32 whatever the model is cast to (`model.to(bfloat16)` for generation), as
    transformers' and DeepSpeed's casts keep them: they are plain attributes, moved to the positions' device
    on first use, not buffers."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None, max_positions: int = 0):
        super().__init__()
        self.dim, self.base, self.scaling, self.max_positions = dim, base, scaling, max_positions
        self.kind = rope_scaling.rope_type(scaling)
        self.inv_freq, self.attention_factor = rope_scaling.frequencies(scaling, dim, base, max_positions)
        self.original = rope_scaling.resolve(scaling, max_positions).get("original_max_position_embeddings")
        if self.kind == "longrope":  # long_factor's frequencies, used once a call passes the original length
            self.long_inv_freq, _ = rope_scaling.frequencies(scaling, dim, base, max_positions,
                                                             seq_len=self.original + 1)

    def _on(self, name: str, device) -> torch.Tensor:
        table = getattr(self, name)
        if table.device != device:
            table = table.to(device)
            setattr(self, name, table)
        return table

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        device = position_ids.device
        inv_freq = self._on("inv_freq", device)
        if self.kind == "longrope":
            return torch.where(position_ids.max() + 1 > self.original, self._on("long_inv_freq", device), inv_freq)
        if self.kind == "dynamic":
            seq_len = position_ids.max() + 1
            if seq_len > self.original:  # a host sync, as in transformers
                inv_freq, _ = rope_scaling.frequencies(self.scaling, self.dim, self.base, self.max_positions,
                                                       seq_len=seq_len, device=device)
        return inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.frequencies(position_ids)  # [b, s, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [b, s, 1, dim]
        if self.attention_factor == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


class Attention(nn.Module):
    def __init__(self, s: ModelShape, mp: ModelParallelConfig, layer_number: int):
        super().__init__()
        self.shape = s
        self.backend = s.attention_types[layer_number]
        tp_size = mp.tensor_model_parallel_size
        self.kv_per_rank = s.kv_heads // tp_size
        self.group = s.num_heads // s.kv_heads  # query heads per key/value head
        self.window = s.sliding_window
        if s.qk_norm:  # one norm for q and k, over this rank's [heads, head_dim] (upstream's shape and name)
            self.qk_layernorm = make_norm(s, (s.num_heads // tp_size, s.head_dim), qk=True)
            for p in self.qk_layernorm.parameters():  # split over TP ranks by heads, as the QKV rows
                tp.set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.query_key_value = tp.ColumnParallelLinear(
            s.hidden_size, (s.num_heads + 2 * s.kv_heads) * s.head_dim, **tp_args(mp), bias=s.attn_bias,
            gather_output=False, init_method=init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size),
        )
        self.dense = tp.RowParallelLinear(
            s.hidden_size, s.hidden_size, **tp_args(mp), bias=s.attn_bias, input_is_parallel=True,
            skip_bias_add=False,
            init_method=init_method(s.output_layer_init_method, s.init_std, s.num_layers, s.hidden_size),
        )

    def forward(self, x, rotary: Rotary, cos, sin, kv_cache=None, mask=None):
        """`mask` [b, 1, q, k] (bool, True = attend) replaces the causal mask, e.g. for left padding.
        Under sequence parallelism `x` is this rank's [s/tp, b, h] slice: the QKV projection gathers the
        sequence (megatron-core) and the output projection reduce-scatters it back."""
        sequence_first = self.query_key_value.sequence_parallel
        qkv, _ = self.query_key_value(x)
        if sequence_first:  # [s, b, qkv/tp] -> [b, s, qkv/tp]
            qkv = qkv.transpose(0, 1)
        b, sq, _ = qkv.shape
        qkv = qkv.view(b, sq, self.kv_per_rank, self.group + 2, self.shape.head_dim)
        if self.shape.selective_recompute and self.training and kv_cache is None:
            # Megatron's selective recompute: the backward re-runs rotary and the attention core from qkv,
            # so the rotated q, k and the kernel's output are not kept (4 L h s FLOPs per token extra)
            out = checkpoint(self.core, qkv, rotary, cos, sin, None, mask)
        else:
            out = self.core(qkv, rotary, cos, sin, kv_cache, mask)
        out = out.reshape(b, sq, -1)
        out, _ = self.dense(out.transpose(0, 1).contiguous() if sequence_first else out)
        return out

    def core(self, qkv, rotary: Rotary, cos, sin, kv_cache=None, mask=None):
        """Rotary and attention on [b, s, kv heads, (q x group, k, v), head_dim]; the output [b, s, heads,
        head_dim]."""
        b, sq = qkv.shape[:2]
        g, d = self.group, self.shape.head_dim
        qk_norm = getattr(self, "qk_layernorm", None)
        if g == 1 and rotary.dim and qk_norm is None:  # q, k, v each [b, s, heads, head_dim]
            q, k, v = fused.rotary_qkv(qkv, cos, sin, rotary.dim)
        else:
            q, k, v = qkv[:, :, :, :g].reshape(b, sq, -1, d), qkv[:, :, :, g], qkv[:, :, :, g + 1]
            if qk_norm is not None:  # one key/value head per query head (config_rules refuses GQA here)
                q, k = qk_norm(q), qk_norm(k)
            if rotary.dim:
                q, k = (fused.rotary_reference(t, cos, sin, rotary.dim) for t in (q, k))
        causal = mask is None
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            causal = causal and sq > 1
            if causal and k.shape[1] > sq:  # several new tokens after a cached prefix: mask bottom-right
                mask = torch.ones(sq, k.shape[1], dtype=torch.bool, device=qkv.device).tril(k.shape[1] - sq)
        dropout_p = self.shape.attention_dropout if self.training else 0.0

        def attend(q, k, v):
            if g > 1:  # each key/value head serves the `g` query heads of its group
                k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
            if not dropout_p:
                return attention(q, k, v, backend=self.backend, causal=causal, mask=mask, window=self.window)
            # each TP (and CP) rank holds other heads: their masks come from the rank's own stream, as Megatron's
            with RNG_TRACKER.fork():
                return attention(q, k, v, backend=self.backend, causal=causal, dropout_p=dropout_p, mask=mask,
                                 window=self.window)

        cp_group = context_group()
        if kv_cache is None and cp_group is not None:  # this rank holds 1/CP of the sequence (model/attention.py)
            return ulysses(attend, q, k, v, cp_group)
        return attend(q, k, v)


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "mish": F.mish, "softsign": F.softsign,
                "sigmoid": torch.sigmoid, "identity": lambda x: x}


class MLP(nn.Module):
    """linear1 -> activation -> linear2; gated: linear1 gives [up; gate] per rank and act(gate) * up."""

    def __init__(self, s: ModelShape, mp: ModelParallelConfig):
        super().__init__()
        self.gated, self.activation = s.mlp_gated, s.activation
        branches = 2 if s.mlp_gated else 1
        self.linear1 = tp.ColumnParallelLinear(  # stride 2 when gated keeps each rank's halves paired
            s.hidden_size, s.mlp_out or branches * s.ffn_hidden_size, **tp_args(mp), bias=s.mlp_bias,
            gather_output=False,
            stride=branches, init_method=init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size),
        )
        self.linear2 = tp.RowParallelLinear(
            s.ffn_hidden_size, s.hidden_size, **tp_args(mp), bias=s.mlp_bias, input_is_parallel=True,
            skip_bias_add=False,
            init_method=init_method(s.output_layer_init_method, s.init_std, s.num_layers, s.hidden_size),
        )

    def forward(self, x):
        h, _ = self.linear1(x)
        if not self.gated:
            h = _ACTIVATIONS[self.activation](h)
        else:
            up, gate = h.chunk(2, dim=-1)
            h = fused.swiglu(up, gate) if self.activation == "silu" else _ACTIVATIONS[self.activation](gate) * up
        out, _ = self.linear2(h)
        return out


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, in fp32 (Llama's; upstream gpt-neox names the weight `scale`)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(size))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.scale * y.to(x.dtype)


def make_norm(s: ModelShape, size=None, qk: bool = False) -> nn.Module:
    """The config's norm over the last dim(s) of `size` (default hidden_size). RMSNorm normalises the last
    dim only (per head for qk); upstream's qk LayerNorm always has a bias."""
    if s.norm == "rmsnorm":
        return RMSNorm(size or s.hidden_size, s.norm_eps)
    return nn.LayerNorm(size or s.hidden_size, eps=s.norm_eps, bias=s.norm_bias or qk)


class HiddenDropout(nn.Module):
    """Dropout of the residual stream and the embeddings, the same masks at any TP size and with or without
    sequence parallelism.

    The mask is drawn with `bernoulli_` from the default generator, which is seeded alike on every TP rank.
    Without sequence parallelism each TP rank holds the whole [b, s, h] tensor and draws its mask. Under
    sequence parallelism rank r holds the positions [r*s/tp, (r+1)*s/tp) as [s/tp, b, h]; it draws the mask
    of the whole [b, s, h] tensor (the same numbers a TP=1 run draws) and keeps its slice, so every position
    is dropped exactly as at TP=1. Megatron instead forks a per-rank stream (statistically equivalent, not
    equal); this costs tp x the random numbers of the slice, and only the slice's bool mask is kept. Under context
    parallelism ([b, s/cp, h] per CP rank, a full forward) the same: the whole mask, this rank's positions.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = parallel_state.get_context_parallel_world_size()

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if sequence_parallel:  # [s/tp, b, h]
            keep = self._slice_of_whole_mask(x.transpose(0, 1), self.tp_rank, self.tp_size).transpose(0, 1)
        elif self.cp_size > 1:  # context parallelism: [b, s/cp, h]
            keep = self._slice_of_whole_mask(x, self.cp_rank, self.cp_size)
        else:
            keep = torch.empty_like(x).bernoulli_(1.0 - self.p).to(torch.bool)
        return x * keep * (1.0 / (1.0 - self.p))

    def _slice_of_whole_mask(self, x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank `rank` of `size`'s positions [b, s/size, h] (those of `x`) of the keep mask of the whole
        [b, s, h] sequence, drawn as one process draws it."""
        b, local, h = x.shape
        full = x.new_empty(b, local * size, h).bernoulli_(1.0 - self.p)
        return full[:, rank * local : (rank + 1) * local].to(torch.bool)


class TransformerLayer(nn.Module):
    def __init__(self, s: ModelShape, mp: ModelParallelConfig, layer_number: int):
        super().__init__()
        self.parallel_residual = s.parallel_residual
        self.input_layernorm = make_norm(s)
        self.attention = Attention(s, mp, layer_number)
        self.post_attention_layernorm = make_norm(s)
        self.mlp = MLP(s, mp) if s.moe is None or not s.moe.is_moe_layer(layer_number) else moe.MoEMLP(
            s, mp, layer_number, init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size),
            init_method(s.output_layer_init_method, s.init_std, s.num_layers, s.hidden_size),
            _ACTIVATIONS[s.activation])
        self.dropout = HiddenDropout(s.hidden_dropout)

    def forward(self, x, rotary, cos, sin, kv_cache=None, mask=None):
        sp = self.attention.query_key_value.sequence_parallel
        attn = self.dropout(self.attention(self.input_layernorm(x), rotary, cos, sin, kv_cache, mask), sp)
        if self.parallel_residual:
            return x + attn + self.dropout(self.mlp(self.post_attention_layernorm(x)), sp)
        x = x + attn
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)), sp)


class KVCache:
    """Keys and values of one layer for incremental decoding, [batch, seq, heads, head_dim].

    With a `capacity` the buffers are allocated once and each update writes its positions in place
    (returning views up to the current length); without one they grow by concatenation.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity, self.length = capacity, 0
        self.k = self.v = None

    def update(self, k, v):
        end = self.length + k.shape[1]
        if self.capacity is None:
            self.k = k if self.k is None else torch.cat((self.k, k), dim=1)
            self.v = v if self.v is None else torch.cat((self.v, v), dim=1)
        else:
            if self.k is None:
                shape = (k.shape[0], self.capacity, *k.shape[2:])
                self.k, self.v = k.new_empty(shape), v.new_empty(shape)
            self.k[:, self.length : end], self.v[:, self.length : end] = k, v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class NeoXModel(nn.Module):
    def __init__(self, shape: ModelShape, mp: ModelParallelConfig):
        super().__init__()
        s = self.shape = shape
        self.word_embeddings = tp.VocabParallelEmbedding(
            s.vocab_size, s.hidden_size, **tp_args(mp),
            init_method=init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size),
        )
        if s.learned_positions:  # replicated on every TP rank, drawn from the same seed
            self.position_embeddings = nn.Embedding(s.max_positions, s.hidden_size)
            if mp.perform_initialization:
                init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size)(self.position_embeddings.weight)
        self.embedding_dropout = HiddenDropout(s.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(s, mp, i) for i in range(s.num_layers))
        self.final_norm = make_norm(s)
        if s.reward_model:  # upstream's rm_linear in the LM head's place: hidden -> one score, whole on every rank
            self.rm_linear = nn.Linear(s.hidden_size, 1, bias=False)
            if mp.perform_initialization:
                init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size)(self.rm_linear.weight)
        else:
            self.output_layer = tp.ColumnParallelLinear(  # its input is gathered over the sequence first
                s.hidden_size, s.vocab_size, **tp_args(replace(mp, sequence_parallel=False)), bias=False,
                gather_output=False,
                skip_weight_param_allocation=s.tie_word_embeddings,
                init_method=init_method(s.init_method, s.init_std, s.num_layers, s.hidden_size),
            )
        self.rotary = Rotary(s.rotary_dim, s.rotary_base, s.rope_scaling, s.max_positions)
        if mp.sequence_parallel:
            mark_sequence_parallel_parameters(self)

    def new_kv_cache(self, capacity: int | None = None) -> list[KVCache]:
        return [KVCache(capacity) for _ in self.layers]

    def hidden_states(self, tokens, position_ids=None, kv_cache=None, attention_mask=None, segment_ids=None):
        """Final-norm hidden states [b, s, h]. `kv_cache` (from new_kv_cache) enables cached decoding;
        `attention_mask` [b, 1, s, k] (bool, True = attend) replaces the causal mask (left padding).
        `segment_ids` [b, s] (packed documents: data/labeled.py, reset_attention_mask): a position attends only
        to earlier positions of its own segment (flash-attn varlen or a block-diagonal causal mask, see
        model/attention.py); give `position_ids` restarting per segment with it.

        Under context parallelism (a training or validation forward of a full sequence) `tokens`, `position_ids`
        and `segment_ids` are this rank's slice [b, s/CP] of each sequence (training/loop.py slices batches):
        positions default to the slice's global ones, segment ids are gathered over the group for the mask."""
        full_sequence = kv_cache is None and attention_mask is None
        cp_group = context_group()
        context_parallel = full_sequence and cp_group is not None  # this rank holds 1/CP of each sequence
        if segment_ids is not None:
            if context_parallel:  # attention sees the whole sequence (after the all-to-all): so does its mask
                segment_ids = gather_sequence(segment_ids, cp_group)
            attention_mask = DocumentMask(segment_ids)
        if position_ids is None:  # one [1, s] row for the whole batch: cos/sin broadcast over it
            start = kv_cache[0].length if kv_cache else 0
            if context_parallel:  # rotary runs on this rank's slice, before the all-to-all: global positions
                start = parallel_state.get_context_parallel_rank() * tokens.shape[1]
            position_ids = torch.arange(start, start + tokens.shape[1], device=tokens.device).unsqueeze(0)
        sp = self.use_sequence_parallel(tokens.shape[1], full_sequence)
        x = self.embed(tokens, position_ids, sp)
        cos, sin = self.rotary(position_ids)
        chunk = self.shape.checkpoint_num_layers
        use_checkpoint = self.shape.checkpoint_activations and self.training and kv_cache is None
        layers = self.compiled_layers() if self.shape.torch_compile and kv_cache is None else self.layers
        for first in range(0, len(layers), chunk):
            group = layers[first : first + chunk]
            caches = kv_cache[first : first + chunk] if kv_cache else [None] * len(group)
            if use_checkpoint:
                x = checkpoint(_run_layers, group, x, self.rotary, cos, sin, None, attention_mask)
            else:
                x = _run_layers(group, x, self.rotary, cos, sin, caches, attention_mask)
        return self.finish(x, sp)

    def embed(self, tokens, position_ids, sp: bool):
        """Token (+ learned position) embeddings, split over the sequence when `sp`, after dropout."""
        x = self.word_embeddings(tokens)
        if self.shape.learned_positions:  # added to the whole sequence, before any split
            x = x + self.position_embeddings(position_ids)
        if sp:  # [b, s, h] -> this rank's [s/tp, b, h] slice, in its own memory (megatron's split is a view)
            x = tp.scatter_to_sequence_parallel_region(x.transpose(0, 1).contiguous()).clone()
        return self.embedding_dropout(x, sp)

    def finish(self, x, sp: bool):
        """The final norm, and the whole sequence [b, s, h] back when it was split (`sp`)."""
        x = self.final_norm(x)
        if sp:  # the head needs every position; its own backward all-reduce sums the TP ranks' parts
            x = tp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False).transpose(0, 1)
        return x

    def use_sequence_parallel(self, seq_length: int, full_sequence: bool) -> bool:
        """Whether this forward splits the sequence, switching the megatron-core layers to match.

        Sequence parallelism runs when it is configured, the model is training and the call is a plain
        full-sequence forward; evaluation, generation and cached decoding run the same weights without it.
        """
        if not self.shape.sequence_parallel:
            return False
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        on = tp_size > 1 and self.training and full_sequence
        if on and seq_length % tp_size:
            raise ValueError(f"sequence parallelism needs a sequence length divisible by the TP size {tp_size}, "
                             f"got {seq_length}")
        for m in self.layers.modules():
            if isinstance(m, moe.MoEMLP):
                m.sequence_parallel = on
            elif isinstance(m, (tp.ColumnParallelLinear, tp.RowParallelLinear)) and m.sequence_parallel != on:
                m.sequence_parallel = on
                if isinstance(m, tp.ColumnParallelLinear):
                    m.allreduce_dgrad = tp_size > 1 and not on and not m.disable_grad_reduce
        return on

    def compiled_layers(self) -> list[nn.Module]:
        """`torch.compile`d views of the layers (same parameters), made on first use. Kept in a plain list,
        not registered as submodules, so the state dict keeps its names; cached decoding stays eager."""
        compiled = self.__dict__.get("_compiled_layers")
        if compiled is None:
            compiled = self.__dict__["_compiled_layers"] = [torch.compile(layer) for layer in self.layers]
        return compiled

    def logits_parallel(self, hidden):
        """This rank's vocabulary slice of the logits, [b, s, vocab / tp]."""
        weight = self.word_embeddings.weight if self.shape.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

    def forward(self, tokens, position_ids=None, kv_cache=None, labels=None, loss_mask=None, segment_ids=None,
                loss_denominator=None, score=None, fp32=True):
        """With `labels`: the training loss (see `loss`). Without: full logits [b, s, vocab], gathered
        across TP ranks, for generation and parity checks. `segment_ids`: see `hidden_states`.
        `score="logprobs"`: each row's summed log-probability of its labels where `loss_mask` is set
        (`sequence_logprobs`); `score="reward"`: the reward head's value (`reward`); for training/preference.py."""
        if score == "logprobs":
            return self.sequence_logprobs(tokens, labels, loss_mask, fp32)
        if score == "reward":
            return self.reward(tokens, loss_mask)
        if labels is not None:
            return self.loss(tokens, labels, loss_mask, position_ids, segment_ids, loss_denominator)
        return self.full_logits(self.hidden_states(tokens, position_ids, kv_cache, segment_ids=segment_ids))

    def full_logits(self, hidden):
        """Logits over the whole vocabulary for final-norm hidden states, gathered across TP ranks."""
        logits = self.logits_parallel(hidden)
        group = parallel_state.get_tensor_model_parallel_group()
        if group.size() == 1:
            return logits
        # differentiable all-gather over the vocabulary slices (megatron-core's allocates on CUDA)
        return torch.cat(dist_nn.all_gather(logits.contiguous(), group=group), dim=-1)

    def loss(self, tokens, labels, loss_mask=None, position_ids=None, segment_ids=None, denominator=None):
        """Mean next-token cross-entropy over unmasked positions; logits stay split over the vocabulary.

        The sum over unmasked positions is divided by `denominator` when given (training/loop.py passes the global
        batch's trained-token count per micro-batch, so the step's loss is the mean over all trained tokens),
        else by this batch's count.

        The head and the loss run over chunks of at most `loss_chunk_tokens` tokens, so the full fp32
        logits of the batch (e.g. 4 x 4096 x 50304 x 4 bytes = 3.3 GB for StableLM) never exist at once.
        At TP=1 when training, `fused.linear_cross_entropy` computes each chunk's gradients in the same pass
        (no recompute of the head); otherwise each chunk is checkpointed.
        """
        hidden = self.hidden_states(tokens, position_ids, segment_ids=segment_ids)
        return self.loss_of_hidden(hidden, labels, loss_mask, denominator)

    def loss_of_hidden(self, hidden, labels, loss_mask=None, denominator=None):
        """`loss` from final-norm hidden states [b, s, h] (a pipeline's last stage starts here). Under context
        parallelism the default denominator is the trained-token count of the whole sequences (summed over the
        CP group): each CP rank's loss is its slice's sum over that count, and the sum over the group (what
        DeepSpeed's gradient reduction makes of the ranks' gradients) is the mean over the sequences."""
        hidden, labels, mask = self._flat(hidden, labels, loss_mask)
        cp_group = context_group()
        if denominator is None and cp_group is not None:
            count = mask.sum().detach()
            dist.all_reduce(count, group=cp_group)
            denominator = count.clamp(min=1.0)
        if torch.is_grad_enabled() and hidden.requires_grad and parallel_state.get_tensor_model_parallel_world_size() == 1:
            weight = self.word_embeddings.weight if self.shape.tie_word_embeddings else self.output_layer.weight
            return fused.linear_cross_entropy(hidden[0], weight, labels[0], mask[0],
                                              self.shape.loss_chunk_tokens or hidden.shape[1], denominator)
        return self._chunked_loss(hidden, labels, mask, denominator)

    def sequence_logprobs(self, tokens, labels, loss_mask, fp32: bool = True):
        """[b]: sum over positions where `loss_mask` is set of log p(label | tokens before), from the
        vocabulary-parallel logits (fp32 when `fp32`, else the model's dtype; upstream's dpo_fp32/kto_fp32)."""
        logits = self.logits_parallel(self.hidden_states(tokens))
        logits = logits.float() if fp32 else logits
        mask = loss_mask.float()
        targets = torch.where(mask > 0, labels, torch.zeros_like(labels))  # -100 would index nothing
        nll = tp.vocab_parallel_cross_entropy(logits.contiguous(), targets)
        return -(nll.float() * mask).sum(-1)

    def reward(self, tokens, loss_mask):
        """[b]: the reward head's value at each row's last trained position (upstream reads the position of
        the one target `--for-rm` leaves: the final end-of-sequence token)."""
        values = self.rm_linear(self.hidden_states(tokens)).squeeze(-1)
        positions = torch.arange(values.shape[1], device=values.device)
        last = ((loss_mask > 0) * positions).argmax(-1)
        return values.gather(1, last[:, None]).squeeze(1)

    def chunked_loss(self, tokens, labels, loss_mask=None, position_ids=None, segment_ids=None, denominator=None):
        """The loss as TP>1 computes it at any TP size: the head and vocab-parallel cross-entropy over
        chunks of `loss_chunk_tokens`, each checkpointed when training."""
        hidden = self.hidden_states(tokens, position_ids, segment_ids=segment_ids)
        return self._chunked_loss(*self._flat(hidden, labels, loss_mask), denominator)

    @staticmethod
    def _flat(hidden, labels, loss_mask):
        """Final hidden states [1, b*s, h], labels [1, b*s] and the float loss mask [1, b*s] (ones if none)."""
        b, s, h = hidden.shape
        labels = labels.reshape(1, b * s)
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.reshape(1, b * s).float()
        return hidden.reshape(1, b * s, h), labels, mask

    def _chunked_loss(self, hidden, labels, mask, denominator=None):
        n = hidden.shape[1]
        step = self.shape.loss_chunk_tokens or n
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, step):
            end = min(start + step, n)
            if self.training and step < n:
                total = total + checkpoint(self._chunk_loss, hidden[:, start:end], labels[:, start:end],
                                           mask[:, start:end])
            else:
                total = total + self._chunk_loss(hidden[:, start:end], labels[:, start:end], mask[:, start:end])
        return total / (mask.sum().clamp(min=1.0) if denominator is None else denominator)

    def _chunk_loss(self, hidden, labels, mask):
        logits = self.logits_parallel(hidden)
        if self.shape.full_precision_loss:
            logits = logits.float()
        losses = tp.vocab_parallel_cross_entropy(logits.contiguous(), labels)
        return (losses.float() * mask).sum()


def mark_sequence_parallel_parameters(model: NeoXModel) -> None:
    """Mark `sequence_parallel = True` on the parameters that every TP rank holds whole but that see only its
    sequence slice under sequence parallelism: those of the transformer layers and the final norm that
    megatron-core did not split (norms, row-parallel biases). Their gradients are partial sums that must be
    added over the TP group (see neox_fork.parallel.groups.sum_sequence_parallel_grads)."""
    for module in (model.layers, model.final_norm):
        for p in module.parameters():
            if not getattr(p, "tensor_model_parallel", False):
                p.sequence_parallel = True


def _run_layers(layers, x, rotary, cos, sin, caches=None, mask=None):
    for i, layer in enumerate(layers):
        x = layer(x, rotary, cos, sin, caches[i] if caches else None, mask)
    return x


def model_parallel_config(tensor_parallel_size: int, dtype: str = "fp32",
                          sequence_parallel: bool = False) -> ModelParallelConfig:
    """CPU initialisation on every device: the full weight is drawn from the default RNG and each rank
    keeps its slice, so a model built at TP=N equals the same seed at TP=1 after merging."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
    )


def build_model(config: NeoXConfig, tokenizer_vocab_size: int | None = None, *,
                perform_initialization: bool = True, sizing_only: bool = False) -> NeoXModel:
    """The model for this rank (parallel groups must be initialised; see neox_fork.parallel.groups). `sizing_only`
    builds even a model that cannot run, as upstream does (MLP widths that do not pair), to count it."""
    if not sizing_only:
        check_runnable(config)
    shape = ModelShape.from_config(config, tokenizer_vocab_size)
    mp = model_parallel_config(parallel_state.get_tensor_model_parallel_world_size(), config.dtype_name,
                               shape.sequence_parallel)
    mp.perform_initialization = perform_initialization
    model = NeoXModel(shape, mp)
    spec = LoraSpec.from_config(config)
    if spec is not None:  # adapters on the target linears, every other weight frozen (model/adapters.py)
        add_lora(model, spec)
    return model
