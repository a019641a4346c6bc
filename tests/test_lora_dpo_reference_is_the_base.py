"""LoRA-DPO (adapter: lora, train_impl: dpo): the reference is the policy with its adapters off, the frozen base,
with no second copy of the weights. Its first loss is ln 2 (B = 0: policy = reference, even with the adapters'
dropout on), and at every step its reference log-probabilities equal those of a full DPO run's frozen copy of
the same base on the same batches (the same fp32 computation: equal), while the policy's move away.
"""

import math

import pytest

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from test_preference_dpo_trains_exports_and_resumes import dpo_keys

pytestmark = [pytest.mark.slow]

STEPS = 6


def test_lora_dpo_starts_at_ln2_and_its_reference_is_the_base(tmp_path, small_corpus, preference_pairs,
                                                               trained_checkpoint):
    runs = {}
    for name, extra in (("lora", dict(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1,
                                      lora_target_modules="all-linear")), ("full", {})):
        folder = tmp_path / name
        folder.mkdir()
        keys = dpo_keys(preference_pairs, load=str(trained_checkpoint), train_iters=STEPS, checkpoint_factor=STEPS,
                        optimizer={"type": "Adam", "params": {"lr": 1e-2, "betas": [0.9, 0.95]}}, **extra)
        run_training(write_train_config(folder, small_corpus, **keys))
        runs[name] = folder / "ckpt"
    lora = {k: read_metrics(runs["lora"], k) for k in ("lm_loss", "ref_pos", "ref_neg", "chosen_pos")}
    full = {k: read_metrics(runs["full"], k) for k in ("ref_pos", "ref_neg")}
    assert lora["lm_loss"][1] == pytest.approx(math.log(2), abs=1e-6)
    assert lora["chosen_pos"][1] == lora["ref_pos"][1]
    for it in range(1, STEPS + 1):
        assert lora["ref_pos"][it] == full["ref_pos"][it] and lora["ref_neg"][it] == full["ref_neg"][it], it
    assert lora["chosen_pos"][STEPS] != lora["ref_pos"][STEPS]  # the policy has moved; the reference has not
    step = checkpoint.resolve(runs["lora"])
    assert not (step / checkpoint.REFERENCE_DIR).exists() and (step / checkpoint.LORA_FILE).is_file()
    assert (checkpoint.resolve(runs["full"]) / checkpoint.REFERENCE_DIR).is_dir()
