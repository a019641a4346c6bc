"""What each config key may hold, and the checks a whole `NeoXConfig` must pass (run by
`config.from_dict`, so every loaded config has passed them).

The tables name the values this project builds; values upstream gpt-neox accepts and this project does not
build each have a line saying so, so a GPT-NeoX config never falls back silently. `tools/config_doc.py`
documents the accepted values from the same tables.
"""

from __future__ import annotations

import typing

from neox_fork.errors import UserError

# The checks take a neox_fork.config.neox_config.NeoXConfig. config imports this module, so this one does not import config
# (imports point one way: tests/test_package_imports_point_one_way.py); the name stands for the type.
NeoXConfig = typing.Any

GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "bilinear": "identity", "glu": "sigmoid"}
CHOICES = {
    "attention_head_type": ("multihead",),
    "norm": ("layernorm", "rmsnorm"),
    "pos_emb": ("learned", "rotary", "none"),
    "mlp_type": ("regular", "gated", "llama"),
    "activation": ("gelu", "relu", "silu", "swish", "mish", "softsign", *GATED_ACTIVATIONS),
    "output_layer_parallelism": ("column",),
    "init_method": ("normal", "scaled_normal", "small_init", "wang_init"),
    "output_layer_init_method": ("normal", "scaled_normal", "small_init", "wang_init"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "precision": ("fp32", "float32", "bfloat16", "bf16", "fp16", "float16", "half"),
    "data_impl": ("mmap", "infer"),
    "pack_impl": ("packed", "pack_until_overflow", "unpacked"),
    "tokenizer_type": ("GPT2BPETokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer", "TiktokenTokenizer",
                       "HFTokenizer"),
    "launcher": ("pdsh", "openmpi", "mvapich", "slurm"),
    "distributed_backend": ("nccl", "gloo"),
    "recompute_granularity": ("full", "selective"),
    "train_impl": ("normal", "dpo", "kto", "rm"),
    "dataset_impl": ("gpt2", "pairwise"),
}
CASE_INSENSITIVE = {"tokenizer_type"}  # upstream compares it lower-cased
# Values upstream gpt-neox has and this project does not build: one line saying so, never a silent fallback.
NOT_BUILT = {
    ("pos_emb", "alibi"): "ALiBi attention biases are not built",
    ("pos_emb", "sinusoidal"): "sinusoidal position embeddings are not built",
    ("pos_emb", "rpe"): "T5 relative position buckets are not built",
    ("norm", "scalenorm"): "ScaleNorm is not built",
    ("norm", "non_parametric_layernorm"): "a LayerNorm without parameters is not built",
    ("norm", "crmsnorm"): "CRMSNorm is not built",
    ("norm", "te_layernorm"): "Transformer Engine layers are not used here; use layernorm",
    ("norm", "te_rmsnorm"): "Transformer Engine layers are not used here; use rmsnorm",
    ("mlp_type", "moe"): "mixture of experts is moe_num_experts > 1 (upstream's key), not an MLP type",
    ("train_impl", "reinforce"): "online REINFORCE needs upstream's separate generation server and is not built",
    ("dataset_impl", "online"): "the online dataset (an RL data server) is not built",
    ("output_layer_parallelism", "row"): "only the vocabulary-parallel output layer is built (upstream's row "
                                         "variant is broken there too)",
}
MUST_BE_FALSE = {
    "rotary_interleaved": "rotary is rotate-half, as gpt-neox",
    "gpt_j_tied": "one norm shared by attention and MLP (gpt_j_tied) is not built; two norms are (gpt_j_residual)",
}
# optimizer.type (any case, as upstream's optimizer_type) -> the optimizer.params it takes besides lr; weight decay
# is the top-level weight_decay, as upstream passes it. None: Adam, which reads lr, betas and eps (anything else in
# its params is ignored, as before). neox_fork/training/optim.py builds each; docs/optimizers.md says from what.
OPTIMIZER_PARAMS = {
    "adam": None,
    "adamw": None,
    "cpu_adam": ("betas", "eps", "bias_correction", "adamw_mode"),
    "cpu_torch_adam": ("betas", "eps"),
    "sgd": ("momentum", "dampening", "nesterov"),
    "lion": ("betas",),
    "madgrad_wd": ("momentum", "eps"),
    "sm3": ("momentum", "beta", "eps"),
}
OPTIMIZERS_NOT_BUILT = {
    "onebitadam": "DeepSpeed 0.19 (requirements.txt) no longer has 1-bit Adam (DeepSpeed deleted its 1-bit "
                  "optimizers); use adam",
}
OFFLOADED_OPTIMIZERS = ("cpu_adam", "cpu_torch_adam")  # step on the CPU: they need ZeRO-Offload
_BOOL_PARAMS = ("nesterov", "bias_correction", "adamw_mode")
# rope_scaling: per rope_type, (required, optional) fields, with transformers' names (model/rope_scaling.py
# computes them). original_max_position_embeddings defaults to max_position_embeddings, as in transformers.
ROPE_SCALING_FIELDS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ("original_max_position_embeddings",)),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor"), ("original_max_position_embeddings", "factor", "attention_factor")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
}
ROPE_NOT_BUILT = {"proportional": "transformers' proportional RoPE (Gemma) is not built"}
ATTENTION_TYPES = ("flash", "global")
ATTENTION_NOT_BUILT = {
    "local": "local attention layers are not built (Mistral's sliding window is sliding_window_width)",
    "sparse_fixed": "DeepSpeed sparse attention is not built", "sparse_variable": "DeepSpeed sparse attention is "
    "not built", "bigbird": "DeepSpeed sparse attention is not built", "bslongformer": "DeepSpeed sparse attention "
    "is not built", "gmlp": "gMLP blocks are not built", "amlp": "aMLP blocks are not built",
    "mamba": "Mamba blocks are not built", "rwkv": "RWKV blocks are not built",
}


# LoRA target names: ours (GPT-NeoX's parameter names) and the Hugging Face names peft/axolotl users give, per linear.
# A fused matrix is adapted whole: q/k/v and gate/up must be named together (or by the fused name).
LORA_TARGETS = {
    "query_key_value": ("query_key_value",), "dense": ("dense", "o_proj"),
    "linear1": ("linear1", "dense_h_to_4h", "gate_up_proj"), "linear2": ("linear2", "dense_4h_to_h", "down_proj"),
}
LORA_FUSED = {"query_key_value": ("q_proj", "k_proj", "v_proj"), "linear1": ("gate_proj", "up_proj")}
ADAPTERS = ("lora", "qlora")
ADAPTERS_NOT_BUILT = {"dora": "DoRA is not built; use lora"}


def lora_targets(names) -> tuple[str, ...] | str:
    """Our linear names for `lora_target_modules` (ours, Hugging Face's, or all-linear), in layer order; a str
    says what is wrong."""
    names = list(names) if isinstance(names, (list, tuple)) else [names]
    if names == ["all-linear"]:
        return tuple(LORA_TARGETS)
    chosen = set()
    for ours, fused in LORA_FUSED.items():
        given = [n for n in fused if n in names]
        if given and len(given) != len(fused):
            return (f"{', '.join(given)} without {', '.join(n for n in fused if n not in given)}: they are one fused "
                    f"matrix here ({ours}), adapted whole; name all of {', '.join(fused)} or {ours}")
        if given:
            chosen.add(ours)
    for name in names:
        ours = next((k for k, v in LORA_TARGETS.items() if name in v), None)
        if ours is None and not any(name in fused for fused in LORA_FUSED.values()):
            valid = sorted({n for v in LORA_TARGETS.values() for n in v} | {n for v in LORA_FUSED.values() for n in v})
            return f"unknown target {name!r}; valid: {', '.join(valid)} or all-linear"
        if ours:
            chosen.add(ours)
    if not chosen:
        return "names no linear; give e.g. [query_key_value, dense, linear1, linear2] or all-linear"
    return tuple(k for k in LORA_TARGETS if k in chosen)


def validate(c: NeoXConfig) -> None:
    """Checks that need only the config itself. Each failure names the file and the key."""

    def fail(key: str, message: str) -> None:
        raise UserError(f"{c.where(key)}: {message}")

    for check in (_choices, _architecture, _counts, _sizes, _rope_scaling, _attention_config, _optimizer_and_loading,
                  _data, _training_and_logging, _post_training, _skips_and_spikes, _adapters, _moe,
                  _context_parallel):
        check(c, fail)
    if c.num_gpus is not None:
        c.check_world_size(c.num_gpus * max(c.num_nodes, 1))


def _choices(c: NeoXConfig, fail) -> None:
    """Keys with a fixed set of values; upstream values not built; switches that must stay off."""
    for key, choices in CHOICES.items():
        value = getattr(c, key)
        if (key, value) in NOT_BUILT:
            fail(key, f"{key} {value!r} is not supported: {NOT_BUILT[key, value]}; valid: {', '.join(choices)}")
        if value not in choices and not (key in CASE_INSENSITIVE and str(value).lower() in map(str.lower, choices)):
            fail(key, f"{key} {value!r} is not supported; valid: {', '.join(choices)}")
    for key, why in MUST_BE_FALSE.items():
        if getattr(c, key):
            fail(key, f"{key} true is not supported ({why}); set it to false")


def _architecture(c: NeoXConfig, fail) -> None:
    """Model options that exclude each other or are not built together."""
    if c.intermediate_size is not None and c.expansion_factor is not None:
        fail("expansion_factor", "give intermediate_size or expansion_factor, not both (as upstream)")
    if c.sliding_window_width is not None and c.sliding_window_width < 0:
        fail("sliding_window_width", f"sliding_window_width must be 0 or more (or null), got {c.sliding_window_width}")
    if c.use_qk_layernorm and c.kv_heads != c.num_attention_heads:
        fail("use_qk_layernorm", "use_qk_layernorm with grouped-query attention (num_kv_heads) is not built: "
             "upstream's one norm over [heads, head_dim] does not fit the fewer key heads")
    if c.use_qk_layernorm and c.norm == "layernorm" and c.model_parallel_size > 1:
        fail("use_qk_layernorm", "use_qk_layernorm with norm layernorm at model_parallel_size > 1 is not built: "
             "upstream's LayerNorm then averages over each rank's heads, so the model would change with the TP "
             "size; use model_parallel_size 1 or norm rmsnorm (per head)")
    if c.num_attention_heads % c.kv_heads:
        fail("num_kv_heads", f"num_kv_heads {c.kv_heads} must divide num_attention_heads {c.num_attention_heads}")


def _counts(c: NeoXConfig, fail) -> None:
    """Counts that must be at least 1; a pipeline (pipe_parallel_size > 1) has its own checks."""
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
                "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "model_parallel_size",
                "mlp_multiple_of", "make_vocab_size_divisible_by", "checkpoint_num_layers", "log_interval",
                "eval_interval"):
        if getattr(c, key) < 1:
            fail(key, f"{key} must be at least 1, got {getattr(c, key)}")
    if c.pipe_parallel_size > 1:
        _pipeline(c, fail)


def _sizes(c: NeoXConfig, fail) -> None:
    """Sizes that must fit together: heads and hidden size, rotary dims, positions, the TP size."""
    if c.hidden_size % c.num_attention_heads:
        divisors = [d for d in range(1, c.hidden_size + 1) if c.hidden_size % d == 0 and d <= 128]
        fail("num_attention_heads", f"num_attention_heads {c.num_attention_heads} does not divide hidden_size "
             f"{c.hidden_size}; valid head counts include {', '.join(map(str, divisors[-6:]))}")
    if c.pos_emb == "rotary":
        if not 0 < c.rotary_pct <= 1:
            fail("rotary_pct", f"rotary_pct must be in (0, 1], got {c.rotary_pct}")
        if c.rotary_dim % 2:
            fail("rotary_pct", f"rotary_pct {c.rotary_pct} x head size {c.head_dim} gives {c.rotary_dim} rotary "
                 "dims; it must be even")
    if c.max_positions < c.seq_length:
        fail("max_position_embeddings", f"max_position_embeddings {c.max_position_embeddings} is smaller than "
             f"seq_length {c.seq_length}")
    tp = c.model_parallel_size
    for key, size in (("num_attention_heads", c.num_attention_heads), ("num_kv_heads", c.kv_heads),
                      ("hidden_size", c.hidden_size), ("intermediate_size", c.ffn_hidden_size)):
        if size % tp:
            fail("model_parallel_size", f"model_parallel_size {tp} does not divide {key} {size}; "
                 f"use a tensor-parallel size that divides {size}")
    if (c.sequence_parallel or c.partition_activations) and c.seq_length % tp:
        key = "sequence_parallel" if c.sequence_parallel else "partition_activations"
        fail(key, f"{key} splits the sequence over model_parallel_size {tp}, which does not divide "
             f"seq_length {c.seq_length}")


def _rope_scaling(c: NeoXConfig, fail) -> None:
    """rope_scaling: a type that is built, its required fields, no others, and values the formulas can take."""
    scaling = c.rope_scaling
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if "rope_type" in scaling and "type" in scaling and scaling["type"] != kind:
        fail("rope_scaling", f"rope_scaling gives rope_type {kind!r} and type {scaling['type']!r}; give one")
    if not isinstance(kind, str) or kind in ROPE_NOT_BUILT or kind not in ROPE_SCALING_FIELDS:
        why = f": {ROPE_NOT_BUILT[kind]}" if isinstance(kind, str) and kind in ROPE_NOT_BUILT else ""
        fail("rope_scaling", f"rope_scaling rope_type {kind!r} is not supported{why}; valid: "
             f"{', '.join(ROPE_SCALING_FIELDS)}")
    if kind != "default" and c.pos_emb != "rotary":
        fail("rope_scaling", f"rope_scaling {kind} scales rotary frequencies, but pos_emb is {c.pos_emb!r}; set "
             "pos_emb: rotary")
    required, optional = ROPE_SCALING_FIELDS[kind]
    fields = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    elsewhere = {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}
    for key in fields:
        if key in elsewhere:
            fail("rope_scaling", f"rope_scaling {key}: give it as the config key {elsewhere[key]}")
        if key not in required and key not in optional:
            fail("rope_scaling", f"rope_scaling field {key!r} is not read by rope_type {kind}; its fields: "
                 f"{', '.join(required + optional)}")
    missing = [k for k in required if fields.get(k) is None]
    if missing:
        fail("rope_scaling", f"rope_scaling rope_type {kind} needs {', '.join(missing)}")
    for key, value in fields.items():
        if key in ("short_factor", "long_factor"):
            n = c.rotary_dim // 2
            ok = isinstance(value, list) and len(value) == n and all(_positive(v) for v in value)
            what = f"a list of {n} positive numbers (one per rotary frequency: rotary dims {c.rotary_dim} / 2)"
        elif key == "truncate":
            ok, what = isinstance(value, bool), "true or false"
        elif key == "original_max_position_embeddings":
            ok, what = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
        elif key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):  # 0 or null: transformers' default
            ok = value is None or _positive(value) or (value == 0 and not isinstance(value, bool))
            what = "a positive number, 0 or null"
        else:
            ok, what = (value is None and key not in required) or _positive(value), "a positive number"
        if not ok:
            fail("rope_scaling", f"rope_scaling {key} must be {what}, got {value!r}")
    if kind == "llama3" and fields["low_freq_factor"] == fields["high_freq_factor"]:
        fail("rope_scaling", "rope_scaling llama3 needs high_freq_factor different from low_freq_factor (their "
             "difference divides the ramp)")
    if kind == "dynamic" and c.rotary_dim <= 2:
        fail("rope_scaling", f"rope_scaling dynamic needs more than 2 rotary dims, got {c.rotary_dim}")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _attention_config(c: NeoXConfig, fail) -> None:
    """attention_config: its shape, its layer count and the attention types built."""
    attn = c.attention_config
    if attn:
        ok = all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], list) and isinstance(e[1], int)
                 for e in attn)
        if not ok:
            fail("attention_config", f"attention_config must look like [[[\"flash\"], {c.num_layers}]], got {attn}")
        if len(c.attention_types) != c.num_layers:
            fail("attention_config", f"attention_config covers {len(c.attention_types)} layers but num_layers is "
                 f"{c.num_layers}")
        bad = sorted(set(c.attention_types) - set(ATTENTION_TYPES))
        if bad:
            why = f": {ATTENTION_NOT_BUILT[bad[0]]}" if bad[0] in ATTENTION_NOT_BUILT else ""
            fail("attention_config", f"attention type {bad[0]!r} is not supported{why}; valid: "
                 f"{', '.join(ATTENTION_TYPES)}")


def _optimizer_and_loading(c: NeoXConfig, fail) -> None:
    """The optimizer, ZeRO stage, universal/finetune loading, the signal grace period, LR and warmup."""
    _optimizer(c, fail)
    if c.zero_stage not in (0, 1, 2):
        fail("zero_optimization", f"zero_optimization stage {c.zero_stage} is not supported; valid: 0, 1, 2")
    if c.load_universal and c.zero_stage not in (1, 2):
        fail("load_universal", f"load_universal needs zero_optimization stage 1 or 2 (DeepSpeed loads universal "
             f"checkpoints into its ZeRO optimizers), got stage {c.zero_stage}")
    if c.load_universal and c.finetune:
        fail("load_universal", "load_universal resumes the full training state; finetune: true takes weights only "
             "from any tensor-parallel size already: set one of them")
    if c.signal_grace_seconds <= 0:
        fail("signal_grace_seconds", f"signal_grace_seconds must be positive, got {c.signal_grace_seconds}")
    for key in ("init_timeout_seconds", "train_timeout_seconds", "save_timeout_seconds", "eval_timeout_seconds"):
        if getattr(c, key) < 0:
            fail(key, f"{key} must be a number of seconds >= 0 (0 turns the check off), got {getattr(c, key)}")
    if c.learning_rate <= 0:
        fail("optimizer", f"learning rate must be positive, got {c.learning_rate}")
    if not 0 <= c.warmup <= 1:
        fail("warmup", f"warmup is a fraction of lr_decay_iters in [0, 1], got {c.warmup}; "
             "use warmup_iters for a step count")


def _optimizer(c: NeoXConfig, fail) -> None:
    """optimizer.type is one we build, its params are its own, and ZeRO-Offload goes with a CPU optimizer."""
    kind, given = c.optimizer_kind, c.optimizer.get("type")
    valid = ", ".join(OPTIMIZER_PARAMS)
    if kind in OPTIMIZERS_NOT_BUILT:
        fail("optimizer", f"optimizer type {given!r} is not supported: {OPTIMIZERS_NOT_BUILT[kind]}; valid: {valid}")
    if kind not in OPTIMIZER_PARAMS:
        fail("optimizer", f"optimizer type {given!r} is not supported; valid: {valid}")
    params = c.optimizer.get("params") or {}
    if not isinstance(params, dict):
        fail("optimizer", f"optimizer params must be a mapping like {{lr: 0.001}}, got {params!r}")
    takes = OPTIMIZER_PARAMS[kind]
    for name, value in params.items() if takes is not None else ():
        if name == "lr":
            continue
        if name not in takes:
            hint = "weight decay is the top-level key weight_decay" if name == "weight_decay" else \
                f"it takes lr, {', '.join(takes)}"
            fail("optimizer", f"optimizer type {kind} has no parameter {name!r} ({hint})")
        pair = isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)
        ok = isinstance(value, bool) if name in _BOOL_PARAMS else pair if name == "betas" else _number(value)
        if not ok:
            want = "true or false" if name in _BOOL_PARAMS else "two numbers" if name == "betas" else "a number"
            fail("optimizer", f"optimizer {kind} parameter {name} must be {want}, got {value!r}")
    if c.load_universal and kind not in ("adam", "adamw", "cpu_adam", "cpu_torch_adam"):
        fail("load_universal", f"load_universal with optimizer type {kind}: DeepSpeed's universal checkpoints "
             f"carry Adam's exp_avg and exp_avg_sq only, not {kind}'s state; resume at the saved layout, or take "
             "the weights with finetune: true")
    offload = c.optimizer_offload
    if kind in OFFLOADED_OPTIMIZERS and not (offload and c.zero_stage in (1, 2)):
        fail("optimizer", f"optimizer type {kind} steps on the CPU: it needs ZeRO-Offload, zero_optimization "
             "{stage: 1 or 2, offload_optimizer: {device: cpu}} (upstream's spelling: cpu_offload: true)")
    if offload and kind not in OFFLOADED_OPTIMIZERS:
        fail("zero_optimization", f"zero_optimization offloads the optimizer to the CPU, where optimizer type {kind} "
             "does not step (DeepSpeed refuses it); use optimizer type cpu_adam or cpu_torch_adam, or drop the "
             "offload")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _data(c: NeoXConfig, fail) -> None:
    """The train/valid/test split and the per-path data weights."""
    try:
        parts = [float(p) for p in c.split.split(",")]
        if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
            raise ValueError
    except ValueError:
        fail("split", f"split must be three non-negative numbers like '969, 30, 1', got {c.split!r}")
    for prefix in ("train", "valid", "test"):
        paths, weights = getattr(c, f"{prefix}_data_paths"), getattr(c, f"{prefix}_data_weights")
        if weights and len(weights) != len(paths):
            fail(f"{prefix}_data_weights", f"{prefix}_data_weights has {len(weights)} entries but "
                 f"{prefix}_data_paths has {len(paths)}; give one weight per path")


def check_runnable(c: NeoXConfig) -> None:
    """What a model must satisfy to run a forward (sizing tools may still build it, as upstream does)."""
    out, into = c.mlp_widths
    if out != (2 * into if c.mlp_gated else into):
        hint = "mlp_multiple_of 256 or intermediate_size 3 x the branch width" if c.mlp_gated else "mlp_multiple_of"
        raise UserError(f"{c.where('intermediate_size')}: the MLP widths do not fit together: linear1 gives {out} "
                        f"outputs, linear2 takes {into} (upstream rounds them separately and its forward fails the "
                        f"same way); choose intermediate_size / mlp_multiple_of so they agree, e.g. {hint}")


def _training_and_logging(c: NeoXConfig, fail) -> None:
    """train_epochs, the LR-schedule resume switches, profiling and the noise scale (upstream's limits)."""
    if c.train_epochs is not None:
        if c.train_epochs < 1:
            fail("train_epochs", f"train_epochs must be at least 1, got {c.train_epochs}")
        if "train_iters" in c.sources:
            fail("train_epochs", "give train_epochs or train_iters, not both (as upstream)")
        if len(c.train_data_paths) > 1:
            fail("train_epochs", "train_epochs needs one training dataset (data_path or one train_data_paths "
                 "entry): an epoch of a blend is undefined (upstream refuses weights too)")
        for key in ("train_data_weights", "weight_by_num_documents"):
            if getattr(c, key):
                fail(key, f"{key} does not work with train_epochs (as upstream): an epoch of a blend is undefined")
    if c.override_lr_scheduler and c.use_checkpoint_lr_scheduler:
        fail("override_lr_scheduler", "override_lr_scheduler and use_checkpoint_lr_scheduler are both true; the "
             "schedule comes from the config or from the checkpoint: set one")
    if c.memory_profiling and not c.memory_profiling_path:
        fail("memory_profiling", "memory_profiling needs memory_profiling_path (the folder for the snapshot)")
    if c.profile and not (c.tensorboard_dir or c.save):
        fail("profile", "profile writes its trace to tensorboard_dir (else save): set one of them")
    if (c.profile or c.memory_profiling) and not 0 <= c.profile_step_start < c.profile_step_stop:
        fail("profile_step_stop", f"profile steps must satisfy 0 <= profile_step_start < profile_step_stop, got "
             f"{c.profile_step_start}..{c.profile_step_stop}")
    if c.log_gradient_noise_scale and c.gradient_noise_scale_n_batches < 2:
        fail("gradient_noise_scale_n_batches", "gradient_noise_scale_n_batches must be at least 2 (the large batch "
             f"is that many steps), got {c.gradient_noise_scale_n_batches}")
    if c.train_label_data_paths and c.data_path:
        fail("train_label_data_paths", "label data goes with train_data_paths/valid_data_paths, not data_path (as "
             "upstream, which has no label key for a split data_path)")
    for split in ("train", "valid", "test"):
        labels, paths = getattr(c, f"{split}_label_data_paths"), getattr(c, f"{split}_data_paths")
        if labels and len(labels) != len(paths):
            fail(f"{split}_label_data_paths", f"{split}_label_data_paths has {len(labels)} entries for "
                 f"{len(paths)} {split}_data_paths; give one label prefix per data prefix, in the same order")
    if c.valid_label_data_paths and not c.train_label_data_paths or c.test_label_data_paths and not \
            c.train_label_data_paths:
        fail("train_label_data_paths", "label data for valid/test needs train_label_data_paths too (the training "
             "loss would otherwise be unmasked)")
    if c.train_label_data_paths and c.train_epochs is not None and c.pack_impl != "packed":
        fail("pack_impl", "train_epochs works with pack_impl packed only (as upstream)")
    if c.weighted_sampler_alpha < 0:
        fail("weighted_sampler_alpha", f"weighted_sampler_alpha must be >= 0, got {c.weighted_sampler_alpha}")


def _skips_and_spikes(c: NeoXConfig, fail) -> None:
    """skip_train_iteration_ranges holds [first, last] pairs of steps; the loss-spike rule's numbers."""
    for entry in c.skip_train_iteration_ranges or []:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in entry) and 1 <= entry[0] <= entry[1]):
            fail("skip_train_iteration_ranges", f"skip_train_iteration_ranges entry {entry!r} is not [first, last] "
                 "with 1 <= first <= last (steps as the log numbers them, both skipped), e.g. [[101, 200]]")
    if c.loss_spike_factor is not None and not c.loss_spike_factor > 1:
        fail("loss_spike_factor", f"loss_spike_factor must be above 1 (a multiple of the recent mean loss) or null "
             f"(off), got {c.loss_spike_factor}")
    if c.loss_spike_window < 1:
        fail("loss_spike_window", f"loss_spike_window must be at least 1, got {c.loss_spike_window}")
    if c.max_nan_steps < 1:
        fail("max_nan_steps", f"max_nan_steps must be at least 1, got {c.max_nan_steps}")


def _post_training(c: NeoXConfig, fail) -> None:
    """train_impl and dataset_impl agree, and the data they need is named (upstream asserts the same)."""
    pairwise = c.train_impl in ("dpo", "rm")
    if pairwise and c.dataset_impl != "pairwise":
        fail("dataset_impl", f"train_impl {c.train_impl} trains on chosen/rejected pairs: set dataset_impl: pairwise "
             "and pos_train_data_paths / neg_train_data_paths")
    if c.dataset_impl == "pairwise" and not pairwise:
        fail("dataset_impl", f"dataset_impl pairwise is for train_impl dpo or rm, not {c.train_impl}")
    for split in ("train", "valid", "test") if c.dataset_impl == "pairwise" else ():
        pos, neg = getattr(c, f"pos_{split}_data_paths"), getattr(c, f"neg_{split}_data_paths")
        if len(pos) != len(neg):
            fail(f"neg_{split}_data_paths", f"pos_{split}_data_paths has {len(pos)} entries and "
                 f"neg_{split}_data_paths {len(neg)}; give one rejected prefix per chosen prefix")
        for side, paths in (("pos", pos), ("neg", neg)):
            labels = getattr(c, f"{side}_{split}_label_data_paths")
            if labels and len(labels) != len(paths):
                fail(f"{side}_{split}_label_data_paths", f"{side}_{split}_label_data_paths has {len(labels)} entries "
                     f"but {side}_{split}_data_paths has {len(paths)}; give one label prefix per data prefix")
        if bool(getattr(c, f"pos_{split}_label_data_paths")) != bool(getattr(c, f"neg_{split}_label_data_paths")):
            fail(f"pos_{split}_label_data_paths", f"give label paths for both pos_{split} and neg_{split} or "
                 "for neither (as upstream)")
    if pairwise and not c.pos_train_data_paths:
        fail("pos_train_data_paths", f"train_impl {c.train_impl} needs pos_train_data_paths and neg_train_data_paths "
             "(the chosen and rejected answers, e.g. from preprocess_data_with_chat_template.py)")
    if c.train_impl == "kto":
        if not c.train_reward_data_paths:
            fail("train_reward_data_paths", "train_impl kto needs train_reward_data_paths (one reward per "
                 "document: preprocess_data_with_chat_template.py --reward-key)")
        if c.train_micro_batch_size_per_gpu < 2 or c.train_micro_batch_size_per_gpu % 2:
            fail("train_micro_batch_size_per_gpu", "train_impl kto splits each micro-batch in two halves (each "
                 "half's KL estimate is the other's): train_micro_batch_size_per_gpu must be even, got "
                 f"{c.train_micro_batch_size_per_gpu}")
    if c.precompute_model_name and c.train_impl == "kto":
        fail("precompute_model_name", "precompute_model_name with train_impl kto is not built (KTO's samples do not "
             "read precomputed reference log-probabilities yet); remove it to use the frozen reference")
    if c.dpo_beta <= 0 or c.kto_beta <= 0:
        key = "dpo_beta" if c.dpo_beta <= 0 else "kto_beta"
        fail(key, f"{key} must be positive, got {getattr(c, key)}")


def _pipeline(c: NeoXConfig, fail) -> None:
    """pipe_parallel_size > 1 (neox_fork/training/pipeline.py)."""
    if c.zero_stage > 1:
        fail("zero_optimization", f"zero_optimization stage {c.zero_stage} with pipe_parallel_size "
             f"{c.pipe_parallel_size}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only (stage 2 "
             "partitions gradients while micro-batches are in flight); use stage 1")
    method = c.pipe_partition_method
    if not (method in ("uniform", "parameters") or method.startswith("type:")):
        fail("pipe_partition_method", f"pipe_partition_method {method!r} is not one of uniform, parameters, "
             "type:REGEX (e.g. type:transformer|mlp)")
    if c.checkpoint_validation_with_forward_pass:
        fail("checkpoint_validation_with_forward_pass", "checkpoint_validation_with_forward_pass with "
             f"pipe_parallel_size {c.pipe_parallel_size}: the check runs the whole model on one rank, which a "
             "pipeline stage does not hold; unset it")
    for key in ("reset_attention_mask", "reset_position_ids"):
        if getattr(c, key):
            fail(key, f"{key} with pipe_parallel_size {c.pipe_parallel_size} is not built: the pipeline stages do "
                 "not carry document positions or masks; use pipe_parallel_size 1 (tensor and data parallelism)")
    if c.train_impl != "normal" or c.dataset_impl != "gpt2" or c.train_label_data_paths or c.pack_impl != "packed":
        key = "train_impl" if c.train_impl != "normal" else "dataset_impl" if c.dataset_impl != "gpt2" else (
            "train_label_data_paths" if c.train_label_data_paths else "pack_impl")
        fail(key, f"{key} {getattr(c, key)!r} with pipe_parallel_size {c.pipe_parallel_size} is not built: the "
             "pipeline stages train the plain language-model loss on packed data; use pipe_parallel_size 1 "
             "(tensor and data parallelism) for fine-tuning with label masks and for dpo/kto/rm")
    entries = c.num_layers + 5
    if c.pipe_parallel_size > entries:
        fail("pipe_parallel_size", f"pipe_parallel_size {c.pipe_parallel_size} is more than the {entries} "
             f"entries of a {c.num_layers}-layer model's layer list; use at most {entries} stages")


def _adapters(c: NeoXConfig, fail) -> None:
    """`adapter: lora` (neox_fork/model/adapters.py): its sizes, targets, and the combinations that are built."""
    if c.adapter is None:
        return
    if c.adapter in ADAPTERS_NOT_BUILT:
        fail("adapter", f"adapter {c.adapter!r} is not supported: {ADAPTERS_NOT_BUILT[c.adapter]}")
    if c.adapter not in ADAPTERS:
        fail("adapter", f"adapter {c.adapter!r} is not supported; valid: {', '.join(ADAPTERS)} or null")
    if not isinstance(c.lora_r, int) or c.lora_r < 1:
        fail("lora_r", f"lora_r must be a positive integer, got {c.lora_r!r}")
    if not c.lora_alpha > 0:
        fail("lora_alpha", f"lora_alpha must be positive, got {c.lora_alpha!r}")
    if not 0.0 <= c.lora_dropout < 1.0:
        fail("lora_dropout", f"lora_dropout must be in [0, 1), got {c.lora_dropout!r}")
    targets = lora_targets(c.lora_target_modules)
    if isinstance(targets, str):
        fail("lora_target_modules", f"lora_target_modules: {targets}")
    not_yet = [(k, why) for k, why in (("use_bnb_optimizer", "bitsandbytes' optimizer"),) if getattr(c, k)]
    if c.adapter == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            fail("adapter", "adapter qlora needs bitsandbytes (its 4-bit NF4 base), which is not installed; "
                 "`pip install bitsandbytes` or use adapter: lora")
        if c.torch_compile:
            fail("torch_compile", "adapter qlora with torch_compile is not built; set torch_compile: false")
        if c.pipe_parallel_size > 1:
            fail("pipe_parallel_size", f"adapter qlora with pipe_parallel_size {c.pipe_parallel_size} is not built; "
                 "use adapter lora with pipeline stages, or qlora with tensor and data parallelism")
        for key in ("sequence_parallel", "partition_activations"):
            if getattr(c, key) and c.model_parallel_size > 1:
                fail(key, f"adapter qlora with {key} at model_parallel_size {c.model_parallel_size} is not built "
                     "(its 4-bit linears do not gather the sequence); use adapter lora, or set it false")
    if c.train_impl == "rm":
        not_yet.insert(0, ("train_impl", "train_impl rm (its new reward head would need to train whole)"))
    if not_yet:
        key, what = not_yet[0]
        fail(key, f"adapter lora with {what} is not built yet; use adapter lora with train_impl normal, dpo or kto, "
             "tensor, pipeline and data parallelism, or train the whole model (adapter: null)")


def _moe(c: NeoXConfig, fail) -> None:
    """Mixture of experts (neox_fork/model/moe.py): upstream's keys; what is not built yet is one line each."""
    if c.moe_num_experts < 1:
        fail("moe_num_experts", f"moe_num_experts must be 1 (dense) or more, got {c.moe_num_experts}")
    ep = c.expert_model_parallel_size
    if ep < 1:
        fail("expert_model_parallel_size", f"expert_model_parallel_size must be 1 or more, got {ep}")
    if c.moe_num_experts == 1:
        if ep != 1:
            fail("expert_model_parallel_size", f"expert_model_parallel_size {ep} needs experts: set "
                 "moe_num_experts to a multiple of it, or expert_model_parallel_size 1")
        return
    if c.moe_num_experts % ep:
        fail("expert_model_parallel_size", f"expert_model_parallel_size {ep} does not divide moe_num_experts "
             f"{c.moe_num_experts}: each expert-parallel rank holds the same number of whole experts")
    if ep > 1 and c.eval_tasks:
        fail("eval_tasks", f"eval_tasks during training with expert_model_parallel_size {ep} is not supported yet "
             "(lm-eval runs on data-parallel rank 0's ranks; the other experts live elsewhere); run eval.py on the "
             "checkpoint, which reads every expert at any parallelism")
    if not 1 <= c.moe_top_k <= c.moe_num_experts:
        fail("moe_top_k", f"moe_top_k must be from 1 to moe_num_experts {c.moe_num_experts}, got {c.moe_top_k}")
    if c.moe_expert_interval < 1:
        fail("moe_expert_interval", f"moe_expert_interval must be 1 or more, got {c.moe_expert_interval}")
    if c.moe_router_type not in ("sinkhorn", "topk"):
        fail("moe_router_type", f"moe_router_type {c.moe_router_type!r} is not supported; valid: sinkhorn, topk")
    if c.moe_aux_loss_coeff < 0:
        fail("moe_aux_loss_coeff", f"moe_aux_loss_coeff must be 0 or more, got {c.moe_aux_loss_coeff}")
    if c.moe_router_type == "sinkhorn":
        for key in ("moe_aux_loss_coeff", "moe_normalize_expert_weights", "moe_jitter_eps"):
            if getattr(c, key):
                fail(key, f"{key} applies to moe_router_type topk; the sinkhorn router balances the load itself, "
                          "keeps its own weights and takes no jitter (as upstream); leave it unset or use topk")
    if c.moe_jitter_eps is not None and not 0 < c.moe_jitter_eps < 1:
        fail("moe_jitter_eps", f"moe_jitter_eps must be between 0 and 1 (or null), got {c.moe_jitter_eps}")
    if c.adapter is not None:
        fail("adapter", f"adapter {c.adapter} with moe_num_experts > 1 is not supported yet (adapters on the experts "
             "are not built); train the whole model (adapter: null)")
    if c.moe_aux_loss_coeff and c.dtype_name == "fp16":
        fail("moe_aux_loss_coeff", "moe_aux_loss_coeff with fp16 is not supported yet (the load-balancing loss's "
             "gradient would miss the fp16 loss scale); use bf16 or fp32, or moe_aux_loss_coeff 0")


def _context_parallel(c: NeoXConfig, fail) -> None:
    """context_parallel_size CP > 1 (DeepSpeed-Ulysses, docs/long-context.md): what it splits must divide by CP, and
    each combination not built is one line naming the pair."""
    cp = c.context_parallel_size
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        fail("context_parallel_size", f"context_parallel_size must be a positive integer (1 = off), got {cp!r}")
    if cp == 1:
        return
    tp = c.model_parallel_size
    pair = f"context_parallel_size {cp} with"
    if c.seq_length % cp:
        fail("seq_length", f"{pair} seq_length {c.seq_length}: each rank holds seq_length / context_parallel_size "
             f"positions; use a seq_length divisible by {cp}")
    for key, heads in (("num_attention_heads", c.num_attention_heads), ("num_kv_heads", c.kv_heads)):
        if heads % tp == 0 and (heads // tp) % cp:
            fail(key, f"{pair} {key} {heads} at model_parallel_size {tp}: the all-to-all gives each context rank "
                 f"1/{cp} of a tensor-parallel rank's {heads // tp} heads; use head counts divisible by "
                 f"model_parallel_size x context_parallel_size = {tp * cp}")
    scaling_type = (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type", "default"))
    not_built = [
        ("pipe_parallel_size", c.pipe_parallel_size > 1, "pipeline stages"),
        ("sequence_parallel", c.sequence_parallel and tp > 1, "sequence_parallel at model_parallel_size > 1 (both "
         "split the sequence)"),
        ("partition_activations", c.partition_activations and tp > 1, "partition_activations at "
         "model_parallel_size > 1 (it is sequence parallelism)"),
        ("train_impl", c.train_impl != "normal", f"train_impl {c.train_impl}"),
        ("dataset_impl", c.dataset_impl != "gpt2", f"dataset_impl {c.dataset_impl}"),
        ("moe_num_experts", c.moe_num_experts > 1, "mixture of experts (the load-balancing loss would see a slice)"),
        ("adapter", c.adapter is not None, f"adapter {c.adapter}"),
        ("torch_compile", c.torch_compile, "torch_compile"),
        ("sliding_window_width", c.sliding_window_width is not None, "a sliding window"),
        ("rope_scaling", scaling_type in ("dynamic", "longrope"), f"rope_scaling type {scaling_type} (its "
         "frequencies depend on the longest position of the call, which a slice does not see)"),
        ("eval_tasks", bool(c.eval_tasks), "eval_tasks during training (lm-eval runs whole sequences: run eval.py "
         "on the checkpoint at context_parallel_size 1)"),
        ("checkpoint_validation_with_forward_pass", c.checkpoint_validation_with_forward_pass,
         "checkpoint_validation_with_forward_pass (a whole-sequence forward)"),
    ]
    for key, refused, what in not_built:
        if refused:
            fail(key, f"{pair} {what} is not built; use context_parallel_size 1 for it")
