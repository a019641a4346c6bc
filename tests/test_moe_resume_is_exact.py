"""An MoE model stopped at step 2 and resumed to 4 gives the losses, balancing losses and tokens per expert of 4
uninterrupted steps (its experts and router are saved and restored with the rest)."""

import json

import pytest
import yaml

from conftest import run_training, write_train_config

pytestmark = [pytest.mark.slow]

MOE = dict(moe_num_experts=4, moe_top_k=2, moe_router_type="topk", moe_aux_loss_coeff=0.1, train_iters=4)


def rows(folder):
    lines = (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "lm_loss" in r}


def test_moe_resume_continues_bit_for_bit(tmp_path, small_corpus):
    (tmp_path / "full").mkdir()
    (tmp_path / "half").mkdir()
    run_training(write_train_config(tmp_path / "full", small_corpus, **MOE))
    half = write_train_config(tmp_path / "half", small_corpus, exit_interval=2, **MOE)
    run_training(half)
    keys = yaml.safe_load(half.read_text())
    keys.update(exit_interval=None, load=keys["save"])
    half.write_text(yaml.safe_dump(keys))
    assert "at iteration 2" in run_training(half).stdout
    expected, resumed = rows(tmp_path / "full"), rows(tmp_path / "half")
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
    for it in (3, 4):
        moe_keys = [k for k in expected[it] if k.startswith("moe_")]
        assert len(moe_keys) == 1 + 2 * 4
        for key in ["lm_loss", *moe_keys]:
            assert resumed[it][key] == expected[it][key], (it, key)
