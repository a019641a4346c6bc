"""GPT-NeoX YAML files -> one typed, validated `NeoXConfig`.

Any number of files are merged in order (a later file overrides an earlier one, and the override is
logged). Keys may be written with `-` or `_`. Every key is checked against the dataclass below: an
unknown key, a wrong type or a value we cannot build is a `UserError` naming the file and key. Nothing
downstream reads the raw YAML again.

Sizes that follow from others (head size, SwiGLU width, rotary dims, padded vocabulary, batch sizes)
are properties, so they can never disagree with the keys they come from.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neox_fork.errors import UserError

log = logging.getLogger(__name__)

# The GPT-NeoX-20B tokenizer has 50,277 entries; used only to size a model whose tokenizer file is absent.
GPT_NEOX_20B_VOCAB_SIZE = 50277


@dataclass
class NeoXConfig:
    # --- parallelism ---
    pipe_parallel_size: int = 1  # pipelining is not implemented; 0 and 1 both mean "one stage"
    model_parallel_size: int = 1  # tensor-parallel size
    sequence_parallel: bool = False

    # --- model shape ---
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    seq_length: int = 128
    max_position_embeddings: int | None = None
    intermediate_size: int | None = None  # per SwiGLU branch, as in Hugging Face
    mlp_multiple_of: int = 1
    make_vocab_size_divisible_by: int = 128
    vocab_size: int | None = None  # overrides the tokenizer's size (tests, shape-only tools)

    # --- architecture (the values StableLmForCausalLM can represent) ---
    attention_head_type: str = "multihead"
    norm: str = "layernorm"
    layernorm_epsilon: float = 1e-5
    pos_emb: str = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rotary_interleaved: bool = False
    mlp_type: str = "gated"
    activation: str = "silu"
    no_weight_tying: bool = False
    gpt_j_residual: bool = False
    gpt_j_tied: bool = False
    output_layer_parallelism: str = "column"
    use_bias_in_norms: bool = True
    use_bias_in_attn_linear: bool = False
    use_bias_in_mlp: bool = False
    attention_config: list = field(default_factory=list)  # [[["flash"|"global"], n_layers], ...]
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    # --- initialisation ---
    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02

    # --- optimisation ---
    optimizer: dict = field(default_factory=lambda: {"type": "Adam", "params": {"lr": 1e-3}})
    lr: float | None = None  # NeoX also accepts lr at top level; optimizer.params.lr wins otherwise
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    warmup: float = 0.01  # fraction of lr_decay_iters
    warmup_iters: int | None = None  # a step count; overrides `warmup`
    weight_decay: float = 0.01
    gradient_clipping: float = 1.0
    zero_optimization: dict = field(default_factory=lambda: {"stage": 1})
    train_micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = 1
    train_batch_size: int | None = None  # if given, must equal micro x accumulation x data-parallel

    # --- precision ---
    precision: str = "fp32"
    bf16: dict | None = None
    fp16: dict | None = None
    fp32_allreduce: bool = False
    full_precision_lm_cross_entropy: bool = False

    # --- activation checkpointing and fused paths ---
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    recompute_granularity: str = "full"  # with checkpoint_activations: "full" layers or "selective" (attention core)
    partition_activations: bool = False
    synchronize_each_layer: bool = False
    scaled_upper_triang_masked_softmax_fusion: bool = False
    bias_gelu_fusion: bool = False
    bias_dropout_fusion: bool = False
    rope_fusion: bool = False
    layernorm_fusion: bool = False
    torch_compile: bool = False
    fused_cross_entropy: bool = True  # chunked loss that never holds fp32 logits for the whole batch

    # --- training loop ---
    train_iters: int = 100
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 10
    eval_batch_size: int | None = None
    eval_tasks: list = field(default_factory=list)
    log_interval: int = 10
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    max_nan_steps: int = 3
    exit_interval: int | None = None  # save and stop once the iteration is a multiple of this (Megatron)
    num_workers: int = 2
    distributed_backend: str = "nccl"

    # --- checkpoints ---
    save: str | None = None
    load: str | None = None
    checkpoint_factor: int | None = None
    save_interval: int | None = None  # Megatron's name for checkpoint_factor
    extra_save_iters: list | None = None
    keep_last_n_checkpoints: int | None = None
    finetune: bool = False
    # unpickle `load` without restriction (a checkpoint needing types beyond tensors and DeepSpeed's
    # own can then run code): only for checkpoints from someone you trust; logged when on
    trust_checkpoint: bool = False
    # also save each parameter's fp32 master and Adam moments unsharded over DP (per TP rank), so a run
    # can resume at another tensor-parallel size; costs about 12 bytes x parameters of extra disk
    save_universal: bool = False
    s3_path: str | None = None
    s3_sync_interval: int | None = None

    # --- data ---
    data_path: str | None = None
    train_data_paths: list = field(default_factory=list)
    train_data_weights: list = field(default_factory=list)
    valid_data_paths: list = field(default_factory=list)
    valid_data_weights: list = field(default_factory=list)
    test_data_paths: list = field(default_factory=list)
    test_data_weights: list = field(default_factory=list)
    split: str = "969, 30, 1"
    data_impl: str = "mmap"
    data_cache_path: str | None = None
    tokenizer_type: str = "HFTokenizer"
    vocab_file: str | None = None

    # --- logging ---
    tensorboard_dir: str | None = None
    log_dir: str | None = None
    use_wandb: bool = False
    wandb_host: str | None = None
    wandb_team: str | None = None
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_name: str | None = None

    # --- launch ---
    launcher: str = "pdsh"
    deepspeed_slurm: bool = False
    deepspeed_mpi: bool = False
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    num_nodes: int = -1
    num_gpus: int | None = None
    master_addr: str | None = None
    master_port: int = 29500
    no_ssh_check: bool = False
    comment: str | None = None
    account: str | None = None
    distributed_timeout_minutes: int = 10
    # One-node runs: after SIGUSR1/SIGTERM/SIGINT, deepy gives the ranks this long to finish their step and
    # save before it SIGKILLs them. 600 s covers StableLM-3B on one node: its checkpoint is 39 GB
    # (`tools/model_summary.py`: 14 bytes per parameter), 390 s at 100 MB/s, plus one step (~90 s on 8 GPUs).
    signal_grace_seconds: float = 600.0

    # Where each key came from (key -> file), for messages; not a config key.
    sources: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct) if self.pos_emb == "rotary" else 0

    @property
    def ffn_hidden_size(self) -> int:
        """Width of each SwiGLU branch: explicit, or GPT-NeoX's 2/3 x 4h rounded up to mlp_multiple_of."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = int(2 * 4 * self.hidden_size / 3)
        return self.mlp_multiple_of * math.ceil(width / self.mlp_multiple_of)

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def tie_word_embeddings(self) -> bool:
        return not self.no_weight_tying

    @property
    def learning_rate(self) -> float:
        params = self.optimizer.get("params", {})
        return float(params.get("lr", self.lr if self.lr is not None else 1e-3))

    @property
    def adam_betas(self) -> tuple[float, float]:
        betas = self.optimizer.get("params", {}).get("betas", [0.9, 0.999])
        return float(betas[0]), float(betas[1])

    @property
    def adam_eps(self) -> float:
        return float(self.optimizer.get("params", {}).get("eps", 1e-8))

    @property
    def zero_stage(self) -> int:
        return int(self.zero_optimization.get("stage", 0))

    @property
    def dtype_name(self) -> str:
        """'bf16', 'fp16' or 'fp32': `precision`, or the DeepSpeed-style `bf16/fp16: {enabled: true}`."""
        if (self.bf16 or {}).get("enabled") or self.precision in ("bfloat16", "bf16"):
            return "bf16"
        if (self.fp16 or {}).get("enabled") or self.precision in ("fp16", "float16", "half"):
            return "fp16"
        return "fp32"

    @property
    def recompute(self) -> str:
        """What the backward recomputes: 'none', 'full' (each layer's forward, Megatron's `full`) or
        'selective' (only rotary and the attention core, Megatron's `selective`)."""
        return self.recompute_granularity if self.checkpoint_activations else "none"

    @property
    def save_every(self) -> int | None:
        return self.checkpoint_factor or self.save_interval

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_steps(self) -> int:
        if self.warmup_iters is not None:
            return self.warmup_iters
        return int(round(self.warmup * self.decay_iters))

    @property
    def attention_types(self) -> list[str]:
        """One attention type per layer, expanded from `attention_config` (default: flash everywhere)."""
        if not self.attention_config:
            return ["flash"] * self.num_layers
        types_: list[str] = []
        for names, repeat in self.attention_config:
            for _ in range(repeat):
                types_.extend(names)
        return types_

    def padded_vocab_size(self, tokenizer_vocab_size: int | None = None) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by x tensor-parallel size."""
        size = self.vocab_size or tokenizer_vocab_size or GPT_NEOX_20B_VOCAB_SIZE
        multiple = self.make_vocab_size_divisible_by * self.model_parallel_size
        return multiple * math.ceil(size / multiple)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def global_batch_size(self, world_size: int) -> int:
        return (
            self.train_micro_batch_size_per_gpu
            * self.gradient_accumulation_steps
            * self.data_parallel_size(world_size)
        )

    def where(self, key: str) -> str:
        """The file that set `key`, for error messages."""
        return self.sources.get(key, "defaults")

    def to_dict(self) -> dict[str, Any]:
        """The keys as NeoX writes them (underscores), without bookkeeping: saved beside checkpoints."""
        out = dataclasses.asdict(self)
        out.pop("sources")
        return out

    # ------------------------------------------------------------------ validation
    def check_world_size(self, world_size: int) -> None:
        """Checks that need the number of ranks; run before any process starts."""
        tp = self.model_parallel_size
        if world_size % tp:
            raise UserError(
                f"{self.where('model_parallel_size')}: model_parallel_size {tp} does not divide "
                f"the world size {world_size} (num_nodes x num_gpus); use a divisor of {world_size}"
            )
        dp = world_size // tp
        if self.train_batch_size is not None and self.train_batch_size != self.global_batch_size(world_size):
            raise UserError(
                f"{self.where('train_batch_size')}: train_batch_size {self.train_batch_size} != "
                f"train_micro_batch_size_per_gpu {self.train_micro_batch_size_per_gpu} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} x data-parallel size {dp} "
                f"(= {self.global_batch_size(world_size)}); fix one of them or drop train_batch_size"
            )


# ---------------------------------------------------------------------- allowed values
_CHOICES = {
    "attention_head_type": ("multihead",),
    "norm": ("layernorm",),
    "pos_emb": ("rotary",),
    "mlp_type": ("gated",),
    "activation": ("silu", "swiglu"),
    "output_layer_parallelism": ("column",),
    "init_method": ("normal", "scaled_normal", "small_init", "wang_init"),
    "output_layer_init_method": ("normal", "scaled_normal", "small_init", "wang_init"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "precision": ("fp32", "float32", "bfloat16", "bf16", "fp16", "float16", "half"),
    "data_impl": ("mmap",),
    "tokenizer_type": ("HFTokenizer",),
    "launcher": ("pdsh", "openmpi", "mvapich", "slurm"),
    "distributed_backend": ("nccl", "gloo"),
    "recompute_granularity": ("full", "selective"),
}
_MUST_BE_FALSE = {
    "rotary_interleaved": "StableLM uses rotate-half rotary",
    "gpt_j_residual": "StableLmForCausalLM with two norms uses sequential residuals",
    "gpt_j_tied": "StableLmForCausalLM has no tied GPT-J residual",
    "use_bias_in_attn_linear": "StableLmForCausalLM has no attention output bias",
    "use_bias_in_mlp": "StableLmForCausalLM has no MLP biases",
}
_ATTENTION_TYPES = ("flash", "global")


# ---------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as Python and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_FIELDS = {f.name: f for f in dataclasses.fields(NeoXConfig) if f.name != "sources"}
_HINTS = typing.get_type_hints(NeoXConfig)


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """One YAML file as a dict with normalised keys; a missing file or a syntax error is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: YAML syntax error: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return {normalize_key(k): v for k, v in data.items()}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_key(key: str, value: Any, source: str) -> Any:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; see neox_fork/config.py for the known keys"
        raise UserError(f"{source}: unknown key '{key}'{hint}")
    hint = _HINTS[key]
    if not _type_ok(value, hint):
        raise UserError(
            f"{source}: key '{key}' must be {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        )
    if hint in (float, float | None) and value is not None:
        return float(value)
    return value


def merge_files(paths: list[str | os.PathLike]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge YAML files in order; returns (values, key -> file that set it). Overrides are logged."""
    if not paths:
        raise UserError("no config file given; pass one or more YAML files, e.g. configs/tiny.yml")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for path in paths:
        for key, value in read_yaml(path).items():
            value = _check_key(key, value, str(path))
            if key in values and values[key] != value:
                log.info("config: %s overrides %s = %r (was %r from %s)", path, key, value, values[key], sources[key])
            values[key] = value
            sources[key] = str(path)
    return values, sources


def from_dict(values: dict[str, Any], sources: dict[str, str] | None = None, source: str = "config") -> NeoXConfig:
    """Build and validate a config from already-merged values (e.g. the dict saved beside a checkpoint)."""
    sources = dict(sources or {})
    checked = {}
    for key, value in values.items():
        key = normalize_key(key)
        checked[key] = _check_key(key, value, sources.get(key, source))
        sources.setdefault(key, source)
    config = NeoXConfig(**checked, sources=sources)
    validate(config)
    return config


def load_config(*paths: str | os.PathLike, overrides: dict[str, Any] | None = None) -> NeoXConfig:
    """Load, merge and validate NeoX YAML files (later files win), then apply `overrides`."""
    values, sources = merge_files(list(paths))
    for key, value in (overrides or {}).items():
        values[normalize_key(key)] = value
        sources[normalize_key(key)] = "overrides"
    return from_dict(values, sources)


def validate(c: NeoXConfig) -> None:
    """Checks that need only the config itself. Each failure names the file and the key."""

    def fail(key: str, message: str) -> None:
        raise UserError(f"{c.where(key)}: {message}")

    for key, choices in _CHOICES.items():
        if getattr(c, key) not in choices:
            fail(key, f"{key} {getattr(c, key)!r} is not supported; valid: {', '.join(choices)}")
    for key, why in _MUST_BE_FALSE.items():
        if getattr(c, key):
            fail(key, f"{key} true is not supported ({why}); set it to false")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
                "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "model_parallel_size",
                "mlp_multiple_of", "make_vocab_size_divisible_by", "checkpoint_num_layers", "log_interval",
                "eval_interval"):
        if getattr(c, key) < 1:
            fail(key, f"{key} must be at least 1, got {getattr(c, key)}")
    if c.pipe_parallel_size > 1:
        fail("pipe_parallel_size", f"pipe_parallel_size {c.pipe_parallel_size} is not supported; use 0 or 1 "
             "(tensor x data parallelism covers StableLM-3B)")
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
    for key, size in (("num_attention_heads", c.num_attention_heads), ("hidden_size", c.hidden_size),
                      ("intermediate_size", c.ffn_hidden_size)):
        if size % tp:
            fail("model_parallel_size", f"model_parallel_size {tp} does not divide {key} {size}; "
                 f"use a tensor-parallel size that divides {size}")
    if (c.sequence_parallel or c.partition_activations) and c.seq_length % tp:
        key = "sequence_parallel" if c.sequence_parallel else "partition_activations"
        fail(key, f"{key} splits the sequence over model_parallel_size {tp}, which does not divide "
             f"seq_length {c.seq_length}")
    attn = c.attention_config
    if attn:
        ok = all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], list) and isinstance(e[1], int)
                 for e in attn)
        if not ok:
            fail("attention_config", f"attention_config must look like [[[\"flash\"], {c.num_layers}]], got {attn}")
        if len(c.attention_types) != c.num_layers:
            fail("attention_config", f"attention_config covers {len(c.attention_types)} layers but num_layers is "
                 f"{c.num_layers}")
        bad = sorted(set(c.attention_types) - set(_ATTENTION_TYPES))
        if bad:
            fail("attention_config", f"attention type {bad[0]!r} is not supported; valid: {', '.join(_ATTENTION_TYPES)}")
    opt_type = str(c.optimizer.get("type", "")).lower()
    if opt_type not in ("adam", "adamw"):
        fail("optimizer", f"optimizer type {c.optimizer.get('type')!r} is not supported; valid: Adam, AdamW")
    if c.zero_stage not in (0, 1, 2):
        fail("zero_optimization", f"zero_optimization stage {c.zero_stage} is not supported; valid: 0, 1, 2")
    if c.signal_grace_seconds <= 0:
        fail("signal_grace_seconds", f"signal_grace_seconds must be positive, got {c.signal_grace_seconds}")
    if c.learning_rate <= 0:
        fail("optimizer", f"learning rate must be positive, got {c.learning_rate}")
    if not 0 <= c.warmup <= 1:
        fail("warmup", f"warmup is a fraction of lr_decay_iters in [0, 1], got {c.warmup}; "
             "use warmup_iters for a step count")
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
    if c.num_gpus is not None:
        c.check_world_size(c.num_gpus * max(c.num_nodes, 1))


def deepspeed_config(c: NeoXConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config derived from ours: batch sizes, ZeRO, precision, clipping.

    The optimizer and LR schedule are built by neox_fork.training (AdamW with no decay on norms and
    biases, warmup + cosine), so they are not in this dict. `torch_adam` keeps optimizer steps
    bit-identical across a resume (DeepSpeed's CPU FusedAdam recomputes beta^t after a step jump).
    """
    zero = {k: v for k, v in c.zero_optimization.items() if k != "cpu_offload"}
    zero.setdefault("stage", 0)
    if c.zero_optimization.get("cpu_offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": c.global_batch_size(world_size),
        "train_micro_batch_size_per_gpu": c.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "gradient_clipping": c.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": c.wall_clock_breakdown,
        "zero_allow_untested_optimizer": True,
    }
    if c.dtype_name == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif c.dtype_name == "fp16":
        ds["fp16"] = {"enabled": True, **{k: v for k, v in (c.fp16 or {}).items() if k != "enabled"}}
    return ds
