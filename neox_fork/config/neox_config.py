"""GPT-NeoX YAML files -> one typed, validated `NeoXConfig`.

Any number of files are merged in order (a later file overrides an earlier one, and the override is
logged). Keys may be written with `-` or `_`. Every key is checked against the dataclass below: an
unknown key, a wrong type or a value we cannot build is a `UserError` naming the file and key (the
allowed values and the whole-config checks are in `config/rules.py`). Nothing downstream reads the raw
YAML again.

Sizes that follow from others (head size, SwiGLU width, rotary dims, padded vocabulary, batch sizes)
are properties, so they can never disagree with the keys they come from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from neox_fork.config import upstream as config_upstream
from neox_fork.config.rules import GATED_ACTIVATIONS, lora_targets
from neox_fork.errors import UserError

# The GPT-NeoX-20B tokenizer has 50,277 entries; used only to size a model whose tokenizer file is absent.
GPT_NEOX_20B_VOCAB_SIZE = 50277


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Round the vocabulary up so the embedding splits evenly: multiple of divisible_by * tp.

    GPT-NeoX-20B: 50277 ids, divisible_by 128, tp 1 -> 50304.
    """
    if vocab_size < 1 or divisible_by < 1 or tensor_parallel_size < 1:
        raise UserError(
            f"padded vocab size needs positive sizes, got vocab_size={vocab_size}, "
            f"make_vocab_size_divisible_by={divisible_by}, model_parallel_size={tensor_parallel_size}"
        )
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _key(default=None, doc: str = "", *, factory=None, no_effect: bool = False):
    """A config key: its default (upstream NeoXArgs' unless the doc says otherwise) and what it does here.
    `no_effect`: accepted so GPT-NeoX configs load, but nothing here reads it (logged when set)."""
    meta = {"doc": doc, "no_effect": no_effect}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NeoXConfig:
    # --- parallelism ---
    pipe_parallel_size: int = _key(0, "0: one model, no PipelineModule; 1: the same model (gpt-neox then writes "
                                      "per-layer checkpoint files); P > 1: the layers split into P pipeline stages "
                                      "(DeepSpeed's pipeline engine, docs/parallelism.md)")
    pipe_partition_method: str = _key("type:transformer|mlp", "how pipeline stages split GPT-NeoX's layer list: "
                                      "type:REGEX (balance the layers whose class name matches), parameters, uniform")
    model_parallel_size: int = _key(1, "tensor-parallel size: ranks that split each weight matrix (megatron-core)")
    context_parallel_size: int = _key(1, "not upstream (the key of gpt-neox PR #1299): ranks that split each sequence "
                                         "(DeepSpeed-Ulysses all-to-all over heads; docs/long-context.md); training "
                                         "only, with tensor and data parallelism and ZeRO 0-2")
    sequence_parallel: bool = _key(False, "split norm/dropout/residual activations over the tensor-parallel group "
                                          "along the sequence (megatron-core's sequence-parallel mode)")

    # --- model shape ---
    num_layers: int = _key(2, "transformer layers (upstream: required; 2 here so a bare config builds)")
    hidden_size: int = _key(64, "model width (upstream: required)")
    num_attention_heads: int = _key(4, "query heads (upstream: required)")
    num_kv_heads: int | None = _key(None, "key/value heads for grouped-query attention; null = num_attention_heads")
    seq_length: int = _key(128, "training sequence length in tokens (upstream: required)")
    max_position_embeddings: int | None = _key(None, "positions the model supports (learned table size); null = "
                                                     "seq_length")
    intermediate_size: int | None = _key(None, "MLP width before upstream's sizing: with a gated activation "
                                               "(swiglu...) linear1 gets int(2/3 x this) rounded up to 2 x "
                                               "mlp_multiple_of; with mlp_type gated/llama it is the width of each "
                                               "branch, as in Hugging Face")
    expansion_factor: float | None = _key(None, "MLP width as a multiple of hidden_size (instead of "
                                                "intermediate_size; default 4)")
    mlp_multiple_of: int = _key(1, "round MLP widths up to a multiple of this")
    make_vocab_size_divisible_by: int = _key(128, "pad the vocabulary to a multiple of this x model_parallel_size")
    vocab_size: int | None = _key(None, "not upstream: override the tokenizer's size (tests, shape-only tools)")

    # --- architecture ---
    attention_head_type: str = _key("multihead", "Stability's fork: only multihead (grouped-query attention is "
                                                 "num_kv_heads)")
    norm: str = _key("layernorm", "layernorm, or rmsnorm (parameter named `scale`, as upstream)")
    layernorm_epsilon: float = _key(1e-5, "LayerNorm epsilon")
    rms_norm_epsilon: float = _key(1e-8, "RMSNorm epsilon, inside the square root as in Llama / Hugging Face "
                                         "(upstream's plain RMSNorm adds it to the root)")
    pos_emb: str = _key("learned", "learned (a position table added to the embeddings), rotary, or none")
    rotary_pct: float = _key(1.0, "fraction of each head's dims that rotary rotates")
    rotary_emb_base: int = _key(10000, "rotary frequency base")
    rotary_interleaved: bool = _key(False, "Stability's fork: only false (rotate-half, as gpt-neox)")
    rope_scaling: dict | None = _key(None, "not upstream (the name upstream's PR #1001 proposed): RoPE scaling as "
                                           "transformers' rope_parameters, e.g. {rope_type: yarn, factor: 4, "
                                           "original_max_position_embeddings: 4096}; rope_type linear, dynamic, "
                                           "yarn, longrope or llama3 with transformers' field names; null: plain "
                                           "rotary (docs/rope-scaling.md)")
    mlp_type: str = _key("regular", "regular (upstream: gated when `activation` is swiglu/geglu/reglu/bilinear/glu);"
                                    " gated (Stability's fork: activation(gate) x up, width from mlp_multiple_of); "
                                    "llama (older upstream: the same, width rounded to 256)")
    activation: str = _key("gelu", "MLP activation: gelu (exact erf form), relu, silu/swish, mish, softsign, or the"
                                   " gated swiglu, geglu, reglu, bilinear, glu")
    no_weight_tying: bool = _key(False, "false: the output layer reuses the word embedding")
    gpt_j_residual: bool = _key(False, "true: x + attn(ln1(x)) + mlp(ln2(x)) in parallel (Pythia, GPT-NeoX-20B)")
    gpt_j_tied: bool = _key(False, "only false (one norm shared by attention and MLP is not built)")
    output_layer_parallelism: str = _key("column", "only column (the output layer is split over the vocabulary)")
    use_bias_in_norms: bool = _key(True, "LayerNorm with a bias (RMSNorm never has one, as upstream)")
    use_bias_in_attn_linear: bool = _key(True, "biases in the QKV and attention output projections")
    use_bias_in_mlp: bool = _key(True, "biases in both MLP linears")
    use_qk_layernorm: bool = _key(False, "one `norm` over [heads, head_dim] for queries and keys, before rotary, as "
                                         "upstream (LayerNorm: over both dims; RMSNorm: per head); not with "
                                         "num_kv_heads, LayerNorm only at TP 1; no HF class computes it")
    sliding_window_width: int | None = _key(None, "Mistral's banded attention in every path and the cached decode: "
                                                  "a query sees itself and the W keys before it (upstream's mask; "
                                                  "HF Mistral's sliding_window is W + 1)")
    attention_config: list = _key(factory=list, doc="[[[type, ...], repeat], ...] per layer: flash or global "
                                                    "(both exact attention); default flash everywhere")
    # --- mixture of experts (neox_fork/model/moe.py: megatron-core's MoELayer, dropless) ---
    moe_num_experts: int = _key(1, "experts per MoE layer; 1: dense MLPs everywhere")
    moe_expert_interval: int = _key(1, "layer i (from 0) is MoE when i % interval == 0, as upstream")
    moe_top_k: int = _key(1, "experts each token is routed to")
    moe_router_type: str = _key("sinkhorn", "sinkhorn (training picks experts by Sinkhorn-balanced scores; "
                                            "evaluation by top-k, as upstream) or topk (softmax top-k)")
    moe_normalize_expert_weights: bool = _key(False, "topk only: the k chosen softmax weights are renormalised to "
                                                     "sum 1 (Mixtral's); false: upstream's raw softmax weights")
    moe_aux_loss_coeff: float = _key(0.0, "topk only: coefficient of the Switch load-balancing loss added to the "
                                          "training loss (per MoE layer); upstream has none (sinkhorn balances)")
    moe_lbl_in_fp32: bool = _key(False, "compute the router logits, and so the load-balancing loss, in fp32")
    moe_jitter_eps: float | None = _key(None, "topk: router inputs times noise from U(1-eps, 1+eps), in training")
    moe_grouped_gemm: bool | None = _key(None, "experts of a layer in two grouped GEMMs (torch's grouped_mm) instead "
                                               "of one GEMM pair each; null: grouped where torch has the kernel (CUDA, "
                                               "bf16, sm80+), else one after another; Megatron-LM's key")
    expert_model_parallel_size: int = _key(1, "MoE experts split over this many data-parallel ranks (megatron-"
                                           "core's expert parallelism; at TP > 1 each expert is also split over the "
                                           "TP group like the dense MLP); upstream's older moe_expert_parallel_size")
    hidden_dropout: float = _key(0.0, "dropout on the embeddings and on each residual branch")
    attention_dropout: float = _key(0.0, "dropout on attention probabilities")

    # --- initialisation ---
    init_method: str = _key("normal", "initialiser of all weights but the residual outputs: normal, "
                                      "scaled_normal, small_init, wang_init")
    output_layer_init_method: str = _key("scaled_normal", "initialiser of the attention output and second MLP "
                                                          "linear")
    init_method_std: float = _key(0.02, "std of normal / scaled_normal")

    # --- optimisation ---
    optimizer: dict = _key(factory=lambda: {"type": "Adam", "params": {"lr": 1e-3}},
                           doc="{type, params}: type Adam/AdamW (torch's AdamW, decoupled decay), cpu_adam "
                               "(DeepSpeed's CPU Adam, with ZeRO-Offload), cpu_torch_adam (torch's AdamW, with "
                               "ZeRO-Offload), sgd (torch's SGD), lion (lion-pytorch), madgrad_wd (madgrad), sm3 "
                               "(pytorch-optimizer); params: lr and the type's own (docs/optimizers.md); onebitadam "
                               "is refused (not in DeepSpeed 0.19); upstream: required")
    use_bnb_optimizer: bool = _key(False, "type adam: bitsandbytes' Adam8bit (8-bit moments, decoupled decay) instead "
                                          "of torch's AdamW, as upstream; one line if bitsandbytes is not installed")
    lr: float | None = _key(None, "learning rate if optimizer.params has none")
    min_lr: float = _key(0.0, "floor of the decayed learning rate")
    lr_decay_style: str = _key("linear", "linear, cosine or constant after warmup")
    lr_decay_iters: int | None = _key(None, "steps over which the rate decays; null = train_iters")
    lr_decay_fraction: float | None = _key(None, "lr_decay_iters as a fraction of train_iters, if that is null")
    warmup: float = _key(0.01, "warmup as a fraction of lr_decay_iters")
    warmup_iters: int | None = _key(None, "not upstream: warmup as a step count; overrides warmup")
    weight_decay: float = _key(0.1, "decoupled weight decay on matrices (not on norms and biases)")
    gradient_clipping: float = _key(1.0, "clip the global gradient norm to this (0 disables)")
    zero_optimization: dict = _key(factory=lambda: {"stage": 0}, doc="DeepSpeed ZeRO settings; stage 0, 1 or 2 "
                                                                     "(default stage 0, as DeepSpeed's)")
    train_micro_batch_size_per_gpu: int = _key(1, "sequences per rank per micro-step (upstream: required)")
    gradient_accumulation_steps: int = _key(1, "micro-steps per optimizer step")
    gas: int | None = _key(None, "upstream's other name for gradient_accumulation_steps")
    train_batch_size: int | None = _key(None, "if given, must equal micro x accumulation x data-parallel size")

    # --- precision ---
    precision: str = _key("fp32", "fp32, bfloat16 or fp16 (upstream: derived from the fp16/bf16 sections)")
    bf16: dict | None = _key(None, "DeepSpeed section; enabled: true means bfloat16")
    fp16: dict | None = _key(None, "DeepSpeed section; enabled: true means fp16 with loss scaling")
    fp32_allreduce: bool = _key(False, "all-reduce in fp32 (DeepSpeed reduces gradients in fp32 here anyway)",
                                no_effect=True)
    full_precision_lm_cross_entropy: bool = _key(False, "Stability's fork: the loss in fp32")

    # --- activation checkpointing and fused paths ---
    checkpoint_activations: bool = _key(False, "recompute each group of layers in the backward pass")
    checkpoint_num_layers: int = _key(1, "layers per checkpointed group")
    recompute_granularity: str = _key("full", "with checkpoint_activations: full (each layer's forward) or "
                                              "selective (only rotary and the attention core), as Megatron")
    partition_activations: bool = _key(False, "upstream: DeepSpeed's partitioning of checkpointed activations over "
                                              "the TP group; here it turns on sequence_parallel (the same split)")
    synchronize_each_layer: bool = _key(False, "a device sync around each checkpointed layer", no_effect=True)
    scaled_upper_triang_masked_softmax_fusion: bool = _key(False, "Megatron's fused softmax (attention is "
                                                                  "flash/SDPA here)", no_effect=True)
    bias_gelu_fusion: bool = _key(False, "upstream's fused bias + tanh-approximated GeLU (exact GeLU here)",
                                  no_effect=True)
    bias_dropout_fusion: bool = _key(False, "upstream's fused bias + dropout + add", no_effect=True)
    rope_fusion: bool = _key(False, "upstream's fused rotary kernel (see neox_fork/model/fused.py for ours)",
                             no_effect=True)
    layernorm_fusion: bool = _key(False, "Apex fused LayerNorm (torch's LayerNorm is fused)", no_effect=True)
    torch_compile: bool = _key(False, "not upstream: torch.compile each transformer layer")
    fused_cross_entropy: bool = _key(True, "not upstream: chunked head + loss that never holds the fp32 logits of "
                                           "the whole batch")

    # --- training loop ---
    train_iters: int = _key(100, "optimizer steps to train (upstream: required)")
    seed: int = _key(1234, "seed of weights, data order and dropout")
    eval_interval: int = _key(1000, "steps between validation runs")
    eval_iters: int = _key(100, "batches per validation run")
    eval_batch_size: int | None = _key(None, "Stability's fork: micro-batch for evaluation; null = training's")
    eval_tasks: list = _key(factory=list, doc="lm-eval tasks to run at each eval_interval, and eval.py's tasks")
    log_interval: int = _key(100, "steps between progress lines and metrics rows")
    steps_per_print: int = _key(10, "DeepSpeed's own progress print (replaced by log_interval)", no_effect=True)
    wall_clock_breakdown: bool = _key(False, "DeepSpeed's per-phase timers")
    train_epochs: int | None = _key(None, "passes over the training data: sets train_iters to epochs x one epoch's "
                                          "samples // global batch (give it instead of train_iters)")
    eod_mask_loss: bool = _key(False, "no loss where the input token is the end-of-document id")
    # document masks for packed pretraining samples (docs/long-context.md#document-masks)
    reset_attention_mask: bool = _key(False, "not upstream (Megatron-LM's name): packed documents do not attend "
                                             "to each other; a document ends at each end-of-document token (flash-attn "
                                             "varlen on GPUs, a block-diagonal causal mask elsewhere)")
    reset_position_ids: bool = _key(False, "not upstream (Megatron-LM's name): positions (rotary or learned) restart "
                                           "at 0 after each end-of-document token")
    max_nan_steps: int = _key(3, "not upstream: stop after this many skipped updates in a row (a non-finite loss, "
                                 "or non-finite gradients DeepSpeed or the loop skips; docs/fault-handling.md)")
    # skipping data and stopping on a loss spike (docs/fault-handling.md)
    skip_train_iteration_ranges: list | None = _key(None, "Stability's fork, not upstream GPT-NeoX: [[first, last], "
                                                    "...] steps (inclusive, as the log numbers them) whose batches "
                                                    "are never read or trained; the step counter, data position "
                                                    "and LR schedule still advance over them")
    loss_spike_factor: float | None = _key(None, "not upstream: save and stop when a step's loss exceeds this many "
                                                 "times the mean loss of the last loss_spike_window trained steps; "
                                                 "null: off")
    loss_spike_window: int = _key(100, "not upstream: trained steps whose mean loss loss_spike_factor compares "
                                       "with (judged once that many are seen since the start or the resume)")
    exit_interval: int | None = _key(None, "save and stop once the step is a multiple of this")
    num_workers: int = _key(2, "data-loader worker processes (at most 2 used)")
    distributed_backend: str = _key("nccl", "nccl or gloo")

    # --- checkpoints ---
    save: str | None = _key(None, "checkpoint folder to write")
    load: str | None = _key(None, "checkpoint folder to resume from")
    checkpoint_factor: int | None = _key(None, "save every this many steps")
    save_interval: int | None = _key(None, "Megatron's name for checkpoint_factor")
    extra_save_iters: list | None = _key(None, "further steps at which to save")
    keep_last_n_checkpoints: int | None = _key(None, "delete older step folders beyond this many")
    async_save: bool = _key(False, "not upstream (Megatron's name): copy a save's tensors to host memory and write "
                                   "them in a background thread while training goes on; the step folder becomes "
                                   "`latest` once every rank has written it (checkpoint/async_writer.py)")
    finetune: bool = _key(False, "load weights only: optimizer, schedule and data start fresh")
    trust_checkpoint: bool = _key(False, "not upstream: unpickle `load` without restriction (a checkpoint needing "
                                         "types beyond tensors and DeepSpeed's own can then run code): only for "
                                         "checkpoints from someone you trust; logged when on")
    load_universal: bool = _key(False, "not upstream: resume from the universal checkpoint that "
                                       "tools/ckpts/to_universal.py made of `load` (DeepSpeed's Universal "
                                       "Checkpointing), at any "
                                       "model_parallel_size, GPU count and ZeRO stage 1 or 2; a newer regular "
                                       "checkpoint in `load` (saved after the change) is loaded instead")
    no_save_optim: bool = _key(False, "leave the optimizer states out of saves (upstream: ignored with DeepSpeed); "
                                      "such a checkpoint resumes only with no_load_optim")
    no_save_rng: bool = _key(False, "leave the RNG states out of saves")
    no_load_optim: bool = _key(False, "resume weights, iteration and RNG but fresh optimizer states and LR schedule")
    no_load_rng: bool = _key(False, "resume without restoring the saved RNG states")
    override_lr_scheduler: bool = _key(False, "on resume, the schedule (lr, min_lr, warmup, decay iters and style) "
                                              "comes from this config; neither this nor the next: they must match")
    use_checkpoint_lr_scheduler: bool = _key(False, "on resume, the schedule comes from the checkpoint")
    checkpoint_validation_with_forward_pass: bool = _key(False, "save the logits of a fixed input with each "
                                                                "checkpoint; on resume recompute and stop if they differ")
    s3_path: str | None = _key(None, "upload checkpoints to S3 (not built)", no_effect=True)
    s3_sync_interval: int | None = _key(None, "S3 upload interval (not built)", no_effect=True)

    # --- data ---
    data_path: str | None = _key(None, "one mmap dataset prefix split by `split`")
    train_data_paths: list = _key(factory=list, doc="training dataset prefixes (blended)")
    train_data_weights: list = _key(factory=list, doc="blend weights, one per training path")
    valid_data_paths: list = _key(factory=list, doc="validation dataset prefixes")
    valid_data_weights: list = _key(factory=list, doc="blend weights, one per validation path")
    test_data_paths: list = _key(factory=list, doc="test dataset prefixes")
    test_data_weights: list = _key(factory=list, doc="blend weights, one per test path")
    train_label_data_paths: list = _key(factory=list, doc="loss labels beside train_data_paths, one per path (the "
                                        "chat tool's *_label_document: -100 = not trained); masked fine-tuning")
    valid_label_data_paths: list = _key(factory=list, doc="loss labels beside valid_data_paths, one per path")
    test_label_data_paths: list = _key(factory=list, doc="loss labels beside test_data_paths, one per path")
    pack_impl: str = _key("packed", "packed (concatenate, cut at seq_length; without label data megatron-core's "
                          "samples as before), pack_until_overflow "
                          "(whole documents per sample until the next does not fit) or unpacked (one per sample, "
                          "padded); with label data or a pack_impl other than packed, attention and positions "
                          "restart at every document (docs/training.md)")
    allow_chopped: bool = _key(True, "pack_until_overflow/unpacked: cut a document longer than seq_length + 1 "
                               "tokens (true) or skip it (false); the count is logged once")
    split: str = _key("969, 30, 1", "train/valid/test proportions of data_path")
    data_impl: str = _key("mmap", "only mmap (upstream's default `infer` finds mmap for the files it writes)")
    weight_by_num_documents: bool = _key(False, "blend weights from each path's document count (replaces "
                                                "*_data_weights): p_i ~ (n_i/N)^alpha x (1 - n_i/N), normalised")
    weighted_sampler_alpha: float = _key(1.0, "alpha of weight_by_num_documents (0: equal, 1: by documents)")
    data_cache_path: str | None = _key(None, "folder for the sample index caches; null = beside the data")
    tokenizer_type: str = _key("GPT2BPETokenizer", "GPT2BPETokenizer (vocab_file + merge_file), HFGPT2Tokenizer, "
                               "SPMTokenizer, CharLevelTokenizer, TiktokenTokenizer or HFTokenizer, as upstream; "
                               "TiktokenTokenizer reads a local .tiktoken file where upstream downloads an encoding")
    vocab_file: str | None = _key(None, "the tokenizer's file: GPT-2 vocab.json, tokenizer.json, sentencepiece .model, "
                                  ".tiktoken, or HFGPT2Tokenizer's folder")
    merge_file: str | None = _key(None, "GPT-2 merges.txt (GPT2BPETokenizer)")

    # --- post-training: DPO, KTO, reward models (neox_fork/training/preference.py, neox_fork/data/pairwise.py) ---
    train_impl: str = _key("normal", "the objective: normal (language modelling), dpo, kto or rm (reward model); "
                                     "upstream's reinforce is not built")
    dataset_impl: str = _key("gpt2", "gpt2 (the data paths) or pairwise (pos_*/neg_* pairs, for dpo and rm)")
    pos_train_data_paths: list = _key(factory=list, doc="pairwise: chosen answers' dataset prefixes (training)")
    neg_train_data_paths: list = _key(factory=list, doc="pairwise: rejected answers, pair i with pos pair i")
    pos_train_label_data_paths: list = _key(factory=list, doc="pairwise: labels of pos_train_data_paths (-100: "
                                                              "not trained); empty: every real token trained")
    neg_train_label_data_paths: list = _key(factory=list, doc="pairwise: labels of neg_train_data_paths")
    pos_valid_data_paths: list = _key(factory=list, doc="pairwise: chosen answers for validation")
    neg_valid_data_paths: list = _key(factory=list, doc="pairwise: rejected answers for validation")
    pos_valid_label_data_paths: list = _key(factory=list, doc="pairwise: labels of pos_valid_data_paths")
    neg_valid_label_data_paths: list = _key(factory=list, doc="pairwise: labels of neg_valid_data_paths")
    pos_test_data_paths: list = _key(factory=list, doc="pairwise: chosen answers for test (not read here)")
    neg_test_data_paths: list = _key(factory=list, doc="pairwise: rejected answers for test (not read here)")
    pos_test_label_data_paths: list = _key(factory=list, doc="pairwise: labels of pos_test_data_paths")
    neg_test_label_data_paths: list = _key(factory=list, doc="pairwise: labels of neg_test_data_paths")
    train_reward_data_paths: list = _key(factory=list, doc="kto: one reward per document of train_data_paths "
                                                           "(--reward-key); above 0 desirable, below 0 undesirable")
    valid_reward_data_paths: list = _key(factory=list, doc="kto: rewards of valid_data_paths")
    test_reward_data_paths: list = _key(factory=list, doc="kto: rewards of test_data_paths (not read here)")
    dpo_beta: float = _key(0.1, "dpo: beta, the strength of the pull towards the reference")
    dpo_fp32: bool = _key(True, "dpo: log-probabilities from fp32 logits")
    dpo_reference_free: bool = _key(False, "dpo: no reference model (its log-probabilities taken as 0)")
    kto_beta: float = _key(0.1, "kto: beta")
    kto_fp32: bool = _key(True, "kto: log-probabilities from fp32 logits")
    kto_desirable_weight: float = _key(1.0, "kto: weight of desirable (reward > 0) examples")
    kto_undesirable_weight: float = _key(1.0, "kto: weight of undesirable (reward < 0) examples")
    z_loss: float = _key(0.0, "rm: adds z_loss x (r_chosen^2 + r_rejected^2) to the loss, keeping scores near 0")
    precompute_model_name: str | None = _key(None, "dpo: the reference log-probabilities are read from PREFIX_NAME "
                                                   "beside each pos/neg prefix (written by "
                                                   "tools/datasets/precompute_reference.py) instead of a frozen "
                                                   "reference model (kto: not read yet)")

    # --- LoRA adapters (neox_fork/model/adapters.py; the names peft and axolotl use) ---
    adapter: str | None = _key(None, "not upstream: `lora` trains low-rank adapters on the lora_target_modules and "
                                     "freezes every other weight (axolotl's key); `qlora` the same with the base "
                                     "linears in bitsandbytes' 4-bit NF4 while training; null trains the whole "
                                     "model")
    lora_r: int = _key(8, "adapter rank r: each adapted W (out x in) gets B (out x r) @ A (r x in)")
    lora_alpha: float = _key(16, "adapter scale numerator: the update is (lora_alpha / lora_r) B A x, or "
                                 "lora_alpha / sqrt(lora_r) with use_rslora")
    lora_dropout: float = _key(0.0, "dropout on the adapters' input (the base layer sees the input undropped)")
    lora_target_modules: list | str = _key(factory=lambda: ["query_key_value", "dense", "linear1", "linear2"],
                                     doc="linears given adapters: query_key_value (fused QKV; HF q_proj/k_proj/"
                                         "v_proj), dense (attention output; o_proj), linear1 (MLP in; "
                                         "dense_h_to_4h, gate_proj/up_proj), linear2 (MLP out; dense_4h_to_h, "
                                         "down_proj), or all-linear")
    use_rslora: bool = _key(False, "rank-stabilised LoRA: scale lora_alpha / sqrt(lora_r) (peft's use_rslora)")

    # --- text generation (generate.py / eval.py with configs; neox_fork/inference/generation.py) ---
    text_gen_type: str | None = _key(None, "generate.py: unconditional (num_samples from an empty context), "
                                           "input-file (sample_input_file) or interactive (stdin); upstream's "
                                           "precompute is not built")
    maximum_tokens: int = _key(64, "tokens to generate per sample (fewer when the context nears seq_length)")
    temperature: float = _key(0.0, "sampling temperature; with top_k 0 and top_p 0 too, 0 is greedy")
    top_p: float = _key(0.0, "nucleus sampling threshold; 0 disables it")
    top_k: int = _key(0, "sample among the k most likely tokens; 0 disables it")
    prompt_end: str = _key("\n", "what separates prompts in sample_input_file (interactive: one prompt per line)")
    sample_input_file: str | None = _key(None, "text_gen_type input-file: the prompts")
    sample_output_file: str | None = _key("samples.txt", "generate.py writes one JSON record per sample here "
                                                         "(context, text, length, finished, message, "
                                                         "duration_seconds)")
    num_samples: int = _key(1, "text_gen_type unconditional: samples to draw")
    recompute: bool = _key(False, "generate.py: recompute every position each step instead of a KV cache")
    eval_results_prefix: str = _key("", "eval.py with configs: results go to PREFIX_eval_results_DATE.json "
                                        "(empty: CHECKPOINT/eval/results_stepN.json)")

    # --- logging ---
    tensorboard_dir: str | None = _key(None, "write TensorBoard scalars here")
    log_dir: str | None = _key(None, "upstream's text-log folder (metrics go to SAVE/metrics.jsonl here)",
                               no_effect=True)
    use_wandb: bool = _key(False, "log metrics to Weights & Biases")
    wandb_host: str | None = _key("https://api.wandb.ai", "W&B server")
    wandb_team: str | None = _key(None, "W&B entity")
    wandb_project: str | None = _key("neox", "W&B project")
    wandb_group: str | None = _key(None, "W&B run group")
    wandb_name: str | None = _key(None, "W&B run name")
    use_comet: bool | None = _key(None, "log metrics to Comet (comet_ml; COMET_* variables choose online/offline)")
    comet_workspace: str | None = _key(None, "Comet workspace")
    comet_project: str | None = _key(None, "Comet project")
    comet_experiment_name: str | None = _key(None, "Comet experiment name")
    comet_tags: list | None = _key(None, "Comet experiment tags")
    comet_others: dict | None = _key(None, "extra metadata logged to the Comet experiment")
    log_grad_norm: bool = _key(False, "log each parameter's gradient norm (before clipping) every step: "
                                      "gradient_norms/NAME")
    log_param_norm: bool = _key(False, "log each parameter's norm after the update every step: parameter_norms/NAME")
    log_optimizer_states: bool = _key(False, "log the norm of each optimizer state tensor every step: "
                                             "optimizer_state_norms/INDEX_KEY (Adam: exp_avg, exp_avg_sq; lion: "
                                             "exp_avg; sgd/sm3: momentum_buffer; madgrad_wd: grad_sum_sq, s, x0)")
    log_grad_pct_zeros: bool = _key(False, "log the percentage of zero gradient entries: pct_grad_zeros/NAME")
    log_gradient_noise_scale: bool = _key(False, "log the gradient noise scale B_simple (arXiv:1812.06162) as "
                                                 "noise_scale (upstream: train/noise_scale)")
    gradient_noise_scale_n_batches: int = _key(5, "steps whose gradients make the large batch of the noise scale")
    gradient_noise_scale_cpu_offload: bool = _key(False, "keep the noise scale's gradient buffer in CPU memory")
    profile: bool = _key(False, "torch profiler trace of steps profile_step_start..stop, one file per rank in "
                                "tensorboard_dir (else save)")
    profile_step_start: int = _key(10, "first profiled step")
    profile_step_stop: int = _key(12, "last profiled step")
    memory_profiling: bool = _key(False, "CUDA memory snapshot (mem_snapshot.pickle) in memory_profiling_path at "
                                         "the profiled steps; one warning line on a device without CUDA")
    memory_profiling_path: str | None = _key(None, "folder of the memory snapshot")

    # --- launch ---
    launcher: str = _key("pdsh", "multi-node launcher: pdsh, openmpi, mvapich or slurm")
    deepspeed_slurm: bool = _key(False, "start ranks with srun inside a Slurm allocation")
    deepspeed_mpi: bool = _key(False, "ranks discover themselves from MPI variables")
    hostfile: str | None = _key(None, "hosts and slots (`host slots=N`)")
    include: str | None = _key(None, "hosts/slots to use, e.g. host1:0,1@host2")
    exclude: str | None = _key(None, "hosts/slots to leave out")
    num_nodes: int = _key(-1, "nodes to use; -1 = all")
    num_gpus: int | None = _key(None, "GPUs per node; null = all")
    master_addr: str | None = _key(None, "rendezvous host; null = the first host")
    master_port: int = _key(29500, "rendezvous port")
    no_ssh_check: bool = _key(False, "skip DeepSpeed's ssh check of the hosts")
    comment: str | None = _key(None, "Slurm --comment")
    account: str | None = _key(None, "Slurm --account")
    distributed_timeout_minutes: int = _key(10, "collective timeout")
    # 600 s covers StableLM-3B on one node: its checkpoint is 39 GB (`tools/model_summary.py`: 14 bytes per
    # parameter), 390 s at 100 MB/s, plus one step (~90 s on 8 GPUs).
    signal_grace_seconds: float = _key(600.0, "not upstream: one-node runs: after SIGUSR1/SIGTERM/SIGINT, deepy "
                                              "gives the ranks this long to finish their step and save before it "
                                              "SIGKILLs them")
    # Hang detection (training/watchdog.py, launch/hangs.py): torchtitan's names for the first two. 0 turns one off.
    init_timeout_seconds: float = _key(1800.0, "not upstream (torchtitan's name): a rank that has not finished "
                                               "start-up (model, checkpoint load, data) and its first step in this "
                                               "long dumps every thread's stack and exits; deepy names it and exits "
                                               "75 (slurm/common.sh requeues); 0 = off")
    train_timeout_seconds: float = _key(600.0, "not upstream (torchtitan's name): the same for each later step "
                                               "(its data read, forward, backward, update and logging); 0 = off")
    save_timeout_seconds: float = _key(1800.0, "not upstream: the same for one checkpoint save; 0 = off")
    eval_timeout_seconds: float = _key(1800.0, "not upstream: the same for one evaluation (eval_iters batches "
                                               "and eval_tasks); 0 = off")

    # Where each key came from (key -> file), for messages; not a config key.
    sources: dict = field(default_factory=dict, repr=False, compare=False)
    upstream_keys: dict = field(default_factory=dict, repr=False)  # those given of config_upstream.KEYS
    given_files: dict = field(default_factory=dict, repr=False, compare=False)  # name -> bytes: ckpt configs/

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct) if self.pos_emb == "rotary" else 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def mlp_gated(self) -> bool:
        """activation(gate) x up: Stability's `mlp_type: gated`, older upstream's `llama`, or a gated activation."""
        return self.mlp_type in ("gated", "llama") or self.activation in GATED_ACTIVATIONS

    @property
    def mlp_activation(self) -> str:
        """The elementwise function of the MLP (of the gate when gated): gelu, relu, silu, ..."""
        name = GATED_ACTIVATIONS.get(self.activation, self.activation)
        return "silu" if name == "swish" else name

    @property
    def mlp_widths(self) -> tuple[int, int]:
        """(linear1 outputs, linear2 inputs), sized as the spelling that chose the MLP sizes it."""
        h = self.hidden_size
        base = self.intermediate_size or (int(self.expansion_factor * h) if self.expansion_factor else 4 * h)
        if self.mlp_type in ("gated", "llama"):  # Stability's fork / older upstream: per-branch width
            if self.intermediate_size is None:
                multiple = 256 if self.mlp_type == "llama" else self.mlp_multiple_of
                base = multiple * math.ceil(int(2 * base / 3) / multiple)
            return 2 * base, base
        out, into = base, base  # current upstream's ParallelMLP
        if self.mlp_gated:
            out = int(base * 2 / 3)
            into = out // 2
        m = self.mlp_multiple_of
        return 2 * m * math.ceil(out / (2 * m)), m * math.ceil(into / m)

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the MLP's hidden layer (of each branch when gated): linear2's input."""
        return self.mlp_widths[1]

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The linears that get LoRA adapters, in our names (query_key_value, dense, linear1, linear2); () without
        `adapter`."""
        return lora_targets(self.lora_target_modules) if self.adapter else ()

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
    def optimizer_kind(self) -> str:
        """optimizer.type lower-cased, as upstream compares it: adam, sgd, lion, ..."""
        return str(self.optimizer.get("type", "adam")).lower()

    @property
    def optimizer_offload(self) -> bool:
        """ZeRO-Offload of the optimizer: zero_optimization offload_optimizer (or upstream's cpu_offload: true)."""
        offload = self.zero_optimization.get("offload_optimizer")
        device = offload.get("device", "none") if isinstance(offload, dict) else offload
        return bool(self.zero_optimization.get("cpu_offload")) or device not in ("none", None, False)

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
    def activation_recompute(self) -> str:
        """What the backward recomputes: 'none', 'full' (each layer's forward, Megatron's `full`) or
        'selective' (only rotary and the attention core, Megatron's `selective`)."""
        return self.recompute_granularity if self.checkpoint_activations else "none"

    @property
    def save_every(self) -> int | None:
        return self.checkpoint_factor or self.save_interval

    @property
    def decay_iters(self) -> int:
        if self.lr_decay_iters is None and self.lr_decay_fraction is not None:
            return math.floor(self.train_iters * self.lr_decay_fraction)  # as upstream
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

    def unpadded_vocab_size(self, tokenizer_vocab_size: int | None = None) -> int:
        """The ids the run uses: `vocab_size` when set, else the tokenizer's, else GPT-NeoX-20B's."""
        return self.vocab_size or tokenizer_vocab_size or GPT_NEOX_20B_VOCAB_SIZE

    def padded_vocab_size(self, tokenizer_vocab_size: int | None = None) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by x tensor-parallel size."""
        return padded_vocab_size(self.unpadded_vocab_size(tokenizer_vocab_size), self.make_vocab_size_divisible_by,
                                 self.model_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that read different samples: the world over tensor x pipeline x context parallel sizes."""
        return world_size // (self.model_parallel_size * max(self.pipe_parallel_size, 1) * self.context_parallel_size)

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
        """The keys as NeoX writes them (underscores), without bookkeeping: saved beside checkpoints. Nulls that
        are defaults are left out (upstream's tools read a present key as set); upstream requires max_positions."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("sources", "given_files")}
        out.update(out.pop("upstream_keys"), max_position_embeddings=self.max_positions)
        return {k: v for k, v in out.items() if v is not None or k in _FIELDS and _FIELDS[k].default is not None}

    # ------------------------------------------------------------------ validation
    def check_world_size(self, world_size: int) -> None:
        """Checks that need the number of ranks; run before any process starts."""
        tp = self.model_parallel_size
        if world_size % tp:
            raise UserError(
                f"{self.where('model_parallel_size')}: model_parallel_size {tp} does not divide "
                f"the world size {world_size} (num_nodes x num_gpus); use a divisor of {world_size}"
            )
        pp = max(self.pipe_parallel_size, 1)
        if world_size % (tp * pp):
            raise UserError(
                f"{self.where('pipe_parallel_size')}: pipe_parallel_size {pp} x model_parallel_size {tp} does not "
                f"divide the world size {world_size} (num_nodes x num_gpus); use sizes whose product divides it"
            )
        cp = self.context_parallel_size
        if world_size % (tp * pp * cp):
            raise UserError(
                f"{self.where('context_parallel_size')}: context_parallel_size {cp} x model_parallel_size {tp} x "
                f"pipe_parallel_size {pp} does not divide the world size {world_size} (num_nodes x num_gpus); use "
                "sizes whose product divides it"
            )
        dp = self.data_parallel_size(world_size)
        if dp % self.expert_model_parallel_size:
            raise UserError(
                f"{self.where('expert_model_parallel_size')}: expert_model_parallel_size "
                f"{self.expert_model_parallel_size} does not divide the data-parallel size {dp} (experts are split "
                "over data-parallel ranks); use a divisor of it"
            )
        if self.train_batch_size is not None and self.train_batch_size != self.global_batch_size(world_size):
            raise UserError(
                f"{self.where('train_batch_size')}: train_batch_size {self.train_batch_size} != "
                f"train_micro_batch_size_per_gpu {self.train_micro_batch_size_per_gpu} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} x data-parallel size {dp} "
                f"(= {self.global_batch_size(world_size)}); fix one of them or drop train_batch_size"
            )
        config_upstream.check_derived(self, world_size)


_FIELDS = {f.name: f for f in dataclasses.fields(NeoXConfig) if "doc" in f.metadata}  # not the bookkeeping
