"""Preference objectives as upstream gpt-neox computes them: DPO, KTO and reward models (`train_impl`).

Each is a loss over the same model and batches as language modelling, not another training loop: the loop
calls `Objective.__call__(engine, batch)` once per micro-batch and gets (loss, metrics). The formulas are
upstream's `forward_step` (megatron/training.py at ea7aefd8), with its metric names:

* DPO: `-logsigmoid(dpo_beta * ((pi_c - ref_c) - (pi_r - ref_r)))`, averaged over the pairs, where pi/ref are
  the policy's/reference's log-probabilities of an answer summed over its trained positions. Metrics
  chosen_pos/chosen_neg (policy), ref_pos/ref_neg, chosen_rewards/rejected_rewards (dpo_beta x (pi - ref)),
  reward_acc, margins. `dpo_reference_free` takes ref as 0.
* KTO: the micro-batch is cut into two halves; example j of one half has the loss
  `weight x (1 - sigmoid(kto_beta x reward_j x (logratio_j - KL)))` with KL, the estimate of the policy's KL
  from the reference, taken from the OTHER half: the mean over its examples of max(0, summed log-ratio),
  detached (upstream's stand-in for TRL's mismatched-pair KL batch). weight is the mean over the half of
  kto_desirable_weight (reward > 0) / kto_undesirable_weight (reward < 0); the two halves' terms are halved
  and summed, then averaged over the examples.
* RM: the one-output head's value at each answer's last trained position; `-logsigmoid(r_c - r_r) +
  z_loss x (r_c^2 + r_r^2)`. Metrics pos_values, neg_values, margin, accuracy.

With LoRA (`adapter: lora`) the reference is the policy with its adapters off (AdaptersOff): the frozen base.
Otherwise the reference model of DPO/KTO is a frozen copy of the policy sharded like it (same tensor-parallel layout),
in eval mode (no dropout), made from the policy's weights when training starts from `load` with
`finetune: true`; its weights are saved in every checkpoint (`checkpoint.REFERENCE_DIR`), so a resume takes them from
there and not from a path that may have changed. With `precompute_model_name` no reference model is built:
per-token reference log-probabilities come with the batch (`pos_ref`/`neg_ref` or `ref`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F

from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint.store import model_state

log = logging.getLogger("neox_fork")

PREFERENCE_IMPLS = ("dpo", "kto", "rm")


# ---------------------------------------------------------------------- the losses, on known numbers
def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c, ref_r, beta: float,
             reference_free: bool = False) -> tuple[torch.Tensor, dict]:
    """DPO loss from summed log-probabilities [pairs]; metrics are detached means (upstream's names)."""
    if reference_free:
        ref_c = ref_r = 0.0
    loss = -F.logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).mean()
    with torch.no_grad():
        metrics = {"chosen_pos": pi_c.mean(), "chosen_neg": pi_r.mean()}
        if not reference_free:
            chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
            metrics.update(ref_pos=ref_c.mean(), ref_neg=ref_r.mean(), chosen_rewards=chosen.mean(),
                           rejected_rewards=rejected.mean(), reward_acc=(chosen > rejected).float().mean(),
                           margins=(chosen - rejected).mean())
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, rewards: torch.Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float, tokens_trained: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict]:
    """KTO loss from summed log-probabilities [b] (b even) and each example's reward [b]."""
    ratio = policy - reference
    weight = (rewards > 0.001).float() * desirable_weight + (rewards < -0.001).float() * undesirable_weight
    r1, r2 = ratio.chunk(2)
    kl1, kl2 = r1.detach().clamp(min=0).mean(), r2.detach().clamp(min=0).mean()
    w1, w2 = weight.chunk(2)
    rw1, rw2 = rewards.chunk(2)
    loss = (0.5 * w1.mean() * (1 - torch.sigmoid(beta * rw1 * (r1 - kl2)))
            + 0.5 * w2.mean() * (1 - torch.sigmoid(beta * rw2 * (r2 - kl1)))).mean()
    with torch.no_grad():
        pos, neg = (rewards > 0.001).float(), (rewards < -0.001).float()
        policy_rewards = beta * rewards * ratio
        metrics = {"ref_logp": reference.mean(), "policy_logp": policy.mean(),
                   "pos_ref_logp": (reference * pos).mean(), "neg_ref_logp": (reference * neg).mean(),
                   "pos_policy_logp": (policy * pos).mean(), "neg_policy_logp": (policy * neg).mean(),
                   "reward_acc": (policy_rewards > 0).float().mean(), "policy_rewards": policy_rewards.sum()}
        if tokens_trained is not None:
            metrics["kl"] = ratio.sum() / tokens_trained.clamp(min=1)
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def rm_loss(pos: torch.Tensor, neg: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, dict]:
    """Reward-model loss from the chosen and rejected scores [pairs]."""
    loss = -F.logsigmoid(pos - neg).mean() + (z_loss * (pos ** 2 + neg ** 2)).mean()
    with torch.no_grad():
        metrics = {"pos_values": pos.mean(), "neg_values": neg.mean(), "margin": (pos - neg).mean(),
                   "accuracy": (pos > neg).float().mean()}
    return loss, {k: v.detach().float() for k, v in metrics.items()}


# ---------------------------------------------------------------------- the reference model
def make_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` (its current weights, same sharding, device and dtype), in eval mode.

    Built as a new model of the same shape without initialisation (no random numbers drawn, so the policy's
    run is unchanged), then given the policy's weights."""
    from megatron.core import parallel_state

    from neox_fork.model.transformer import NeoXModel, model_parallel_config

    first = next(model.parameters())
    mp = model_parallel_config(parallel_state.get_tensor_model_parallel_world_size())
    mp.perform_initialization = False
    reference = NeoXModel(model.shape, mp).to(device=first.device, dtype=first.dtype)
    _copy_into(reference, model_state(model), "the policy")
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference.eval()


def _copy_into(reference: torch.nn.Module, saved: dict[str, torch.Tensor], where: str) -> None:
    from neox_fork.errors import UserError

    own = model_state(reference)
    bad = [k for k in own if k not in saved or saved[k].shape != own[k].shape]
    if bad:
        raise UserError(f"{where}: the saved reference model does not fit this model ({bad[0]}); check "
                        "num_layers/hidden_size/vocab settings")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k])


class AdaptersOff:
    """The reference of a LoRA run (`adapter: lora`): the policy itself with its adapters off, which is the frozen
    base it started from, in eval mode (no dropout). No second copy of the weights, and nothing to save: the
    LoRA checkpoint already names its base."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        from neox_fork.model.adapters import adapters_disabled

        training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)


def reference_for_run(c, model: torch.nn.Module, resumed_from: Path | None):
    """The frozen reference of a run: from the checkpoint it resumed (`resumed_from`, any TP size), else the
    policy's weights now (the start of fine-tuning from `load`); a LoRA run's is its base (AdaptersOff); None
    when the objective needs none."""
    if not Objective(c).needs_reference:
        return None
    if c.adapter:
        log.info("reference model: the policy with its LoRA adapters off (the frozen base)")
        return AdaptersOff(model)
    from megatron.core import parallel_state

    reference = make_reference(model)
    saved = Path(resumed_from) / checkpoint.REFERENCE_DIR if resumed_from is not None else None
    if saved is not None and saved.is_dir():
        shard = checkpoint.load_rank_shard(saved, parallel_state.get_tensor_model_parallel_world_size(),
                                           parallel_state.get_tensor_model_parallel_rank(), c.trust_checkpoint)
        _copy_into(reference, shard, str(saved))
        log.info("reference model: the frozen weights saved in %s", saved)
    else:
        log.info("reference model: a frozen copy of the policy's starting weights%s",
                 f" (from {c.load})" if c.load else " (fresh initialisation: no `load`)")
    return reference


# ---------------------------------------------------------------------- one micro-batch
def _split_pairs(batch: dict) -> dict:
    """A pairwise batch holds [b, 2, s] tensors (chosen, rejected); upstream's order is all chosen, then all
    rejected: [2b, s]."""
    return {k: torch.cat((v[:, 0], v[:, 1])) if v.dim() >= 2 and v.shape[1] == 2 and k != "reward" else v
            for k, v in batch.items()}


class Objective:
    """The loss of one micro-batch for `train_impl`, with the frozen reference when one is needed."""

    def __init__(self, c, reference: torch.nn.Module | None = None):
        self.c, self.impl, self.reference = c, c.train_impl, reference

    @property
    def needs_reference(self) -> bool:
        c = self.c
        return (c.train_impl == "kto" or (c.train_impl == "dpo" and not c.dpo_reference_free)) \
            and not c.precompute_model_name

    def __call__(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.impl == "normal":
            return engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"]), {}
        c = self.c
        b = _split_pairs(batch) if self.impl in ("dpo", "rm") else batch
        tokens, labels, mask = b["tokens"], b["labels"], b["loss_mask"]
        if self.impl == "rm":
            scores = engine(tokens, loss_mask=mask, score="reward")
            pos, neg = scores.float().chunk(2)
            return rm_loss(pos, neg, c.z_loss)
        fp32 = c.dpo_fp32 if self.impl == "dpo" else c.kto_fp32
        policy = engine(tokens, labels=labels, loss_mask=mask, score="logprobs", fp32=fp32)
        reference = self._reference_logprobs(b, fp32)
        if self.impl == "dpo":
            pi_c, pi_r = policy.chunk(2)
            ref_c, ref_r = reference.chunk(2) if reference is not None else (None, None)
            return dpo_loss(pi_c, pi_r, ref_c, ref_r, c.dpo_beta, c.dpo_reference_free)
        return kto_loss(policy, reference, b["reward"].float().reshape(-1), c.kto_beta, c.kto_desirable_weight,
                        c.kto_undesirable_weight, mask.sum())

    @torch.no_grad()
    def _reference_logprobs(self, b: dict, fp32: bool) -> torch.Tensor | None:
        if self.impl == "dpo" and self.c.dpo_reference_free:
            return None
        if "ref" in b:  # precomputed per-token log-probabilities of each label
            return (b["ref"].float() * b["loss_mask"].float()).sum(-1)
        return self.reference(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"], score="logprobs", fp32=fp32)


# ---------------------------------------------------------------------- precomputed reference log-probabilities
@torch.no_grad()
def precompute_reference(load: str, prefixes: list[str], model_name: str, seq_length: int, trust: bool = False,
                         batch_size: int = 8) -> list[str]:
    """Upstream's precompute (`precompute_model_name`): for each token dataset PREFIX, PREFIX_MODELNAME holds per
    document the log-probability the checkpoint `load` (the reference) gives each next token: position j is
    log p(token j + 1 | tokens 0..j) for the first seq_length + 1 tokens, 0 at the last (float32). Written
    whole or not at all (data/pipeline.py's writer). One process, the TP-merged weights, fp32."""
    from megatron.core import parallel_state

    from neox_fork.parallel import groups as parallel
    from neox_fork.data import pipeline
    from neox_fork.data.pairwise import _open, ref_prefix
    from neox_fork.model.transformer import build_model
    from neox_fork.training.state import copy_weights

    import dataclasses

    state, config, folder = checkpoint.load_merged(load, trust=trust)
    rows = state["word_embeddings.weight"].shape[0]  # the padded vocabulary, kept as it is at TP=1
    config = dataclasses.replace(config, **checkpoint.vocab_keys_for(rows, 1, str(folder)), sequence_parallel=False)
    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize(1)
    model = build_model(config, perform_initialization=False)
    copy_weights(model, state, folder, trust)
    model.eval()
    written = []
    for prefix in prefixes:
        docs = _open(prefix)
        out = pipeline._Outputs([ref_prefix(prefix, model_name)], [numpy.float32])
        try:
            for first in range(0, len(docs), batch_size):
                rows = [docs.get(i)[: seq_length + 1].astype(numpy.int64) for i in range(first, min(first + batch_size,
                                                                                               len(docs)))]
                width = max(len(r) for r in rows)
                tokens = torch.zeros(len(rows), width, dtype=torch.long)
                for i, r in enumerate(rows):
                    tokens[i, : len(r)] = torch.from_numpy(r)
                logp = torch.log_softmax(model(tokens[:, :-1]).float(), -1)
                picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
                for i, r in enumerate(rows):  # one value per token of the document, as the pairs' files
                    values = numpy.zeros(len(docs.get(first + i)), numpy.float32)
                    values[: len(r) - 1] = picked[i, : len(r) - 1].numpy()
                    out.add(0, values, numpy.array([len(values)]))
            out.commit()
        except BaseException:
            out.discard()
            raise
        written.append(ref_prefix(prefix, model_name))
        log.info("reference log-probabilities of %s by %s: %s", prefix, folder, written[-1])
    return written
