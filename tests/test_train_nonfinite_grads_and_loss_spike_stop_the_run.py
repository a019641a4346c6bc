"""Skipped updates and loss spikes, injected into real runs (NEOX_FORK_TEST_FAIL, training/faults.py):

* gradients made NaN behind a finite loss from step 3 on are skipped (by the loop's own check without ZeRO, by
  DeepSpeed's under ZeRO-1), each logged with its step, and max_nan_steps of them in a row stop the run in one
  line; the weights of the skipped steps are those of step 2, bit for bit, and the LR schedule still advanced.
* a loss spike (step 5's loss x 50, above loss_spike_factor 3 x the mean of the last 3 steps) saves step 5 and
  stops in one line naming the step, the loss and the skip range to resume with; following that advice (step 4
  back into `latest`, the range in the config) trains to the end without the spiking batch.
"""

import os

import pytest
import torch
import yaml

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.errors import UserError

pytestmark = [pytest.mark.slow]


def run_with_fault(config, fault):
    env = dict(os.environ, OMP_NUM_THREADS="1", NEOX_FORK_TEST_FAIL=fault)
    from conftest import run_cli

    return run_cli("train.py", config, env=env)


def model_states(ckpt, step):
    return torch.load(checkpoint.resolve(ckpt, step) / "mp_rank_00_model_states.pt", weights_only=False)


def error_lines(run):
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("stage, reason", [(0, "gradients are NaN/inf; update skipped"),
                                           (1, "gradients are NaN/inf (DeepSpeed skipped the update); update skipped")])
def test_nonfinite_gradients_are_counted_and_stop_the_run_at_max_nan_steps(tmp_path, small_corpus, stage, reason):
    config = write_train_config(tmp_path, small_corpus, train_iters=10, max_nan_steps=3, checkpoint_factor=1,
                                zero_optimization={"stage": stage})
    run = run_with_fault(config, "0:3:grads")
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    for n, step in enumerate((3, 4, 5), 1):
        assert f"step {step}: {reason} ({n} in a row)" in run.stdout, run.stdout[-3000:]
    assert error_lines(run) == ["error: 3 updates in a row skipped (max_nan_steps 3) at step 5, the last because "
                                f"{reason.split('; ')[0]}; last good checkpoint: step 4; lower the learning rate or "
                                "check the data"]
    ckpt = tmp_path / "ckpt"
    assert read_metrics(ckpt, "update_skipped") == {3: 1, 4: 1, 5: 1}
    assert checkpoint.read_latest(ckpt) == 4
    before, after = model_states(ckpt, 2), model_states(ckpt, 4)
    for name in before["module"]:
        assert torch.equal(before["module"][name], after["module"][name]), name
    # the LR schedule moved on over the skipped steps (DeepSpeed's own skip leaves it behind)
    assert after["lr_scheduler"]["last_epoch"] == 4


def test_fp16_overflow_skips_stop_with_a_hint_about_the_loss_scale():
    """DeepSpeed's fp16 skips (no fp16 on this CPU: the reason as the loop receives it) count like the others,
    and the stop line says that a loss scale still settling needs a larger max_nan_steps."""
    from neox_fork.config.loading import from_dict
    from neox_fork.training.faults import check_nan_steps
    from neox_fork.training.state import TrainState

    class Metrics:
        rows = []

        def write(self, row):
            self.rows.append(row)

        def close(self):
            pass

    c, state = from_dict({"max_nan_steps": 2}), TrainState(iteration=7, last_saved=5)
    reason = "gradients are NaN/inf (DeepSpeed skipped the update; fp16 loss scale now 1024)"
    check_nan_steps(c, state, reason, Metrics())
    state.iteration = 8
    with pytest.raises(UserError) as err:
        check_nan_steps(c, state, reason, Metrics())
    assert str(err.value) == (f"2 updates in a row skipped (max_nan_steps 2) at step 8, the last because {reason}; "
                              "last good checkpoint: step 5; if the fp16 loss scale is still settling (early in a "
                              "run), raise max_nan_steps or lower fp16.initial_scale_power; else lower the learning "
                              "rate or check the data")
    assert Metrics.rows == [{"iteration": 7, "update_skipped": 1}, {"iteration": 8, "update_skipped": 1}]


def test_loss_spike_saves_stops_and_its_skip_range_resumes(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=8, checkpoint_factor=2, loss_spike_factor=3.0,
                                loss_spike_window=3)
    ckpt = tmp_path / "ckpt"
    run = run_with_fault(config, "0:5:spike")
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = error_lines(run)
    spike = read_metrics(ckpt, "loss_spike")[5]
    assert line.startswith(f"error: loss spike at step 5: loss {spike:.4f} is above loss_spike_factor 3 x "), line
    assert line.endswith(f"the mean of the last 3 steps; saved step 5 in {ckpt} and stopped. To go back before it "
                         f"without its batches, write global_step4 into {ckpt}/latest and resume with "
                         "skip_train_iteration_ranges: [[5, 5]] (the batches since that checkpoint, the spike's "
                         "included; widen it to skip more)"), line
    losses = read_metrics(ckpt)
    assert spike > 3 * sum(losses[s] for s in (2, 3, 4)) / 3
    assert checkpoint.read_latest(ckpt) == 5

    # the advice, followed: back to step 4, step 5's batch skipped, no fault
    (ckpt / "latest").write_text("global_step4")
    keys = yaml.safe_load(config.read_text())
    keys.update(load=keys["save"], skip_train_iteration_ranges=[[5, 5]])
    config.write_text(yaml.safe_dump(keys))
    run = run_training(config)
    assert "steps 5-5: batches skipped" in run.stdout
    assert checkpoint.read_latest(ckpt) == 8
    assert sorted(read_metrics(ckpt)) == [1, 2, 3, 4, 5, 6, 7, 8]  # step 5's row is the first run's
    assert read_metrics(ckpt, "batch_skipped") == {5: 1}
