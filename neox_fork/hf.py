"""Name and layout mapping between our (merged, TP=1) state dict and transformers' StableLmForCausalLM.

The two layouts that need care:
- our fused `query_key_value` is per head, [heads, 3, head_dim, hidden] (GPT-NeoX's layout): q, k, v are
  taken per head, not as three contiguous blocks;
- our `mlp.linear1` is [up; gate]: HF's `up_proj` is the first half and `gate_proj` the second.
Everything else is a rename. Tensor-parallel shards are merged before this mapping (see checkpoint.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from neox_fork.config import NeoXConfig
from neox_fork.errors import UserError

# (ours, HF) name templates; {layer} is a layer index, {param} weight or bias. Used in both directions.
_RENAMES = [
    ("word_embeddings.weight", "model.embed_tokens.weight"),
    ("final_norm.{param}", "model.norm.{param}"),
    ("output_layer.weight", "lm_head.weight"),
    ("layers.{layer}.input_layernorm.{param}", "model.layers.{layer}.input_layernorm.{param}"),
    ("layers.{layer}.post_attention_layernorm.{param}", "model.layers.{layer}.post_attention_layernorm.{param}"),
    ("layers.{layer}.attention.dense.weight", "model.layers.{layer}.self_attn.o_proj.weight"),
    ("layers.{layer}.mlp.linear2.weight", "model.layers.{layer}.mlp.down_proj.weight"),
]


def _pattern(template: str) -> str:
    return (re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
            .replace(r"\{param\}", r"(?P<param>weight|bias)"))


def _rename(name: str, to_hf: bool) -> str | None:
    for ours, theirs in _RENAMES:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        if m := re.fullmatch(_pattern(source), name):
            return target.format(**m.groupdict())
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Our merged model state -> HF tensor names and layouts (same dtypes, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        if m := re.fullmatch(r"layers\.(\d+)\.attention\.query_key_value\.weight", name):
            hidden = tensor.shape[1]
            q, k, v = tensor.view(num_heads, 3, hidden // num_heads, hidden).unbind(1)
            for part, w in zip("qkv", (q, k, v)):
                out[f"model.layers.{m[1]}.self_attn.{part}_proj.weight"] = w.reshape(hidden, hidden).contiguous()
        elif m := re.fullmatch(r"layers\.(\d+)\.mlp\.linear1\.weight", name):
            up, gate = tensor.chunk(2, dim=0)
            out[f"model.layers.{m[1]}.mlp.up_proj.weight"] = up.contiguous()
            out[f"model.layers.{m[1]}.mlp.gate_proj.weight"] = gate.contiguous()
        elif (target := _rename(name, to_hf=True)) is not None:
            out[target] = tensor.contiguous()
        else:
            raise KeyError(f"no Hugging Face name for parameter {name}")
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], num_heads: int, num_layers: int) -> dict[str, torch.Tensor]:
    """HF StableLmForCausalLM tensors -> our merged model state (the inverse of to_hf_state_dict)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if (target := _rename(name, to_hf=False)) is not None:
            out[target] = tensor
        elif not re.fullmatch(r"model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(up|gate)_proj)\.weight", name):
            raise UserError(f"Hugging Face weight '{name}' has no place in a StableLM model "
                            "(qkv biases and qk-layernorm are not supported)")
    for i in range(num_layers):
        p = f"model.layers.{i}"
        q, k, v = (hf[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv")
        hidden = q.shape[1]
        per_head = [w.view(num_heads, hidden // num_heads, hidden) for w in (q, k, v)]
        out[f"layers.{i}.attention.query_key_value.weight"] = torch.stack(per_head, dim=1).reshape(3 * hidden, hidden)
        out[f"layers.{i}.mlp.linear1.weight"] = torch.cat((hf[f"{p}.mlp.up_proj.weight"], hf[f"{p}.mlp.gate_proj.weight"]))
    return out


def hf_config_dict(c: NeoXConfig, padded_vocab_size: int, dtype: str, eos_token_id: int = 0,
                   bos_token_id: int = 0) -> dict:
    """config.json for StableLmForCausalLM, from our config."""
    return {
        "architectures": ["StableLmForCausalLM"],
        "model_type": "stablelm",
        "vocab_size": padded_vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_positions,
        "initializer_range": c.init_method_std,
        "layer_norm_eps": c.layernorm_epsilon,
        "use_cache": True,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": float(c.rotary_emb_base),
        "partial_rotary_factor": c.rotary_pct,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rotary_emb_base),
                            "partial_rotary_factor": c.rotary_pct},
        "use_qkv_bias": False,
        "qk_layernorm": False,
        "use_parallel_residual": False,
        "hidden_dropout": c.hidden_dropout,
        "attention_dropout": c.attention_dropout,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
    }


def config_from_hf(hf: dict) -> dict:
    """Our config keys (NeoX names) for an HF StableLM config.json; the caller adds training keys."""
    if hf.get("model_type") != "stablelm":
        raise UserError(f"config.json model_type is {hf.get('model_type')!r}; only 'stablelm' can be imported")
    for key, ok in (("use_qkv_bias", False), ("qk_layernorm", False), ("use_parallel_residual", False)):
        if hf.get(key, False) != ok:
            raise UserError(f"config.json {key}={hf.get(key)} is not supported; only {ok} is")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise UserError("config.json num_key_value_heads differs from num_attention_heads; grouped-query "
                        "attention is not supported")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000))
    pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "intermediate_size": hf["intermediate_size"],
        "seq_length": hf["max_position_embeddings"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "vocab_size": hf["vocab_size"],
        "layernorm_epsilon": hf.get("layer_norm_eps", 1e-5),
        "rotary_pct": pct,
        "rotary_emb_base": int(theta),
        "no_weight_tying": not hf.get("tie_word_embeddings", False),
        "init_method_std": hf.get("initializer_range", 0.02),
        "use_bias_in_norms": True,
        "mlp_type": "gated",
        "activation": "silu",
    }


# ---------------------------------------------------------------------- folders
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SHARD_SIZE = "5GB"


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' -> the torch dtype (the names checkpoints, converters and CLIs use)."""
    return _DTYPES[name]


def export_folder(ckpt_path, output_dir, dtype: str | None = None, step: int | None = None,
                  trust: bool = False) -> Path:
    """A checkpoint (any TP size) -> a Hugging Face StableLmForCausalLM folder, written atomically."""
    import json

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from neox_fork import checkpoint

    state, config, folder = checkpoint.load_merged(ckpt_path, step, trust)
    tensors = to_hf_state_dict(state, config.num_attention_heads)
    if dtype is None:
        dtype = dtype_name(tensors["model.embed_tokens.weight"].dtype)
    tensors = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in tensors.items()}
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    tokenizer_file = checkpoint.tokenizer_of(folder, config)
    eos = _eos_id(tokenizer_file) if tokenizer_file else 0

    with checkpoint.atomic_folder(output_dir) as tmp:
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_SIZE)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = hf_config_dict(config, vocab, dtype, eos_token_id=eos, bos_token_id=eos)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        generation = {"bos_token_id": eos, "eos_token_id": eos, "do_sample": True, "temperature": 0.75,
                      "top_p": 0.95}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer_file:
            save_hf_tokenizer(tokenizer_file, tmp, config.max_positions)
    return Path(output_dir)


def _eos_id(tokenizer_file) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id("<|endoftext|>")
    return 0 if eos is None else eos


def save_hf_tokenizer(tokenizer_file, output_dir, model_max_length: int) -> None:
    """tokenizer.json plus the config files transformers' AutoTokenizer reads."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), model_max_length=model_max_length)
    special = "<|endoftext|>" if tok.convert_tokens_to_ids("<|endoftext|>") is not None else None
    if special:
        tok.add_special_tokens({"eos_token": special, "bos_token": special, "unk_token": special})
    tok.save_pretrained(str(output_dir))


def read_hf_folder(hf_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, all tensors) of a Hugging Face folder with one or many safetensors files."""
    import json

    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"'{hf_dir}' is not a Hugging Face model folder: no config.json")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{hf_dir}' has no *.safetensors weights (convert .bin weights with transformers first)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return json.loads((hf_dir / "config.json").read_text()), tensors


def import_folder(hf_dir, output_dir, tp: int = 1, extra_config: dict | None = None) -> Path:
    """A Hugging Face StableLM folder -> our checkpoint at step 0, split over `tp` ranks."""
    from neox_fork import checkpoint
    from neox_fork.config import from_dict

    hf_config, tensors = read_hf_folder(hf_dir)
    keys = config_from_hf(hf_config)
    # keep the vocabulary exactly as released: pick the padding multiple that already divides it
    keys.update(checkpoint.vocab_keys_for(keys["vocab_size"], tp, f"{hf_dir}/config.json"))
    dtype = dtype_name(tensors["model.embed_tokens.weight"].dtype)
    keys["precision"] = {"bf16": "bfloat16", "fp16": "fp16", "fp32": "fp32"}[dtype]
    tokenizer = Path(hf_dir) / "tokenizer.json"
    if tokenizer.is_file():
        keys["vocab_file"] = str(checkpoint.step_dir(Path(output_dir).resolve(), 0) / checkpoint.TOKENIZER_FILE)
    keys.update(extra_config or {})
    config = from_dict(keys, source=f"{hf_dir}/config.json")
    state = from_hf_state_dict(tensors, config.num_attention_heads, config.num_layers)
    if config.tie_word_embeddings:
        state.pop("output_layer.weight", None)
    return checkpoint.save_model_checkpoint(output_dir, 0, checkpoint.split_tp(state, tp), config,
                                            tokenizer if tokenizer.is_file() else None)
