"""A tiny MoE model trains through train.py and saves; metrics.jsonl and TensorBoard hold the load-balancing loss
and the tokens each expert got per layer; at ZeRO-1, data parallel 2 is the same optimisation as one process that
accumulates the same two micro-batches (the load-balancing loss is per micro-batch in both, and its gradient is
scaled by 1 / accumulation steps like the language-model loss's)."""

import json
import math

import pytest

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow]

MOE = dict(moe_num_experts=4, moe_top_k=2, moe_router_type="topk", moe_aux_loss_coeff=0.1, hidden_dropout=0.0,
           train_iters=4)


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
def test_moe_trains_logs_and_dp2_equals_one_process(tmp_path, small_corpus):
    runs = {}
    for name, nproc, accum in (("one", 1, 2), ("dp2", 2, 1)):
        (tmp_path / name).mkdir()
        config = write_train_config(tmp_path / name, small_corpus, train_micro_batch_size_per_gpu=1,
                                    gradient_accumulation_steps=accum, tensorboard_dir=str(tmp_path / name / "tb"),
                                    **MOE)
        run_training(config, nproc=nproc)
        runs[name] = tmp_path / name / "ckpt"
    a, b = read_metrics(runs["one"]), read_metrics(runs["dp2"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in a.values())
    for it in a:
        assert abs(a[it] - b[it]) <= 1e-5 * abs(b[it]), (it, a[it], b[it])
    step = [r for r in rows(runs["one"]) if "moe_lbl" in r]
    assert len(step) == 4  # moe_lbl: summed over the 2 MoE layers (each 1 when perfectly balanced)
    lbl_dp = {r["iteration"]: r["moe_lbl"] for r in rows(runs["dp2"]) if "moe_lbl" in r}
    for r in step:
        assert abs(r["moe_lbl"] - lbl_dp[r["iteration"]]) <= 1e-5, r
        # every token reaches its k experts (dropless): 2 micro-batches x 64 tokens x top 2 per layer
        for layer in (0, 1):
            assert sum(r[f"moe_tokens/layer{layer}/expert{e}"] for e in range(4)) == 2 * 64 * 2
    # TensorBoard gets the same scalars at the same steps (W&B and Comet get that dict too: training/metrics.py)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "one" / "tb"))
    events.Reload()
    for key in ("moe_lbl", "moe_tokens/layer1/expert3"):
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx({r["iteration"]: r[key] for r in step},
                                                                               rel=1e-6), key
    wa, _, _ = checkpoint.load_merged(runs["one"])
    wb, _, _ = checkpoint.load_merged(runs["dp2"])
    assert any(".mlp.moe.experts.local_experts.3." in name for name in wa)
    for name in wa:
        # fp32 sums in another order; Adam's 1/sqrt(v) can amplify that near-zero gradients: 1% of one lr step
        assert (wa[name] - wb[name]).abs().max() <= 3e-5, name
