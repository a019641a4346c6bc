"""Name and layout mapping between our (merged, TP=1) state dict and each family's Hugging Face class.

    GPTNeoXForCausalLM   LayerNorm with bias, plain (non-gated) MLP with biases, multi-head attention,
                         sequential or parallel residual (gpt_j_residual), partial rotary: Pythia, GPT-NeoX
    LlamaForCausalLM     RMSNorm, SwiGLU, full rotary, grouped-query attention, optional biases: Llama(-2)
    MistralForCausalLM   Llama's layout with no linear biases and a sliding window (sliding_window_width W: a
                         query sees itself and W keys before it, so HF's `sliding_window` is W + 1)
    StableLmForCausalLM  LayerNorm with bias, SwiGLU, no linear biases, partial rotary: StableLM-3B-4E1T
    MixtralForCausalLM   Mistral's block with an MoE block in every layer: softmax over the experts, the top k
                         renormalised to sum 1 (moe_router_type topk, moe_normalize_expert_weights), SwiGLU experts

`family(config)` picks the class from the architecture keys (or says in one line why none fits).
The layouts that need care:
- our fused `query_key_value` holds one [q heads of the group..., k, v] block of rows per key/value head;
  GPTNeoX keeps that fused tensor (multi-head: per head [q, k, v]); Llama and StableLm split q, k, v;
- our gated `mlp.linear1` is [up; gate]: HF's `up_proj` is the first half and `gate_proj` the second;
- an expert's `linear_fc1` (megatron-core's gated MLP: activation(first half) x second half) is [gate; up]:
  Mixtral's `w1` (gate) is the first half, `w3` (up) the second; `linear_fc2` is `w2`. Exports write the
  per-expert tensors of the released checkpoints (transformers 5 loads them into its fused experts and saves
  them so); imports read those or transformers 5's fused `experts.gate_up_proj` ([E, gate; up, h]) and `down_proj`;
- our RMSNorm weight is `scale` (as upstream gpt-neox), HF's is `weight`;
- `rope_parameters` is rotary_emb_base, rotary_pct and `rope_scaling` (its type and transformers' fields); for
  dynamic scaling HF's max_position_embeddings is our original_max_position_embeddings (docs/rope-scaling.md).
Everything else is a rename. Tensor-parallel shards are merged before this mapping (see checkpoint/store.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from neox_fork.config.neox_config import NeoXConfig
from neox_fork.data.tokenizer_export import save_hf_tokenizer
from neox_fork.config.dtypes import dtype_name, hf_dtype_name, neox_precision, torch_dtype
from neox_fork.errors import UserError
from neox_fork.checkpoint.neox_layout import QKVGroups, fuse_qkv, split_qkv
from neox_fork.config.rules import ROPE_NOT_BUILT, ROPE_SCALING_FIELDS
from neox_fork.model import rope_scaling
from neox_fork.model.adapters import ADAPTER_NAME, LoraSpec, is_adapter, merge_into

CLASSES = {"gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "stablelm": "StableLmForCausalLM", "mixtral": "MixtralForCausalLM"}

# (ours, HF) name templates per family; {layer} is a layer index, {param} weight or bias. Both directions.
_L = "layers.{layer}"
_NEOX = [
    ("word_embeddings.weight", "gpt_neox.embed_in.weight"),
    ("final_norm.{param}", "gpt_neox.final_layer_norm.{param}"),
    ("output_layer.weight", "embed_out.weight"),
    ("rm_linear.weight", "score.weight"),  # train_impl rm: *ForSequenceClassification's one-label head
    (f"{_L}.input_layernorm.{{param}}", f"gpt_neox.{_L}.input_layernorm.{{param}}"),
    (f"{_L}.post_attention_layernorm.{{param}}", f"gpt_neox.{_L}.post_attention_layernorm.{{param}}"),
    (f"{_L}.attention.query_key_value.{{param}}", f"gpt_neox.{_L}.attention.query_key_value.{{param}}"),
    (f"{_L}.attention.dense.{{param}}", f"gpt_neox.{_L}.attention.dense.{{param}}"),
    (f"{_L}.mlp.linear1.{{param}}", f"gpt_neox.{_L}.mlp.dense_h_to_4h.{{param}}"),
    (f"{_L}.mlp.linear2.{{param}}", f"gpt_neox.{_L}.mlp.dense_4h_to_h.{{param}}"),
]
_MODEL = [
    ("word_embeddings.weight", "model.embed_tokens.weight"),
    ("output_layer.weight", "lm_head.weight"),
    ("rm_linear.weight", "score.weight"),
    (f"{_L}.attention.dense.{{param}}", f"model.{_L}.self_attn.o_proj.{{param}}"),
    (f"{_L}.mlp.linear2.{{param}}", f"model.{_L}.mlp.down_proj.{{param}}"),
]
_NORMS = [("final_norm.{param}", "model.norm.{param}"),
          (f"{_L}.input_layernorm.{{param}}", f"model.{_L}.input_layernorm.{{param}}"),
          (f"{_L}.post_attention_layernorm.{{param}}", f"model.{_L}.post_attention_layernorm.{{param}}")]
_RMS_NORMS = [(ours.replace("{param}", "scale"), theirs.replace("{param}", "weight")) for ours, theirs in _NORMS]
_ROUTER = [(f"{_L}.mlp.moe.router.{{param}}", f"model.{_L}.block_sparse_moe.gate.{{param}}"),
           (f"{_L}.mlp.moe.router.{{param}}", f"model.{_L}.mlp.gate.{{param}}")]  # transformers 5's in-memory name
_RENAMES = {"gpt_neox": _NEOX, "llama": _MODEL + _RMS_NORMS, "mistral": _MODEL + _RMS_NORMS,
            "stablelm": _MODEL + _NORMS, "mixtral": _MODEL + _RMS_NORMS + _ROUTER}
_SPLIT = {"gpt_neox": False, "llama": True, "mistral": True, "stablelm": True,  # q/k/v, up/gate: separate HF tensors
          "mixtral": True}
_EXPERT = r"layers\.(\d+)\.mlp\.moe\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight"
_HF_EXPERT = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight"
_HF_FUSED_EXPERTS = r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"


def family(c: NeoXConfig) -> str:
    """The HF family that computes exactly what this config's model computes, or a UserError saying why none."""
    def refuse(why: str):
        raise UserError(f"{c.where('norm')}: no Hugging Face class computes this model ({why}); export supports "
                        "GPTNeoXForCausalLM, LlamaForCausalLM, MistralForCausalLM, StableLmForCausalLM and "
                        "MixtralForCausalLM architectures")

    if c.use_qk_layernorm:  # StableLm's qk_layernorm is a separate bias-free LayerNorm per head for q and k
        refuse("use_qk_layernorm: upstream's one norm over [heads, head_dim] shared by q and k is in no HF class")
    if c.pos_emb != "rotary":
        refuse(f"pos_emb {c.pos_emb!r}: GPTNeoX, Llama and StableLm all use rotary")
    if c.moe_num_experts > 1:
        return _moe_family(c, refuse)
    silu_gated = c.mlp_gated and c.mlp_activation == "silu"
    if silu_gated and c.norm == "rmsnorm":
        if c.gpt_j_residual or c.rotary_pct != 1:
            refuse("Llama has a sequential residual and full rotary")
        if c.sliding_window_width is None:
            return "llama"
        if c.use_bias_in_attn_linear or c.use_bias_in_mlp:
            refuse("sliding_window_width: Mistral has no linear biases")
        return "mistral"
    if c.sliding_window_width is not None:
        refuse("sliding_window_width: only Mistral (RMSNorm, SwiGLU) has a sliding window")
    if silu_gated and c.norm == "layernorm":
        if c.use_bias_in_attn_linear or c.use_bias_in_mlp or not c.use_bias_in_norms or c.gpt_j_residual:
            refuse("StableLm has LayerNorms with bias, no linear biases and a sequential residual with two norms")
        return "stablelm"
    if not c.mlp_gated and c.norm == "layernorm":
        if not (c.use_bias_in_mlp and c.use_bias_in_norms) or c.kv_heads != c.num_attention_heads:
            refuse("GPTNeoX has biases in its norms and MLP and one key/value head per query head")
        if c.mlp_activation not in ("gelu", "relu", "silu"):
            refuse(f"activation {c.activation!r}")
        return "gpt_neox"
    refuse(f"norm {c.norm!r} with activation {c.activation!r} and mlp_type {c.mlp_type!r}")


def _moe_family(c: NeoXConfig, refuse) -> str:
    """Mixtral, or why not. The HF classes whose router leaves the top-k softmax weights as they are
    (OlmoeForCausalLM, Qwen2MoeForCausalLM) have blocks this model has not: q/k norms over the whole
    projection (OLMoE) and a gated shared expert (Qwen2-MoE)."""
    if c.moe_router_type != "topk":
        refuse(f"moe_router_type {c.moe_router_type!r}: no HF class routes by Sinkhorn-balanced scores; "
               "MixtralForCausalLM is moe_router_type topk with moe_normalize_expert_weights true")
    if not c.moe_normalize_expert_weights:
        refuse("moe_normalize_expert_weights false: Mixtral renormalises the top-k weights, and the classes that do "
               "not (Olmoe: q/k norms, Qwen2Moe: a shared expert) have parts this model lacks")
    if c.moe_expert_interval != 1:
        refuse(f"moe_expert_interval {c.moe_expert_interval}: Mixtral has experts in every layer")
    if not (c.mlp_gated and c.mlp_activation == "silu"):
        refuse(f"activation {c.activation!r} with mlp_type {c.mlp_type!r}: Mixtral's experts are SwiGLU "
               "(mlp_type gated, activation silu)")
    if c.gpt_j_residual:
        refuse("gpt_j_residual (parallel residual): Mixtral's block is sequential")
    if c.norm != "rmsnorm" or c.rotary_pct != 1 or c.use_bias_in_attn_linear:
        refuse(f"norm {c.norm!r}, rotary_pct {c.rotary_pct}, use_bias_in_attn_linear {c.use_bias_in_attn_linear}: "
               "Mixtral has RMSNorm, full rotary and no attention biases")
    return "mixtral"


# upstream convert_neox_to_hf.py's --architecture values -> our family names
ARCHITECTURES = {"neox": "gpt_neox", "llama": "llama", "mistral": "mistral"}


def class_name(c: NeoXConfig) -> str:
    """The transformers class an export of `c` loads as: *ForCausalLM, or *ForSequenceClassification for a
    reward model (train_impl rm), as upstream's converter writes."""
    name = CLASSES[family(c)]
    return name.replace("ForCausalLM", "ForSequenceClassification") if c.train_impl == "rm" else name


def check_architecture(c: NeoXConfig, architecture: str | None) -> None:
    """One line when upstream's --architecture names another family than the config exports as."""
    if architecture is None:
        return
    if architecture not in ARCHITECTURES:
        raise UserError(f"--architecture {architecture!r}: valid: {', '.join(ARCHITECTURES)}")
    fam = family(c)
    if ARCHITECTURES[architecture] != fam:
        named = {v: k for k, v in ARCHITECTURES.items()}.get(fam)
        hint = f"--architecture {named}" if named else "leave --architecture out"
        raise UserError(f"--architecture {architecture}: this checkpoint's model exports as {CLASSES[fam]} "
                        f"({hint}); the architecture comes from its config")


def _pattern(template: str) -> str:
    return (re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
            .replace(r"\{param\}", r"(?P<param>weight|bias)"))


def _rename(name: str, fam: str, to_hf: bool) -> str | None:
    for ours, theirs in _RENAMES[fam]:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        if m := re.fullmatch(_pattern(source), name):
            return target.format(**m.groupdict())
    return None


def _qkv_groups(c: NeoXConfig) -> QKVGroups:
    return QKVGroups(c.kv_heads, c.num_attention_heads // c.kv_heads, c.head_dim)


def to_hf_state_dict(state: dict[str, torch.Tensor], c: NeoXConfig) -> dict[str, torch.Tensor]:
    """Our merged model state -> the HF family's tensor names and layouts (same dtypes, contiguous)."""
    fam = family(c)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        if e := re.fullmatch(_EXPERT, name):
            i, expert, fc = e.groups()
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{expert}"
            parts = {"w1": tensor.chunk(2)[0], "w3": tensor.chunk(2)[1]} if fc == "1" else {"w2": tensor}
            out.update({f"{prefix}.{w}.weight": t.contiguous() for w, t in parts.items()})
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(attention\.query_key_value|mlp\.linear1)\.(weight|bias)", name)
        if m and _SPLIT[fam]:
            i, kind, param = m.groups()
            if kind == "mlp.linear1":
                names, parts = ("up_proj", "gate_proj"), tensor.chunk(2, dim=0)
                prefix = f"model.layers.{i}.mlp"
            else:
                names, parts = ("q_proj", "k_proj", "v_proj"), split_qkv(tensor, _qkv_groups(c))
                prefix = f"model.layers.{i}.self_attn"
            for part, t in zip(names, parts):
                out[f"{prefix}.{part}.{param}"] = t.contiguous()
        elif (target := _rename(name, fam, to_hf=True)) is not None:
            out[target] = tensor.contiguous()
        else:
            raise KeyError(f"no {CLASSES[fam]} name for parameter {name}")
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], c: NeoXConfig) -> dict[str, torch.Tensor]:
    """HF tensors of the config's family -> our merged model state (the inverse of to_hf_state_dict)."""
    fam = family(c)
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    experts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if fam == "mixtral" and (e := re.fullmatch(_HF_EXPERT, name)):
            i, expert, w = e.groups()
            experts.setdefault((i, expert), {})[f"w{w}"] = tensor
            continue
        if fam == "mixtral" and (e := re.fullmatch(_HF_FUSED_EXPERTS, name)):
            i, kind = e.groups()
            for expert, t in enumerate(tensor.unbind(0)):
                fc = "linear_fc1" if kind == "gate_up_proj" else "linear_fc2"
                out[f"layers.{i}.mlp.moe.experts.local_experts.{expert}.{fc}.weight"] = t.clone()
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|up|gate)_proj\.(weight|bias)", name)
        if m and _SPLIT[fam]:
            i, block, part, param = m.groups()
            pending.setdefault((i, block, param), {})[part] = tensor
        elif (target := _rename(name, fam, to_hf=False)) is not None:
            out[target] = tensor
        elif not re.search(r"rotary_emb\.inv_freq|attention\.(masked_)?bias$", name):
            raise UserError(f"Hugging Face weight '{name}' has no place in this {CLASSES[fam]} model "
                            "(e.g. qk-layernorm is not supported)")
    for (i, expert), w in experts.items():
        if w.keys() != {"w1", "w2", "w3"}:
            raise UserError(f"Hugging Face Mixtral layer {i} expert {expert} has {', '.join(sorted(w))}; "
                            "each expert needs w1, w2 and w3")
        prefix = f"layers.{i}.mlp.moe.experts.local_experts.{expert}"
        out[f"{prefix}.linear_fc1.weight"] = torch.cat((w["w1"], w["w3"]))
        out[f"{prefix}.linear_fc2.weight"] = w["w2"]
    for (i, block, param), parts in pending.items():
        if block == "mlp":
            out[f"layers.{i}.mlp.linear1.{param}"] = torch.cat((parts["up"], parts["gate"]))
        else:
            out[f"layers.{i}.attention.query_key_value.{param}"] = fuse_qkv(parts["q"], parts["k"], parts["v"], _qkv_groups(c))
    return out


def _rope(c: NeoXConfig) -> dict:
    """rope_parameters: the base, the rotary fraction and rope_scaling's type and fields as transformers names them.
    dynamic's threshold is HF's max_position_embeddings (see `_max_positions`), not a field."""
    kind = rope_scaling.rope_type(c.rope_scaling)
    fields = {k: v for k, v in (c.rope_scaling or {}).items() if k not in ("rope_type", "type")}
    if kind == "dynamic":
        fields.pop("original_max_position_embeddings", None)
    return {"rope_type": kind, "rope_theta": float(c.rotary_emb_base), "partial_rotary_factor": c.rotary_pct, **fields}


def _max_positions(c: NeoXConfig) -> int:
    """HF's max_position_embeddings: ours, but for dynamic scaling the length where the scaling starts
    (transformers' dynamic threshold is max_position_embeddings)."""
    if rope_scaling.rope_type(c.rope_scaling) == "dynamic":
        return c.rope_scaling.get("original_max_position_embeddings", c.max_positions)
    return c.max_positions


def hf_config_dict(c: NeoXConfig, padded_vocab_size: int, dtype: str, eos_token_id: int = 0,
                   bos_token_id: int = 0) -> dict:
    """config.json for the config's HF family."""
    fam = family(c)
    reward = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if c.train_impl == "rm" else {}
    common = {
        **reward,  # a reward model leaves as the family's *ForSequenceClassification with one label
        "architectures": [class_name(c)],
        "model_type": fam,
        "vocab_size": padded_vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "hidden_act": c.mlp_activation,
        "max_position_embeddings": _max_positions(c),
        "initializer_range": c.init_method_std,
        "use_cache": True,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": float(c.rotary_emb_base),
        "rope_parameters": _rope(c),
        "attention_dropout": c.attention_dropout,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": hf_dtype_name(dtype),
    }
    if fam == "gpt_neox":
        return {**common, "layer_norm_eps": c.layernorm_epsilon, "rotary_pct": c.rotary_pct,
                "rotary_emb_base": c.rotary_emb_base, "use_parallel_residual": c.gpt_j_residual,
                "attention_bias": c.use_bias_in_attn_linear, "hidden_dropout": c.hidden_dropout}
    if fam == "llama":
        return {**common, "num_key_value_heads": c.kv_heads, "rms_norm_eps": c.rms_norm_epsilon,
                "attention_bias": c.use_bias_in_attn_linear, "mlp_bias": c.use_bias_in_mlp,
                "head_dim": c.head_dim}
    if fam == "mistral":
        return {**common, "num_key_value_heads": c.kv_heads, "rms_norm_eps": c.rms_norm_epsilon,
                "head_dim": c.head_dim, "sliding_window": c.sliding_window_width + 1}
    if fam == "mixtral":  # jitter is training-only and not carried (transformers' jitters the experts' inputs too)
        window = c.sliding_window_width
        return {**common, "num_key_value_heads": c.kv_heads, "rms_norm_eps": c.rms_norm_epsilon,
                "head_dim": c.head_dim, "sliding_window": None if window is None else window + 1,
                "num_local_experts": c.moe_num_experts, "num_experts_per_tok": c.moe_top_k,
                "router_jitter_noise": 0.0, "output_router_logits": False}
    return {**common, "num_key_value_heads": c.kv_heads, "layer_norm_eps": c.layernorm_epsilon,
            "partial_rotary_factor": c.rotary_pct, "use_qkv_bias": False, "qk_layernorm": False,
            "use_parallel_residual": False, "hidden_dropout": c.hidden_dropout}


# MoE classes whose block has parts our model has not (what each computes beyond Mixtral's block)
MOE_NOT_IMPORTABLE = {
    "olmoe": "q and k RMSNorms over the whole projections; use_qk_layernorm is one norm per head shared by q and k",
    "qwen2_moe": "a sigmoid-gated shared expert beside the routed ones, and q/k/v biases",
    "qwen3_moe": "q and k RMSNorms per head",
    "deepseek_v2": "multi-head latent attention and shared experts",
    "deepseek_v3": "multi-head latent attention, shared experts and sigmoid routing with a bias",
}


def config_from_hf(hf: dict) -> dict:
    """Our config keys (NeoX names) for an HF GPTNeoX, Llama, Mistral, StableLm or Mixtral config.json; the caller adds
    the rest."""
    kind = hf.get("model_type")
    if kind in MOE_NOT_IMPORTABLE:
        raise UserError(f"config.json model_type {kind!r}: not importable ({MOE_NOT_IMPORTABLE[kind]}); the "
                        "mixture-of-experts class importable is mixtral")
    if kind not in CLASSES:
        raise UserError(f"config.json model_type is {kind!r}; importable: {', '.join(CLASSES)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scaling = _rope_scaling_from_hf(hf, rope)
    heads = hf["num_attention_heads"]
    if (hf.get("head_dim") or hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
        raise UserError(f"config.json head_dim {hf['head_dim']} is not hidden_size / num_attention_heads; "
                        "such models are not supported")
    positions = hf["max_position_embeddings"]
    if scaling and scaling["rope_type"] == "dynamic":  # HF's max_position_embeddings is where scaling starts
        positions = int(positions * scaling.get("factor", 1))
    keys = {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_attention_heads": heads,
        "intermediate_size": hf["intermediate_size"],
        "seq_length": positions,
        "max_position_embeddings": positions,
        "rope_scaling": scaling,
        "vocab_size": hf["vocab_size"],
        "pos_emb": "rotary",
        "rotary_emb_base": int(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000)))),
        "no_weight_tying": not hf.get("tie_word_embeddings", False),
        "init_method_std": hf.get("initializer_range", 0.02),
        "gpt_j_residual": False,
    }
    kv = hf.get("num_key_value_heads") or heads
    if kind == "gpt_neox":
        if hf.get("hidden_act", "gelu") not in ("gelu", "relu", "silu"):
            raise UserError(f"config.json hidden_act {hf.get('hidden_act')!r} is not supported; valid: gelu, relu, silu")
        return {**keys, "norm": "layernorm", "layernorm_epsilon": hf.get("layer_norm_eps", 1e-5),
                "use_bias_in_norms": True, "mlp_type": "regular", "activation": hf.get("hidden_act", "gelu"),
                "use_bias_in_mlp": True, "use_bias_in_attn_linear": hf.get("attention_bias", True),
                "gpt_j_residual": hf.get("use_parallel_residual", True),
                "rotary_pct": rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))}
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json hidden_act {hf.get('hidden_act')!r} is not supported for {kind}; only silu")
    gated = {**keys, "mlp_type": "gated", "activation": "silu", "num_kv_heads": kv if kv != heads else None}
    if kind in ("mistral", "mixtral"):
        window = hf.get("sliding_window")
        mistral = {**gated, "norm": "rmsnorm", "rms_norm_epsilon": hf.get("rms_norm_eps", 1e-6),
                   "use_bias_in_norms": False, "use_bias_in_mlp": False, "use_bias_in_attn_linear": False,
                   "rotary_pct": 1.0, "sliding_window_width": None if window is None else window - 1}
        if kind == "mistral":
            return mistral
        # Mixtral's router: softmax over the experts, the top k renormalised; every layer has experts
        return {**mistral, "moe_num_experts": hf["num_local_experts"], "moe_top_k": hf["num_experts_per_tok"],
                "moe_router_type": "topk", "moe_normalize_expert_weights": True, "moe_expert_interval": 1}
    if kind == "llama":
        return {**gated, "norm": "rmsnorm", "rms_norm_epsilon": hf.get("rms_norm_eps", 1e-6),
                "use_bias_in_norms": False, "use_bias_in_mlp": hf.get("mlp_bias", False),
                "use_bias_in_attn_linear": hf.get("attention_bias", False),
                "rotary_pct": rope.get("partial_rotary_factor", 1.0)}
    for key, ok in (("use_qkv_bias", False), ("qk_layernorm", False), ("use_parallel_residual", False)):
        if hf.get(key, False) != ok:
            raise UserError(f"config.json {key}={hf.get(key)} is not supported; only {ok} is")
    return {**gated, "norm": "layernorm", "layernorm_epsilon": hf.get("layer_norm_eps", 1e-5),
            "use_bias_in_norms": True, "use_bias_in_mlp": False, "use_bias_in_attn_linear": False,
            "rotary_pct": rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))}


def _rope_scaling_from_hf(hf: dict, rope: dict) -> dict | None:
    """Our rope_scaling for config.json's rope_parameters (or transformers 4's rope_scaling): its type and
    fields, less rope_theta and partial_rotary_factor (rotary_emb_base and rotary_pct here); None for plain RoPE.
    A dynamic model's max_position_embeddings becomes its original_max_position_embeddings (`_max_positions`)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_SCALING_FIELDS:
        why = f" ({ROPE_NOT_BUILT[kind]})" if kind in ROPE_NOT_BUILT else ""
        raise UserError(f"config.json rope type {kind!r} is not supported{why}; built: "
                        f"{', '.join(ROPE_SCALING_FIELDS)}")
    if kind == "default":
        return None
    fields = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    if kind == "dynamic":
        fields["original_max_position_embeddings"] = hf["max_position_embeddings"]
    elif "original_max_position_embeddings" in hf:  # transformers prefers a top-level one (Phi-3 style)
        fields["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return {"rope_type": kind, **fields}


# ---------------------------------------------------------------------- folders
MAX_SHARD_SIZE = "5GB"


def export_folder(ckpt_path, output_dir, dtype: str | None = None, step: int | None = None,
                  trust: bool = False, *, config_file=None, architecture: str | None = None,
                  save_tokenizer: bool = True, tokenizer_is_hf_folder: bool = False,
                  pad_token_id: int | None = None, peft_adapter=None) -> Path:
    """A checkpoint (any TP size) -> a Hugging Face folder of its family's class, written atomically. A LoRA
    checkpoint exports merged (W + s B A); `peft_adapter` names a folder for its PEFT adapter as well.

    `config_file` replaces the step folder's config; `architecture` (upstream's neox/llama/mistral) must be the
    family the config exports as; the other keywords are upstream's converter flags (see checkpoint/hf_cli.py). A
    checkpoint that carries a chat template (TokenizerSource.chat_files) exports its transformers tokenizer
    folder as is (chat template, eos token), with the template's end-of-turn tokens as generation's eos ids."""
    import json

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from neox_fork.checkpoint import store as checkpoint

    state, config, folder = checkpoint.load_merged(ckpt_path, step, trust)
    if config_file:
        from neox_fork.config.loading import load_config

        config = load_config(config_file)
    check_architecture(config, architecture)
    if peft_adapter is not None:
        export_peft_adapter(state, config, peft_adapter, dtype)
    if any(is_adapter(k) for k in state):  # a LoRA checkpoint: the merged model W + s B A
        state = merge_into(state, lora_scale(config))
    tensors = to_hf_state_dict(state, config)
    if dtype is None:
        dtype = dtype_name(state["word_embeddings.weight"].dtype)
    tensors = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in tensors.items()}
    vocab = state["word_embeddings.weight"].shape[0]
    tokenizer = checkpoint.tokenizer_of(folder, config)
    eos = tokenizer.build().eod if tokenizer else 0
    stops = [eos]  # generation ends at these: the eod, or a chat template's end-of-turn tokens
    chat = bool(tokenizer and tokenizer.chat_files())
    if chat:
        from neox_fork.data.chat import checkpoint_chat_tokenizer, end_of_turn_ids

        stops = end_of_turn_ids(checkpoint_chat_tokenizer(tokenizer, str(folder))) or stops

    weights = sum(t.numel() * t.element_size() for t in tensors.values()), "the converted model"
    with checkpoint.atomic_folder(output_dir, needed=weights) as tmp:
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_SIZE)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = hf_config_dict(config, vocab, dtype, eos_token_id=stops[0], bos_token_id=eos)
        if pad_token_id is not None:
            hf_config["pad_token_id"] = pad_token_id
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        generation = {"bos_token_id": eos, "eos_token_id": stops if len(stops) > 1 else stops[0],
                      "do_sample": True, "temperature": 0.75,
                      "top_p": 0.95}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer and save_tokenizer:
            save_hf_tokenizer(tokenizer, tmp, config.max_positions, pad_token_id=pad_token_id,
                              from_hf_folder=tokenizer_is_hf_folder or chat)
    return Path(output_dir)


def lora_scale(c: NeoXConfig) -> float:
    spec = LoraSpec.from_config(c)
    if spec is None:
        raise UserError(f"{c.where('adapter')}: the checkpoint holds LoRA adapters but its config has no adapter: lora; "
                        "give the config it was trained with (--config-file)")
    return spec.scale


def peft_adapter_tensors(state: dict[str, torch.Tensor], c: NeoXConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our merged adapters -> (peft's adapter_model tensors for the config's HF class, its target_modules).

    Each HF module gets its own (A, B): where the HF class splits a fused matrix (Llama/StableLm/Mistral's
    q/k/v and up/gate), each part keeps the whole A and takes its rows of B, split exactly as the full export
    splits W's rows (B's rows are W's), so every part's update is its rows of s B A."""
    out, targets = {}, set()
    for name in sorted(state):
        if not name.endswith(f".{ADAPTER_NAME}.A"):
            continue
        prefix = name[: -len(f".{ADAPTER_NAME}.A")]
        a, b = state[name], state[f"{prefix}.{ADAPTER_NAME}.B"]
        for hf_name, b_part in to_hf_state_dict({f"{prefix}.weight": b}, c).items():
            module = hf_name[: -len(".weight")]
            targets.add(module.rsplit(".", 1)[1])
            out[f"base_model.model.{module}.lora_A.weight"] = a.clone()  # each its own copy (safetensors)
            out[f"base_model.model.{module}.lora_B.weight"] = b_part.contiguous()
    if not out:
        raise UserError("--peft-adapter: the checkpoint holds no LoRA adapters (train with adapter: lora)")
    return out, sorted(targets)


def export_peft_adapter(state: dict[str, torch.Tensor], c: NeoXConfig, output_dir, dtype: str | None = None) -> Path:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained
    loads on top of this checkpoint's base exported to Hugging Face."""
    import json

    from safetensors.torch import save_file

    from neox_fork.checkpoint import store as checkpoint

    tensors, targets = peft_adapter_tensors(state, c)
    if dtype is not None:
        tensors = {k: v.to(torch_dtype(dtype)) for k, v in tensors.items()}
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.lora_r, "lora_alpha": c.lora_alpha,
                   "lora_dropout": c.lora_dropout, "use_rslora": c.use_rslora, "target_modules": targets,
                   "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                   "modules_to_save": None, "use_dora": False, "base_model_name_or_path": None}
    with checkpoint.atomic_folder(output_dir) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return Path(output_dir)


def read_hf_config(hf_dir) -> dict:
    import json

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"'{hf_dir}' is not a Hugging Face model folder: no config.json")
    return json.loads((hf_dir / "config.json").read_text())


def read_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder with one or many safetensors files."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{hf_dir}' has no *.safetensors weights (convert .bin weights with transformers first)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def import_folder(hf_dir, output_dir, tp: int = 1, extra_config: dict | None = None) -> Path:
    """A Hugging Face GPTNeoX, Llama, Mistral, StableLm or Mixtral folder -> our checkpoint at step 0, split over `tp` ranks."""
    from neox_fork.checkpoint import store as checkpoint
    from neox_fork.config.loading import from_dict

    hf_config = read_hf_config(hf_dir)
    keys = config_from_hf(hf_config)  # a model we cannot build is refused before its weights are read
    tensors = read_hf_tensors(hf_dir)
    # keep the vocabulary exactly as released: pick the padding multiple that already divides it
    keys.update(checkpoint.vocab_keys_for(keys["vocab_size"], tp, f"{hf_dir}/config.json"))
    embed = "gpt_neox.embed_in.weight" if hf_config.get("model_type") == "gpt_neox" else "model.embed_tokens.weight"
    keys["precision"] = neox_precision(dtype_name(tensors[embed].dtype))
    tokenizer = Path(hf_dir) / "tokenizer.json"
    if tokenizer.is_file():
        keys["tokenizer_type"] = "HFTokenizer"
        keys["vocab_file"] = str(checkpoint.step_dir(Path(output_dir).resolve(), 0) / checkpoint.TOKENIZER_FILE)
    keys.update(extra_config or {})
    config = from_dict(keys, source=f"{hf_dir}/config.json")
    state = from_hf_state_dict(tensors, config)
    if config.tie_word_embeddings:
        state.pop("output_layer.weight", None)
    return checkpoint.save_model_checkpoint(output_dir, 0, checkpoint.split_tp(state, tp), config,
                                            tokenizer if tokenizer.is_file() else None)
