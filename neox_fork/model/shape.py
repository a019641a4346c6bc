"""The shape of a model: what the model needs from the config, resolved (padded vocabulary included), and its
parameter count by formula (tools/model_summary.py sizes a config with it, without building the model)."""

from __future__ import annotations

from dataclasses import dataclass

from neox_fork.config.neox_config import NeoXConfig


@dataclass(frozen=True)
class MoEShape:
    """Mixture of experts (neox_fork/model/moe.py): which layers, how many experts, how tokens are routed."""

    num_experts: int
    top_k: int
    interval: int  # layer i (from 0) has experts when i % interval == 0, as upstream
    router_type: str  # sinkhorn or topk
    normalize_weights: bool  # topk: the k chosen softmax weights renormalised to sum 1
    aux_loss_coeff: float  # topk: Switch load-balancing loss coefficient, per MoE layer
    router_fp32: bool  # moe_lbl_in_fp32: router logits (and the balancing loss) in fp32
    jitter_eps: float | None
    grouped_gemm: bool | None = None  # moe_grouped_gemm: None picks by device and dtype (moe.Experts.grouped)

    def is_moe_layer(self, layer_number: int) -> bool:
        return layer_number % self.interval == 0

    @classmethod
    def from_config(cls, c: NeoXConfig) -> "MoEShape | None":
        if c.moe_num_experts <= 1:
            return None
        return cls(num_experts=c.moe_num_experts, top_k=c.moe_top_k, interval=c.moe_expert_interval,
                   router_type=c.moe_router_type, normalize_weights=c.moe_normalize_expert_weights,
                   aux_loss_coeff=c.moe_aux_loss_coeff, router_fp32=c.moe_lbl_in_fp32, jitter_eps=c.moe_jitter_eps,
                   grouped_gemm=c.moe_grouped_gemm)


@dataclass
class ModelShape:
    """What the model needs from the config, resolved (padded vocabulary included)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int  # linear2's input: the MLP width (of each branch when gated)
    vocab_size: int  # padded
    rotary_dim: int
    rotary_base: float
    max_positions: int
    norm_eps: float
    norm_bias: bool
    tie_word_embeddings: bool
    init_std: float
    init_method: str
    output_layer_init_method: str
    attention_types: list
    hidden_dropout: float
    attention_dropout: float
    checkpoint_activations: bool  # full recompute: each group of layers re-runs its forward in the backward
    checkpoint_num_layers: int
    full_precision_loss: bool
    loss_chunk_tokens: int  # 0: compute the loss for all tokens at once
    torch_compile: bool = False  # compile each transformer layer for training (see NeoXModel.compile_layers)
    selective_recompute: bool = False  # recompute only rotary + the attention core (Attention.forward)
    sequence_parallel: bool = False  # split norm/dropout/residual regions over the sequence when training at TP>1
    num_kv_heads: int | None = None  # None: one key/value head per query head
    norm: str = "layernorm"  # or "rmsnorm"
    mlp_gated: bool = True
    activation: str = "silu"  # of the gate when gated
    attn_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False
    learned_positions: bool = False
    mlp_out: int = 0  # linear1's outputs; 0: (2 if gated else 1) x ffn_hidden_size
    sliding_window: int | None = None  # each query sees itself and this many keys before it
    qk_norm: bool = False  # upstream's use_qk_layernorm: `norm` over [heads, head_dim] of q and k, before rotary
    reward_model: bool = False  # train_impl rm: a one-output head (rm_linear) replaces the LM head
    rope_scaling: dict | None = None  # the config's rope_scaling (model/rope_scaling.py); None: plain rotary
    moe: MoEShape | None = None  # None: dense MLPs in every layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @classmethod
    def from_config(cls, c: NeoXConfig, tokenizer_vocab_size: int | None = None) -> "ModelShape":
        rms = c.norm == "rmsnorm"
        return cls(
            num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
            ffn_hidden_size=c.ffn_hidden_size, vocab_size=c.padded_vocab_size(tokenizer_vocab_size),
            rotary_dim=c.rotary_dim, rotary_base=float(c.rotary_emb_base), max_positions=c.max_positions,
            norm_eps=c.rms_norm_epsilon if rms else c.layernorm_epsilon, norm_bias=c.use_bias_in_norms and not rms,
            tie_word_embeddings=c.tie_word_embeddings, init_std=c.init_method_std,
            init_method=c.init_method, output_layer_init_method=c.output_layer_init_method,
            attention_types=c.attention_types, hidden_dropout=c.hidden_dropout,
            attention_dropout=c.attention_dropout, checkpoint_activations=c.activation_recompute == "full",
            checkpoint_num_layers=c.checkpoint_num_layers,
            full_precision_loss=c.full_precision_lm_cross_entropy,
            loss_chunk_tokens=4096 if c.fused_cross_entropy else 0, torch_compile=c.torch_compile,
            selective_recompute=c.activation_recompute == "selective",
            sequence_parallel=c.sequence_parallel or c.partition_activations,
            num_kv_heads=c.kv_heads, norm=c.norm, mlp_gated=c.mlp_gated, activation=c.mlp_activation,
            attn_bias=c.use_bias_in_attn_linear, mlp_bias=c.use_bias_in_mlp, parallel_residual=c.gpt_j_residual,
            learned_positions=c.pos_emb == "learned", mlp_out=c.mlp_widths[0],
            sliding_window=c.sliding_window_width, qk_norm=c.use_qk_layernorm, reward_model=c.train_impl == "rm",
            rope_scaling=c.rope_scaling,
            moe=MoEShape.from_config(c),
        )


def count_parameters(shape: ModelShape, active: bool = False) -> int:
    """Parameters of the whole (unsharded) model, by formula; checked against a meta-device build. `active`:
    those one token uses (an MoE layer's router and its top-k experts; embeddings and head count in both)."""
    s = shape
    h, f, L, v, d = s.hidden_size, s.ffn_hidden_size, s.num_layers, s.vocab_size, s.head_dim
    norm = 2 * h if s.norm_bias else h
    qkv = (s.num_heads + 2 * s.kv_heads) * d
    attention = h * qkv + h * h + (qkv + h if s.attn_bias else 0)
    linear1 = s.mlp_out or (2 if s.mlp_gated else 1) * f
    mlp = h * linear1 + f * h + (linear1 + h if s.mlp_bias else 0)
    heads = 1 if s.tie_word_embeddings or s.reward_model else 2
    positions = s.max_positions * h if s.learned_positions else 0
    qk_norm = (2 if s.norm != "rmsnorm" else 1) * s.num_heads * d if s.qk_norm else 0
    mlps = L * mlp
    if s.moe is not None:  # experts have no biases (as upstream's); the router is a [experts, h] weight
        moe_layers = sum(s.moe.is_moe_layer(i) for i in range(L))
        expert = h * linear1 + f * h
        used = s.moe.top_k if active else s.moe.num_experts
        mlps = (L - moe_layers) * mlp + moe_layers * (used * expert + s.moe.num_experts * h)
    return L * (attention + 2 * norm + qk_norm) + mlps + heads * v * h + positions + norm + (h if s.reward_model else 0)
