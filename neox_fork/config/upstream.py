"""Every key upstream gpt-neox's NeoXArgs defines that is not a `NeoXConfig` field, and what it is here.

Four kinds, one key per line in `KEYS` (`key: (kind, upstream default, type, why)`):

- NO_EFFECT: accepted so upstream configs load; nothing here reads it. Set to anything but its default, it
  is named in the one line `config.log_ignored_settings` logs at start.
- REFUSED: accepted at its upstream default; any other value stops the run with one line saying what is
  not built.
- DERIVED: upstream computes it itself. A config may give it when it agrees with what this run derives;
  a contradicting value is refused in one line (checked once the run knows it, e.g. the world size).
- DEEPSPEED: a DeepSpeed config section upstream passes through; merged into `config.deepspeed_config`.
- ALIAS: upstream's name of a key that has another name here (the value goes to that field).

When a key becomes a real `NeoXConfig` field, delete its line here (a test checks no key is both).
`tests/upstream_neox_keys.txt` lists upstream's names: a key in neither place fails a test.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from neox_fork.errors import UserError

# The checks take a neox_fork.config.neox_config.NeoXConfig. config imports this module, so this one does not import config
# (imports point one way: tests/test_package_imports_point_one_way.py); the name stands for the type.
NeoXConfig = typing.Any

NO_EFFECT, REFUSED, DERIVED, DEEPSPEED, ALIAS = "no effect", "refused", "derived", "deepspeed", "alias"
TE = "Transformer Engine layers are not used here"
POST = "post-training (DPO/KTO/RM/REINFORCE) is not built yet"
MAMBA, RWKV = "only used by Mamba blocks (not built)", "only used by RWKV blocks (not built)"
MUP = "only used with use_mup (muP is not built)"
REINFORCE = "only used by train_impl: reinforce (not built)"

# key: (kind, upstream default, type, why)
KEYS: dict[str, tuple[str, Any, Any, str]] = {
    # --- parallelism ---
    "world_size": (DERIVED, None, int, "the number of ranks"),
    "is_pipe_parallel": (DERIVED, False, bool, "pipe_parallel_size >= 1"),
    # --- model ---
    "rmsnorm_fusion": (NO_EFFECT, False, bool, "Apex fused RMSNorm kernel (same result as ours)"),
    "scalenorm_epsilon": (NO_EFFECT, 1e-8, float, "only used by norm: scalenorm (not built)"),
    "rpe_num_buckets": (NO_EFFECT, 32, int, "only used by pos_emb: rpe (not built)"),
    "rpe_max_distance": (NO_EFFECT, 128, int, "only used by pos_emb: rpe (not built)"),
    "opt_pos_emb_offset": (REFUSED, 0, int, "OPT's learned-position offset is not built"),
    "sparsity_config": (NO_EFFECT, None, dict, "only used by DeepSpeed sparse attention types (not built)"),
    "num_unique_layers": (REFUSED, None, int, "sharing parameters between layers is not built"),
    "param_sharing_style": (NO_EFFECT, "grouped", str, "only used with num_unique_layers (not built)"),
    "use_flashattn_swiglu": (NO_EFFECT, False, bool, "flash-attn's fused SwiGLU kernel (same result as ours)"),
    "scaled_masked_softmax_fusion": (NO_EFFECT, False, bool, "Megatron's fused masked softmax (attention is "
                                                             "flash/SDPA here)"),
    "fused_kernels_build_path": (NO_EFFECT, None, str, "where upstream builds its CUDA kernels"),
    "fp16_lm_cross_entropy": (NO_EFFECT, False, bool, "loss in fp16; the loss precision here is "
                                                      "full_precision_lm_cross_entropy"),
    "apply_query_key_layer_scaling": (NO_EFFECT, False, bool, "an fp16 overflow guard that leaves attention "
                                                              "mathematically unchanged"),
    "use_cpu_initialization": (NO_EFFECT, False, bool, "initialise weights on the CPU (the result is the same)"),
    "attention_softmax_in_fp32": (NO_EFFECT, False, bool, "flash/SDPA attention accumulates the softmax in fp32"),
    "rotary_save_freqs_buffer": (NO_EFFECT, False, bool, "save rotary's inverse frequencies in the checkpoint "
                                                         "(recomputed here)"),
    "gmlp_attn_dim": (NO_EFFECT, 64, int, "only used by gMLP blocks (not built)"),
    "soft_prompt_tuning": (REFUSED, None, dict, "soft prompt tuning is not built"),
    "mamba_selective_scan_fusion": (NO_EFFECT, False, bool, MAMBA),
    "mamba_causal_conv_fusion": (NO_EFFECT, False, bool, MAMBA),
    "mamba_inner_func_fusion": (NO_EFFECT, False, bool, MAMBA),
    "mamba_selective_fp32_params": (NO_EFFECT, True, bool, MAMBA),
    "mamba_use_bias_in_conv": (NO_EFFECT, True, bool, MAMBA),
    "mamba_use_bias_in_linears": (NO_EFFECT, False, bool, MAMBA),
    "serve_model_weights": (REFUSED, False, bool, "serving weights to an online RL data server is not built"),
    "weight_server_port": (NO_EFFECT, 6000, object, "only used with serve_model_weights (not built)"),
    "online_dataserver_ips": (NO_EFFECT, "localhost", object, "only used by dataset_impl: online (not built)"),
    "online_dataserver_ports": (NO_EFFECT, 10000, object, "only used by dataset_impl: online (not built)"),
    "te_columnparallel": (REFUSED, False, bool, TE),
    "te_rowparallel": (REFUSED, False, bool, TE),
    "te_layernorm_mlp": (REFUSED, False, bool, TE),
    "te_mha": (REFUSED, False, bool, TE),
    "te_fp8_mha": (REFUSED, False, bool, TE),
    "te_fp8_format": (NO_EFFECT, "hybrid", str, "only used by Transformer Engine layers (not used here)"),
    "te_fp8_wgrad": (NO_EFFECT, True, bool, "only used by Transformer Engine layers (not used here)"),
    "te_fp8_amax_history_len": (NO_EFFECT, 1, int, "only used by Transformer Engine layers (not used here)"),
    "te_fp8_amax_compute_algo": (NO_EFFECT, "most_recent", str, "only used by Transformer Engine layers (not "
                                                                "used here)"),
    "te_fp8_margin": (NO_EFFECT, 0, int, "only used by Transformer Engine layers (not used here)"),
    "dim_att": (NO_EFFECT, None, int, RWKV),
    "head_size": (NO_EFFECT, None, int, RWKV),
    "ffn_dim": (NO_EFFECT, None, int, RWKV),
    # --- optimizer and LR ---
    "optimizer_type": (DERIVED, "adam", str, "optimizer.type"),
    "zero_stage": (DERIVED, None, int, "zero_optimization.stage"),
    "zero_reduce_scatter": (DERIVED, None, bool, "zero_optimization.reduce_scatter (default true)"),
    "zero_contiguous_gradients": (DERIVED, None, bool, "zero_optimization.contiguous_gradients (default false)"),
    "zero_reduce_bucket_size": (DERIVED, None, int, "zero_optimization.reduce_bucket_size (default 5e8)"),
    "zero_allgather_bucket_size": (DERIVED, None, int, "zero_optimization.allgather_bucket_size (default 5e8)"),
    # --- logging ---
    "wandb_run_name": (ALIAS, None, str, "wandb_name"),
    "wandb_init_all_ranks": (NO_EFFECT, False, bool, "a W&B run per rank (only rank 0 logs here)"),
    "git_hash": (NO_EFFECT, None, str, "upstream records its own git commit here"),
    "comet_experiment": (NO_EFFECT, None, object, "upstream's live Comet object, never a config value"),
    "peak_theoretical_tflops": (NO_EFFECT, None, float, "peak TFLOPS for upstream's MFU metric (the sizing "
                                                        "tool's --gpu table here)"),
    "profile_backward": (NO_EFFECT, False, bool, "only used by profile"),
    # --- other ---
    "local_rank": (DERIVED, None, int, "this process's index on its node, set per process by the launcher"),
    "rank": (DERIVED, None, int, "this process's index, set per process by the launcher"),
    "lazy_mpu_init": (NO_EFFECT, False, bool, "for external programs that set up parallelism themselves"),
    "short_seq_prob": (NO_EFFECT, 0.1, float, "unused upstream too"),
    "adlr_autoresume": (REFUSED, False, bool, "NVIDIA's ADLR autoresume hook is not built (deepy saves and stops "
                                              "on SIGUSR1/SIGTERM)"),
    "adlr_autoresume_interval": (NO_EFFECT, 1000, int, "only used by adlr_autoresume"),
    "onnx_safe": (NO_EFFECT, False, bool, "ONNX-exportable activations (no ONNX export here)"),
    "deepscale": (NO_EFFECT, False, bool, "DeepSpeed's old name for `deepspeed`"),
    "deepscale_config": (NO_EFFECT, None, str, "DeepSpeed's old name for its config file"),
    "user_script": (NO_EFFECT, None, str, "set from deepy's command line (upstream overwrites a config value too)"),
    "iteration": (DERIVED, None, int, "the step the run starts from: 0, or the one saved in `load`"),
    "do_train": (NO_EFFECT, None, bool, "upstream overwrites it from the datasets it finds"),
    "do_valid": (NO_EFFECT, None, bool, "upstream overwrites it from the datasets it finds"),
    "do_test": (NO_EFFECT, None, bool, "upstream overwrites it from the datasets it finds"),
    "global_num_gpus": (DERIVED, None, int, "the number of ranks"),
    # --- tokenizer ---
    "padded_vocab_size": (DERIVED, None, int, "the tokenizer's size rounded up to make_vocab_size_divisible_by x "
                                              "model_parallel_size"),
    # --- training ---
    "use_shared_fs": (NO_EFFECT, True, bool, "index caches are written once under a lock, shared or not"),
    "fp32_reinforce": (NO_EFFECT, True, bool, REINFORCE),
    "kl_impl": (NO_EFFECT, "mse", str, REINFORCE),
    "kl_div_beta": (NO_EFFECT, 0.1, float, REINFORCE),
    "reinforce_leave_one_out": (NO_EFFECT, False, bool, REINFORCE),
    "mmap_warmup": (NO_EFFECT, False, bool, "read the datasets once at start to warm the page cache"),
    "s3_chunk_size": (NO_EFFECT, 104857600, int, "S3 upload chunk size (not built)"),
    "config_files": (NO_EFFECT, None, dict, "upstream overwrites it with the config files' text; kept as "
                                            "global_stepN/configs/ here"),
    "checkpoint_scale": (REFUSED, "linear", str, "log-spaced checkpoint steps are not built; use extra_save_iters"),
    "batch_size": (DERIVED, None, int, "train_micro_batch_size_per_gpu"),
    "deepspeed_activation_checkpointing": (NO_EFFECT, True, bool, "DeepSpeed's activation checkpointing "
                                                                  "(checkpoint_activations is ours)"),
    "contiguous_checkpointing": (NO_EFFECT, False, bool, "a DeepSpeed activation-checkpointing option"),
    "checkpoint_in_cpu": (NO_EFFECT, False, bool, "a DeepSpeed activation-checkpointing option"),
    "clip_grad": (DERIVED, 1.0, float, "gradient_clipping"),
    "hysteresis": (NO_EFFECT, 2, int, "unused upstream; fp16 loss scaling is the fp16 section"),
    "dynamic_loss_scale": (DERIVED, None, bool, "loss_scale is null"),
    "loss_scale": (NO_EFFECT, None, float, "unused upstream; fp16 loss scaling is the fp16 section"),
    "loss_scale_window": (NO_EFFECT, 1000.0, float, "unused upstream; fp16 loss scaling is the fp16 section"),
    "min_scale": (NO_EFFECT, 1.0, float, "unused upstream; fp16 loss scaling is the fp16 section"),
    "char_level_ppl": (NO_EFFECT, False, bool, "character-level perplexity at evaluation (not built)"),
    "use_mup": (REFUSED, False, bool, "muP (maximal update parametrization) is not built"),
    "coord_check": (REFUSED, False, bool, "muP coordinate checks are not built"),
    "save_base_shapes": (REFUSED, False, bool, "muP base shapes are not built"),
    "base_shapes_file": (NO_EFFECT, None, str, MUP),
    "mup_init_scale": (NO_EFFECT, 1.0, float, MUP),
    "mup_attn_temp": (NO_EFFECT, 1.0, float, MUP),
    "mup_output_temp": (NO_EFFECT, 1.0, float, MUP),
    "mup_embedding_mult": (NO_EFFECT, 1.0, float, MUP),
    "mup_rp_embedding_mult": (NO_EFFECT, 1.0, float, MUP),
    "mup_width_scale": (NO_EFFECT, 2, int, MUP),
    # --- text generation ---
    "return_logits": (NO_EFFECT, False, bool, "return logits with the samples"),
    # --- DeepSpeed config ---
    "deepspeed": (DERIVED, True, bool, "DeepSpeed is always used"),
    "scheduler": (REFUSED, None, dict, "DeepSpeed's LR schedulers are not used: the schedule is lr_decay_style, "
                                       "warmup and min_lr"),
    "prescale_gradients": (DEEPSPEED, False, bool, "scale gradients before the all-reduce"),
    "gradient_predivide_factor": (DEEPSPEED, 1.0, float, "divide gradients by this before the all-reduce"),
    "sparse_gradients": (NO_EFFECT, False, bool, "sparse all-reduce of embedding gradients (removed from DeepSpeed "
                                                 "0.19, which refuses the key; the gradients here are dense)"),
    "amp": (REFUSED, None, dict, "Apex AMP is not used: mixed precision is precision / bf16 / fp16"),
    "curriculum_learning": (REFUSED, None, dict, "curriculum learning (sequence-length warmup) is not built"),
    "curriculum_seqlen": (REFUSED, 0, int, "curriculum learning (sequence-length warmup) is not built"),
    "dump_state": (DEEPSPEED, False, bool, "DeepSpeed prints its engine state at start"),
    "flops_profiler": (DEEPSPEED, None, dict, "DeepSpeed's FLOPs profiler"),
    "communication_data_type": (DEEPSPEED, None, str, "dtype of gradient all-reduces (fp16, bf16, fp32)"),
    "autotuning": (DEEPSPEED, None, dict, "DeepSpeed autotuner settings (read only by its autotuner)"),
    "activation_checkpointing": (NO_EFFECT, None, dict, "DeepSpeed's activation checkpointing (checkpoint_"
                                                        "activations is ours)"),
    "sparse_attention": (NO_EFFECT, None, dict, "only used by DeepSpeed sparse attention types (not built)"),
    "data_efficiency": (REFUSED, None, dict, "DeepSpeed data efficiency (curriculum sampling, random-LTD) is not "
                                             "built"),
    "tensorboard": (DEEPSPEED, None, dict, "DeepSpeed's own TensorBoard monitor (ours: tensorboard_dir)"),
    "wandb": (DEEPSPEED, None, dict, "DeepSpeed's own W&B monitor (ours: use_wandb)"),
    "csv_monitor": (DEEPSPEED, None, dict, "DeepSpeed's CSV monitor"),
    "elasticity": (REFUSED, None, dict, "DeepSpeed's elastic training is not built (DeepSpeed 0.19 removed it)"),
    "comms_logger": (DEEPSPEED, None, dict, "DeepSpeed's communication logger"),
    "compression_training": (REFUSED, None, dict, "DeepSpeed compression training is not built"),
    "checkpoint": (DEEPSPEED, None, dict, "DeepSpeed checkpoint options (merged with load_universal's)"),
    "data_types": (DEEPSPEED, None, dict, "DeepSpeed data types, e.g. grad_accum_dtype (over ours: fp32 with "
                                          "bf16)"),
    "deepspeed_extra_args": (DEEPSPEED, None, dict, "any further DeepSpeed config keys, merged last"),
    # --- DeepSpeed runner ---
    "force_multi": (NO_EFFECT, False, bool, "force DeepSpeed's multi-node runner on one node (deepy picks)"),
    "autotuning_run": (REFUSED, None, str, "deepy does not run DeepSpeed's autotuner"),
}

# Older upstream's DeepSpeed-MoE keys (gpt-neox #1129), removed by its dropless MoE (#1210): what replaced each.
# Older upstream's names (gone from its NeoXArgs, so not rows of KEYS) of a key that exists here under another.
OLDER_ALIASES = {"moe_expert_parallel_size": "expert_model_parallel_size"}  # DeepSpeed-MoE era; megatron-core's name

REMOVED_MOE_KEYS = {
    "moe_type": "MoE is dropless: megatron-core's MoELayer (neither DeepSpeed-MoE nor megablocks); remove the key",
    "moe_loss_coeff": "replaced by moe_aux_loss_coeff (the topk router's load-balancing loss; sinkhorn needs none)",
    "moe_train_capacity_factor": "MoE is dropless (no expert capacity, no dropped tokens); remove the key",
    "moe_eval_capacity_factor": "MoE is dropless (no expert capacity, no dropped tokens); remove the key",
    "moe_min_capacity": "MoE is dropless (no expert capacity, no dropped tokens); remove the key",
    "moe_token_dropping": "MoE is dropless (no expert capacity, no dropped tokens); remove the key",
    "moe_use_residual": "DeepSpeed's residual MoE was removed upstream and is not built; remove the key",
    "create_moe_param_group": "experts' parameters are in the ordinary parameter groups; remove the key",
    "enable_expert_tensor_parallelism": "replaced by expert_model_parallel_size; remove the key",
    "use_tutel": "Tutel kernels of DeepSpeed-MoE were removed; remove the key",
    "moe_glu": "experts are gated when the MLP is (activation swiglu, or mlp_type gated); remove the key",
    "expert_interval": "renamed moe_expert_interval",
}


# NeoXConfig fields whose upstream default is None (NeoXArgs at ea7aefd8; tests/upstream_neox_null_defaults.txt lists
# them with the table's). Upstream's validate_types skips a None value, so `key: null` means unset there; here it
# means the key is not given (its default), config/loading.py. REQUIRED are the ones a model cannot be built
# without (upstream's validate_values requires the first three; seq_length sizes everything): a null for one is
# one line. max_position_embeddings, which upstream also requires, keeps its null here: seq_length.
NULL_DEFAULT_FIELDS = frozenset({
    "moe_jitter_eps", "precision", "num_layers", "hidden_size", "intermediate_size", "expansion_factor", "num_attention_heads",
    "num_kv_heads", "seq_length", "sliding_window_width", "max_position_embeddings", "attention_config", "lr",
    "lr_decay_iters", "lr_decay_fraction", "use_wandb", "wandb_group", "wandb_team", "log_dir", "tensorboard_dir",
    "use_comet", "comet_workspace", "comet_project", "comet_experiment_name", "comet_tags", "comet_others",
    "memory_profiling_path", "data_path", "train_data_paths", "train_label_data_paths", "train_reward_data_paths",
    "test_data_paths", "test_label_data_paths", "test_reward_data_paths", "valid_data_paths",
    "valid_label_data_paths", "valid_reward_data_paths", "pos_train_data_paths", "neg_train_data_paths",
    "pos_train_label_data_paths", "neg_train_label_data_paths", "pos_valid_data_paths", "neg_valid_data_paths",
    "pos_valid_label_data_paths", "neg_valid_label_data_paths", "pos_test_data_paths", "neg_test_data_paths",
    "pos_test_label_data_paths", "neg_test_label_data_paths", "train_data_weights", "valid_data_weights",
    "test_data_weights", "save", "s3_path", "load", "checkpoint_factor", "extra_save_iters", "train_iters",
    "train_epochs", "keep_last_n_checkpoints", "vocab_file", "merge_file", "exit_interval", "text_gen_type",
    "precompute_model_name", "sample_input_file", "eval_tasks", "train_batch_size",
    "train_micro_batch_size_per_gpu", "optimizer", "fp16", "bf16", "zero_optimization", "hostfile", "include",
    "exclude", "num_gpus", "master_addr", "comment", "account"
})
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")


def _off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def is_set(key: str, value: Any) -> bool:
    """A value asking for something: not the upstream default (null, false and empty all mean off when the
    default is off too)."""
    default = KEYS[key][1]
    return value is not None and not (_off(value) and _off(default)) and value != default


def keys_of(kind: str) -> list[str]:
    return [k for k, row in KEYS.items() if row[0] == kind]


def check_type(key: str, value: Any, source: str) -> Any:
    """A table key's value as given, or a UserError naming the file, key and wanted type."""
    hint = KEYS[key][2]
    ok = (value is None or hint is object or (isinstance(value, hint) and not (hint is int and
          isinstance(value, bool))) or (hint is float and isinstance(value, int) and not isinstance(value, bool)))
    if not ok:
        raise UserError(f"{source}: key '{key}' must be {hint.__name__} or null, got {value!r} "
                        f"({type(value).__name__})")
    return float(value) if hint is float and value is not None else value


def split(values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """Move the table's keys out of `values` (aliases onto their field); returns them."""
    table = {k: values.pop(k) for k in list(values) if k in KEYS}
    for key in keys_of(ALIAS):
        if table.get(key) is None:
            continue
        target = KEYS[key][3]
        if values.get(target) not in (None, table[key]):
            raise UserError(f"{sources.get(key, 'config')}: {key} {table[key]!r} and {target} {values[target]!r} "
                            f"disagree; they are one setting, give one of them")
        values[target] = table.pop(key)
        sources.setdefault(target, sources.get(key, "config"))
    return {k: v for k, v in table.items() if v is not None}


def config_files(paths) -> dict[str, bytes]:
    """Each config file as given (upstream's `config_files`), by file name: what a checkpoint keeps under
    configs/. A file name given twice gets a number in front."""
    files: dict[str, bytes] = {}
    for path in map(Path, paths):
        files[path.name if path.name not in files else f"{len(files)}-{path.name}"] = path.read_bytes()
    return files


def ignored(c: NeoXConfig) -> dict[str, Any]:
    """The no-effect table keys this config sets to something other than the default."""
    return {k: v for k, v in c.upstream_keys.items() if KEYS[k][0] == NO_EFFECT and is_set(k, v)}


def _refuse(c: NeoXConfig, key: str, value: Any, where: str | None = None) -> None:
    kind, default, _, why = KEYS[key]
    off = isinstance(value, dict) and value.get("enabled") is False  # a DeepSpeed section switched off
    if kind == REFUSED and is_set(key, value) and not off:
        raise UserError(f"{where or c.where(key)}: {key} {value!r} is not supported: {why}; remove it "
                        f"(upstream's default: {default!r})")


def validate(c: NeoXConfig) -> None:
    """Refused values, derived keys knowable from the config alone, and deepspeed_extra_args' clashes."""
    for key, value in c.upstream_keys.items():
        _refuse(c, key, value)
    extra = c.upstream_keys.get("deepspeed_extra_args") or {}
    fields = [name for name, f in type(c).__dataclass_fields__.items() if "doc" in f.metadata]
    for key, value in extra.items():
        if key in c.sources:
            raise UserError(f"{c.where('deepspeed_extra_args')}: deepspeed_extra_args sets {key!r}, which the "
                            f"config also sets ({c.where(key)}); give it in one place")
        if key in fields:  # e.g. bf16: the model is built from it, so it must be where the config reads it
            raise UserError(f"{c.where('deepspeed_extra_args')}: deepspeed_extra_args sets {key!r}, a key of its "
                            "own here; give it at the top level of the config instead")
        if key in KEYS:
            _refuse(c, key, value, c.where("deepspeed_extra_args"))
    check_derived(c)


def _expected(c: NeoXConfig, key: str, world_size: int | None) -> Any:
    """What this run derives for `key`; `...` while it cannot tell yet."""
    zero = c.zero_optimization
    if key in ("world_size", "global_num_gpus"):
        return world_size if world_size is not None else ...
    if key in ("rank", "local_rank"):
        return ... if world_size is None else (0 if world_size == 1 else "a different value on each process")
    if key == "padded_vocab_size":
        return _padded_vocab(c)
    if key == "iteration":
        return _start_iteration(c)
    return {
        "is_pipe_parallel": lambda: c.pipe_parallel_size >= 1,
        "optimizer_type": lambda: str(c.optimizer.get("type", "Adam")).lower(),
        "zero_stage": lambda: c.zero_stage,
        "zero_reduce_scatter": lambda: zero.get("reduce_scatter", True),
        "zero_contiguous_gradients": lambda: zero.get("contiguous_gradients", False),
        "zero_reduce_bucket_size": lambda: zero.get("reduce_bucket_size", int(5e8)),
        "zero_allgather_bucket_size": lambda: zero.get("allgather_bucket_size", int(5e8)),
        "batch_size": lambda: c.train_micro_batch_size_per_gpu,
        "clip_grad": lambda: c.gradient_clipping,
        "dynamic_loss_scale": lambda: c.upstream_keys.get("loss_scale") is None,
        "deepspeed": lambda: True,
    }[key]()


def _padded_vocab(c: NeoXConfig) -> Any:
    if c.vocab_size:
        return c.padded_vocab_size()
    from neox_fork.data.tokenizer import tokenizer_file_vocab_size

    try:
        size = tokenizer_file_vocab_size(c.vocab_file)
    except UserError:
        size = None
    return c.padded_vocab_size(size) if size else ...


def _start_iteration(c: NeoXConfig) -> Any:
    if not c.load or c.finetune:
        return 0
    from neox_fork.checkpoint.names import LATEST_FILE, pointed_step

    try:
        return (pointed_step(Path(c.load) / LATEST_FILE) or 0) if Path(c.load).is_dir() else 0
    except ValueError:  # `latest` names no step: the resume says so, naming the step folders that load
        return ...


def check_derived(c: NeoXConfig, world_size: int | None = None) -> None:
    """A derived key the config gives must equal what the run derives (checked once the run can tell)."""
    for key in keys_of(DERIVED):
        value = c.upstream_keys.get(key)
        if value is None:
            continue
        expected = _expected(c, key, world_size)
        if expected is ... or value == expected or (key == "optimizer_type" and str(value).lower() == expected):
            continue
        raise UserError(f"{c.where(key)}: {key} {value!r} contradicts this run, which derives {expected!r} "
                        f"({KEYS[key][3]}); upstream computes it itself: remove it")


def deepspeed_sections(c: NeoXConfig, ds: dict[str, Any]) -> dict[str, Any]:
    """`ds` with the passthrough keys the config sets merged in (dict sections key by key, the config's
    values winning), then deepspeed_extra_args on top, as upstream builds its DeepSpeed config."""
    for key in keys_of(DEEPSPEED):
        value = c.upstream_keys.get(key)
        if key == "deepspeed_extra_args" or not is_set(key, value):
            continue
        ds[key] = {**ds[key], **value} if isinstance(ds.get(key), dict) and isinstance(value, dict) else value
    ds.update(c.upstream_keys.get("deepspeed_extra_args") or {})
    return ds
