"""Pipeline parallelism: the model's layers split into `pipe_parallel_size` stages, run by DeepSpeed's pipeline
engine (why this engine: docs/parallelism.md).

The stages follow GPT-NeoX's layer list, so its partition methods and per-layer checkpoint files mean the
same here:

    0 EmbeddingPipe, 1 _pre_transformer_block, 2..L+1 ParallelTransformerLayerPipe,
    L+2 _post_transformer_block, L+3 NormPipe, L+4 ParallelLinearPipe (EmbeddingPipe again when tied)

`pipe_partition_method` splits that list as DeepSpeed's PipelineModule does (`uniform`: as many entries per
stage; `parameters`: balanced parameter counts of this TP rank; `type:REGEX`: balanced count of the entries
whose class name matches). The first stage holds the embedding, the last the final norm, the output layer and
the loss (and, with tied embeddings, its own copy of the embedding, whose gradient is summed with the first
stage's before every update, as DeepSpeed does for a TiedLayerSpec).

Every rank draws the whole model's initial weights (the same seed as one process) and keeps its stage's part
(model.NeoXModel with the other layers left out), so a run at any P starts from the weights of P = 1. The
stage's NeoXModel keeps the global names (`layers.5.*`): checkpoints, fine-tuning and the converters see the
same names at any P. LoRA adapters (model/adapters.py) are drawn whole the same way, so a stage's adapters are
those of P = 1; each stage saves its own in the layer files (training/state.py), and every stage must hold some
(check_optimizer_groups). `gradient_accumulation_steps` micro-batches are in flight per step (DeepSpeed's 1F1B
TrainSchedule); the NaN guard, LR-0 skip and `before_update` hook run at the schedule's optimizer step.
MoE layers (docs/moe.md): each one's load-balancing loss gets its gradient on the stage that holds it (megatron-core
attaches it to the layer's output); its metrics are read after each forward pass and summed over the stages. With
expert parallelism DeepSpeed's grid (its groups) takes TP x EP ranks as its model axis (build_pipeline).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from neox_fork.model import moe
from neox_fork.parallel import groups as parallel
from neox_fork.parallel.groups import checkpoint
from neox_fork.training.optim import deepspeed_skipped_update, skip_update, unchecked_nonfinite_grads

ENTRY_NAMES = ("EmbeddingPipe", "_pre_transformer_block", "ParallelTransformerLayerPipe", "_post_transformer_block",
               "NormPipe", "ParallelLinearPipe")


# ---------------------------------------------------------------------- partitioning
def entry_names(num_layers: int, tied: bool) -> list[str]:
    """The class (or function) name of each entry of GPT-NeoX's layer list."""
    emb, pre, layer, post, norm, head = ENTRY_NAMES
    return [emb, pre, *[layer] * num_layers, post, norm, emb if tied else head]


def entry_parameters(model) -> list[int]:
    """Trainable parameters of this TP rank in each entry of the layer list (functions: 0)."""
    def count(*modules):
        return sum(p.numel() for m in modules if m is not None for p in m.parameters() if p.requires_grad)

    emb = count(model.word_embeddings, getattr(model, "position_embeddings", None))
    head = count(model.word_embeddings) if model.shape.tie_word_embeddings else count(model.output_layer)
    return [emb, 0, *[count(layer) for layer in model.layers], 0, count(model.final_norm), head]


def partition(method: str, names: list[str], params: list[int], stages: int) -> list[int]:
    """Stage boundaries [0, ..., len(names)] as DeepSpeed's PipelineModule computes them for `method`."""
    from deepspeed.runtime import utils as ds_utils

    method = method.lower()
    if method == "uniform":
        return [int(b) for b in ds_utils.partition_uniform(num_items=len(names), num_parts=stages)]
    if method == "parameters":
        return [int(b) for b in ds_utils.partition_balanced(weights=params, num_parts=stages)]
    pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
    weights = [1 if pattern.search(name) else 0 for name in names]
    if not any(weights):
        from neox_fork.errors import UserError

        raise UserError(f"pipe_partition_method {method!r} matches none of the layer list's names "
                        f"({', '.join(dict.fromkeys(names))})")
    return [int(b) for b in ds_utils.partition_balanced(weights=weights, num_parts=stages)]


# ---------------------------------------------------------------------- the stage's pieces
def _pre_transformer_block(x):
    return x


def _post_transformer_block(x):
    return x


def _absent(x):  # an entry of another stage (never run here)
    raise RuntimeError("pipeline entry of another stage called")


class _Piece(nn.Module):
    """An entry of the layer list over part of the stage's NeoXModel (held unregistered; the parts it runs are
    registered here so DeepSpeed's PipelineModule sees their parameters)."""

    def __init__(self, model, seq_length: int):
        super().__init__()
        self.__dict__["model"] = model
        self.seq_length = seq_length

    def sp(self) -> bool:
        return self.model.use_sequence_parallel(self.seq_length, True)


class EmbeddingPipe(_Piece):
    def __init__(self, model, seq_length):
        super().__init__(model, seq_length)
        self.word_embeddings = model.word_embeddings
        if model.shape.learned_positions:
            self.position_embeddings = model.position_embeddings

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        return self.model.embed(tokens, positions, self.model.use_sequence_parallel(tokens.shape[1], True))


class ParallelTransformerLayerPipe(_Piece):
    def __init__(self, model, seq_length, index: int):
        super().__init__(model, seq_length)
        self.layer, self.rotary = model.layers[index], model.rotary

    def forward(self, x):
        sp = self.sp()
        positions = torch.arange(self.seq_length if sp else x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = self.rotary(positions)
        if self.model.shape.checkpoint_activations and self.training:
            return checkpoint(self.layer, x, self.rotary, cos, sin)  # replays the TP rank's dropout stream
        return self.layer(x, self.rotary, cos, sin)


class NormPipe(_Piece):
    def __init__(self, model, seq_length):
        super().__init__(model, seq_length)
        self.final_norm = model.final_norm

    def forward(self, x):
        return self.model.finish(x, self.sp())


class ParallelLinearPipe(_Piece):
    """The output layer; it passes the hidden states on, and the loss runs it chunk by chunk (NeoXModel.loss)."""

    def __init__(self, model, seq_length):
        super().__init__(model, seq_length)
        if model.shape.tie_word_embeddings:
            self.word_embeddings = model.word_embeddings
        else:
            self.output_layer = model.output_layer

    def forward(self, hidden):
        return hidden


def _entry_of(name: str, num_layers: int) -> int:
    if name.startswith("layers."):
        return 2 + int(name.split(".")[1])
    if name.startswith("final_norm."):
        return num_layers + 3
    if name.startswith("output_layer."):
        return num_layers + 4
    return 0  # word and position embeddings


def check_optimizer_groups(model, names: list[str], parts: list[int]) -> None:
    """Every stage must hold parameters of both AdamW groups (decayed matrices; norms and biases): DeepSpeed drops
    an empty group, and stages with different group counts run different numbers of gradient-norm all-reduces,
    which hangs the step. One line naming the stage instead (the same on every rank)."""
    from neox_fork.errors import UserError
    from neox_fork.training.optim import decays

    n = model.shape.num_layers
    kinds: dict[int, set[bool]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # LoRA: the adapters (matrices, one group); the frozen base is in no group
            kinds.setdefault(_entry_of(name, n), set()).add(decays(name, p))
    if model.shape.tie_word_embeddings and kinds.get(0):
        kinds[n + 4] = {True}
    needed = set().union(*kinds.values())
    for stage in range(len(parts) - 1):
        held = set().union(*(kinds.get(i, set()) for i in range(parts[stage], parts[stage + 1])))
        if held != needed:
            what = ", ".join(names[parts[stage]:parts[stage + 1]])
            lacks = ("LoRA adapters (they are on the transformer layers)" if needed == {True} else
                     "norms or biases" if True in held else "weight matrices")
            raise UserError(f"pipe_parallel_size {len(parts) - 1}: stage {stage} would hold only {what}, without "
                            f"{lacks}; DeepSpeed's ZeRO cannot step a stage that lacks one of the optimizer groups. "
                            "Use fewer stages, more layers, or a pipe_partition_method that gives every stage a "
                            "transformer layer (e.g. type:transformer)")


def _keep_stage(model, keep: range) -> None:
    """Leave out of `model` what stage `keep` (a range of layer-list indices) does not run."""
    n = model.shape.num_layers
    for i in range(n):
        if i + 2 not in keep:
            model.layers[i] = nn.Identity()
    if 0 not in keep and not (model.shape.tie_word_embeddings and n + 4 in keep):
        model.word_embeddings = None
    if 0 not in keep and model.shape.learned_positions:
        model.position_embeddings = None
    if n + 3 not in keep:
        model.final_norm = None
    if n + 4 not in keep:
        model.output_layer = None


def build_pipeline(c, model):
    """The stage's PipelineModule around `model` (built whole from the seed; trimmed here to this stage)."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # PipelineModule makes its groups through deepspeed.comm, which wraps the process group already joined
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)
    stages = c.pipe_parallel_size
    names = entry_names(c.num_layers, model.shape.tie_word_embeddings)
    parts = partition(c.pipe_partition_method, names, entry_parameters(model), stages)
    check_optimizer_groups(model, names, parts)
    stage = parallel.pp_rank()
    keep = range(parts[stage], parts[stage + 1])
    # what ds_to_universal needs to merge each parameter's TP slices, for the whole model (every stage's file)
    from neox_fork.checkpoint import universal

    info = universal.checkpoint_info(dict(model.named_parameters()), model.shape.vocab_size)
    from neox_fork.model.adapters import adapter_sharding

    sharding = adapter_sharding(model)  # LoRA: every adapter's TP split, for the checkpoint's lora_adapters.json
    _keep_stage(model, keep)
    n, seq = c.num_layers, c.seq_length
    entries = []
    for idx in range(len(names)):
        if idx not in keep:
            entries.append(_absent)
        elif idx == 0:
            entries.append(EmbeddingPipe(model, seq))
        elif idx == 1:
            entries.append(_pre_transformer_block)
        elif idx < n + 2:
            entries.append(ParallelTransformerLayerPipe(model, seq, idx - 2))
        elif idx == n + 2:
            entries.append(_post_transformer_block)
        elif idx == n + 3:
            entries.append(NormPipe(model, seq))
        else:
            entries.append(ParallelLinearPipe(model, seq))
    # expert parallelism: DeepSpeed's grid names its axes pipe, data, model (model fastest), and megatron-core orders
    # expert ranks tensor, expert, expert-data, pipe; so a "model" axis of TP x EP ranks makes the grid's
    # data-parallel group the expert-data-parallel one (what ZeRO-1 shards and averages over, as parallel.MPU gives
    # the engine without pipelines) and its model-parallel group stage x tensor x expert ranks (the gradient norm
    # adds them, dense parameters counted once: reduce_expert_parallel_grads); the tied embeddings' groups pair the
    # first and last stage of each (data, model) coordinate; the model-axis ("slice") group would split activations
    # between stages, which ds_config turns off (pipe_partitioned), so EP ranks' different tokens never meet there
    ep = parallel.ep_size()
    topology = PipeModelDataParallelTopology(num_pp=stages, num_mp=parallel.tp_size() * ep,
                                             num_dp=parallel.dp_size() // ep)
    pipe = NeoXPipe(entries, parts, model, topology)
    if ep > 1:  # the grid's data-parallel group must be megatron-core's expert-data-parallel group (above)
        edp = dist.get_process_group_ranks(parallel.parallel_state.get_expert_data_parallel_group())
        assert sorted(pipe._grid.dp_group) == sorted(edp), (pipe._grid.dp_group, edp)
    pipe.universal_info, pipe.adapter_sharding = info, sharding
    return pipe


def _pipe_module_class():
    from deepspeed.runtime.pipe.module import PipelineModule

    return PipelineModule


class NeoXPipe(_pipe_module_class()):
    """DeepSpeed's PipelineModule over one stage's entries, with our partition, tied embeddings and
    checkpoint files (written and read by training_state in GPT-NeoX's per-layer layout, not by DeepSpeed)."""

    def __init__(self, entries, parts, model, topology):
        object.__setattr__(self, "_neox_parts", parts)
        object.__setattr__(self, "_neox_tie", model.shape.tie_word_embeddings)
        super().__init__(entries, topology=topology, loss_fn=self.loss, partition_method="uniform",
                         dynamic_shape=True)  # sequence parallelism changes the shape between train and eval
        # the parameters under the model's own names (`layers.5.*`, as at P = 1: ZeRO shards, universal
        # checkpoints and the optimizer's parameter names do not depend on P); the entries run from forward_funcs
        self._modules.clear()
        for name, child in model.named_children():
            if child is not None:
                self.add_module(name, child)
        self.__dict__["neox"] = model
        self.nonfinite = False  # a non-finite loss in this step's micro-batches (the NaN guard)
        self.load_weights = None  # set by training_state.resume: fills the stage's weights from a checkpoint

    @property
    def shape(self):
        return self.neox.shape

    @property
    def stage_entries(self) -> range:
        return range(self.parts[self.stage_id], self.parts[self.stage_id + 1])

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._neox_parts)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    # tied embeddings: the first and the last stage each hold the embedding; gradients summed before updates
    def _index_tied_modules(self):
        self._tie = None
        if not self._neox_tie or self.num_stages == 1:
            return {}
        topo = self._topo
        for d in range(topo.get_dim("data")):
            for t in range(topo.get_dim("model")):
                ranks = [topo.get_rank(pipe=0, data=d, model=t), topo.get_rank(pipe=self.num_stages - 1, data=d,
                                                                                 model=t)]
                group = dist.new_group(ranks=ranks)
                if self.global_rank in ranks:
                    self._tie = (group, ranks[0])
        weight = self._tied_weight()
        if weight is not None and self.stage_id != 0:  # the last stage's copy: counted once in the gradient norm
            weight.ds_pipe_replicated = True
        return {}

    def _tied_weight(self):
        if self._tie is None:
            return None
        for entry in self.forward_funcs:
            if isinstance(entry, (EmbeddingPipe, ParallelLinearPipe)) and hasattr(entry, "word_embeddings"):
                return entry.word_embeddings.weight
        return None

    def get_tied_weights_and_groups(self):
        weight = self._tied_weight()
        return [(weight, self._tie[0])] if weight is not None else []

    def _synchronize_tied_weights(self):
        weight = self._tied_weight()
        if weight is not None:
            dist.broadcast(weight.data, src=self._tie[1], group=self._tie[0])

    def allreduce_tied_weight_gradients(self):
        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)

    # checkpoints: training_state writes GPT-NeoX's layer files; loading goes through `load_weights`
    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        pass

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        if self.load_weights is not None:
            self.load_weights()
        self._synchronize_tied_weights()

    def loss(self, hidden, labels):
        """The last stage's loss on `hidden`; a non-finite one backpropagates zeros (the NaN guard)."""
        labels, loss_mask = labels
        loss = self.neox.loss_of_hidden(hidden, labels, loss_mask)
        if not torch.isfinite(loss):
            self.nonfinite = True
            loss = hidden.sum() * 0.0 + sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return loss


def _engine_class():
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    class NeoXPipelineEngine(PipelineEngine):
        """DeepSpeed's pipeline engine with our step rules at the schedule's optimizer step: a non-finite loss
        on any rank runs the update at lr 0 (every rank stays in step), then `before_update` runs."""

        before_update = None
        skipped = None  # why this step's update was skipped
        moe_metrics = None  # during train_batch of an MoE model: the step's MoE numbers of this stage's layers

        def _exec_forward_pass(self, buffer_id):
            super()._exec_forward_pass(buffer_id)
            if self.moe_metrics is not None:  # each micro-batch's, read before the next forward replaces them
                moe.add_step_metrics(self.moe_metrics, self.module.neox, self.micro_batches)

        def _exec_optimizer_step(self, lr_kwargs=None):
            params = [p for p in self.module.parameters() if p.requires_grad]
            flags = torch.tensor([float(self.module.nonfinite), float(unchecked_nonfinite_grads(self, params))],
                                 device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_loss, bad_grads = flags.tolist()
            self.skipped = "loss is NaN/inf on some rank" if bad_loss else "gradients are NaN/inf" if bad_grads \
                else None
            if self.skipped:
                skip_update(self, params if bad_grads else ())
            if self.before_update is not None:
                self.before_update()
            super()._exec_optimizer_step(lr_kwargs)

        _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: _exec_optimizer_step,
                            schedule.ForwardPass: _exec_forward_pass}

    return NeoXPipelineEngine


def build_pipeline_engine(c, model, world: int):
    """This rank's stage of `model` (the whole model, built on every rank) in DeepSpeed's pipeline engine,
    with our step rules (NeoXPipelineEngine)."""
    from neox_fork.training.optim import build_engine

    engine = build_engine(c, build_pipeline(c, model), world)
    engine.__class__ = _engine_class()
    return engine


def is_pipelined(engine) -> bool:
    return isinstance(getattr(engine, "module", None), NeoXPipe)


def model_of(engine):
    """The NeoXModel an engine trains (a pipeline stage's part of it when pipelined)."""
    module = engine.module
    return module.neox if isinstance(module, NeoXPipe) else module


def stage_files(engine, layers: dict) -> dict:
    """Of GPT-NeoX's per-layer files, those this stage writes (its own entries of the layer list)."""
    if not is_pipelined(engine):
        return layers
    own = engine.module.stage_entries
    return {idx: t for idx, t in layers.items() if idx in own}


def _pipe_batches(micro_batches):
    for batch in micro_batches:
        yield batch["tokens"], (batch["labels"], batch["loss_mask"])


def train_step(engine, micro_batches, before_update=None, moe_metrics: dict | None = None) -> tuple[float, str | None]:
    """One optimizer step of the pipeline over `gradient_accumulation_steps` micro-batches (the first and
    last stages read them from `micro_batches`). Returns (this data-parallel rank's mean loss, why the update
    was skipped or None). An MoE model's step metrics (moe.add_step_metrics) go into `moe_metrics` when given,
    those of every stage's layers on every rank (gather_moe_metrics)."""
    engine.module.nonfinite = False
    engine.before_update = before_update
    engine.moe_metrics = {} if moe_metrics is not None else None
    try:
        engine.train_batch(_pipe_batches(micro_batches))
    finally:
        stage_metrics, engine.moe_metrics = engine.moe_metrics, None
    by_deepspeed = deepspeed_skipped_update(engine, engine.device)  # every rank, every step: a collective
    if moe_metrics is not None:
        moe_metrics.update(gather_moe_metrics(engine.module.neox.shape, stage_metrics, engine.device))
    return float(engine.dp_group_loss), engine.skipped or by_deepspeed


def gather_moe_metrics(shape, stage_metrics: dict, device) -> dict:
    """The MoE metrics of the whole model on every rank of a pipeline group: each stage has those of its own MoE
    layers (moe_lbl: its layers' part of the sum); one all-reduce (sum) over the stages, of the keys every stage
    names alike (from the shape: each MoE layer's experts, moe_lbl when the router has a loss)."""
    m = shape.moe
    keys = [f"moe_tokens/layer{i}/expert{e}" for i in range(shape.num_layers) if m.is_moe_layer(i)
            for e in range(m.num_experts)]
    if m.router_type == "topk" and m.aux_loss_coeff:
        keys.insert(0, "moe_lbl")
    values = torch.tensor([float(stage_metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, group=parallel.parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(keys, values.tolist()))


@torch.no_grad()
def evaluate(engine, micro_batches, count: int) -> float:
    """Mean loss of `count` micro-batches (averaged over data-parallel ranks), on every rank."""
    loss = engine.eval_batch(_pipe_batches(micro_batches), num_micro_batches=count)
    engine.module.train()
    if parallel.ep_size() > 1:  # DeepSpeed averaged over its data-parallel group (expert-data): the rest over EP
        loss = loss.detach().clone().reshape(1).to(engine.device) / parallel.ep_size()
        dist.all_reduce(loss, group=parallel.parallel_state.get_expert_model_parallel_group())
    return float(loss)
