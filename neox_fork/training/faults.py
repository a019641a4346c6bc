"""What the loop does about bad steps and bad data (docs/fault-handling.md).

- Skipped updates: a step whose loss is non-finite on some rank, or whose gradients are (the loop's own check,
  or DeepSpeed skipping the update), changes no weight; `max_nan_steps` of them in a row end the run in one line.
- Skipped batches (`skip_train_iteration_ranges`): the steps of each [first, last] range read no sample and make
  no update; the step counter, the data position and the LR schedule advance over them as if they had trained,
  so every later step sees the batch and LR it would have seen without the skip.
- Loss spikes (`loss_spike_factor`, off by default): a step whose loss exceeds the factor times the mean loss of
  the last `loss_spike_window` trained steps saves a checkpoint and stops the run in one line that says how to go
  back before the spike and skip its batches.
"""

from __future__ import annotations

import collections
import logging

import torch

from neox_fork.config.neox_config import NeoXConfig
from neox_fork.errors import UserError
from neox_fork.parallel import groups as parallel
from neox_fork.training.metrics import MetricsWriter
from neox_fork.training.state import TrainState, save, test_failure

log = logging.getLogger("neox_fork")


# ---------------------------------------------------------------------- skipped updates
def check_nan_steps(c: NeoXConfig, state: TrainState, skipped: str | None, metrics: MetricsWriter) -> None:
    """Count skipped updates in a row (`skipped` says why, None for an applied one); `max_nan_steps` of them end
    the run with one line."""
    if not skipped:
        state.nan_steps_in_a_row = 0
        return
    state.nan_steps_in_a_row += 1
    log.warning("step %d: %s; update skipped (%d in a row)", state.iteration, skipped, state.nan_steps_in_a_row)
    metrics.write({"iteration": state.iteration, "update_skipped": 1})
    if state.nan_steps_in_a_row >= c.max_nan_steps:
        metrics.close()
        hint = "lower the learning rate or check the data"
        if "fp16 loss scale" in skipped:  # DeepSpeed lowering its loss scale skips steps on purpose
            hint = ("if the fp16 loss scale is still settling (early in a run), raise max_nan_steps or lower "
                    f"fp16.initial_scale_power; else {hint}")
        raise UserError(f"{state.nan_steps_in_a_row} updates in a row skipped (max_nan_steps {c.max_nan_steps}) at "
                        f"step {state.iteration}, the last because {skipped}; last good checkpoint: "
                        f"{'step ' + str(state.last_saved) if state.last_saved is not None else 'none'}; {hint}")


# ---------------------------------------------------------------------- skipped batches
def skip_range_at(c: NeoXConfig, iteration: int) -> tuple[int, int] | None:
    """The skip_train_iteration_ranges entry holding step `iteration` (1-based), or None."""
    for first, last in c.skip_train_iteration_ranges or ():
        if first <= iteration <= last:
            return first, last
    return None


class BatchSkipper:
    """Steps of skip_train_iteration_ranges: each advances the step counter, consumed samples and LR schedule
    and nothing else (the batch sampler leaves their samples out: data/datasets.py skipped_sample_ranges).
    What was skipped accumulates in TrainState.skipped_iterations, which checkpoints keep."""

    def __init__(self, c: NeoXConfig, global_batch_size: int):
        self.c, self.global_batch_size = c, global_batch_size
        self.announced: set[tuple[int, int]] = set()

    def skip(self, engine, state: TrainState, metrics: MetricsWriter) -> bool:
        """Skip the next step if a range holds it (True), else do nothing (False)."""
        step = state.iteration + 1
        span = skip_range_at(self.c, step)
        if span is None:
            return False
        if span not in self.announced:
            self.announced.add(span)
            log.warning("steps %d-%d: batches skipped (skip_train_iteration_ranges %s): no sample is read and no "
                        "update made; the step counter, data position and LR schedule advance over them",
                        step, min(span[1], self.c.train_iters), list(span))
        state.iteration = step
        state.consumed_samples += self.global_batch_size
        engine.lr_scheduler.step()
        done = state.skipped_iterations
        if done and done[-1][1] == step - 1:
            done[-1][1] = step
        else:
            done.append([step, step])
        metrics.write({"iteration": step, "batch_skipped": 1})
        return True


# ---------------------------------------------------------------------- loss spikes
class LossSpikes:
    """loss_spike_factor: a step whose loss (the mean over data-parallel ranks, as logged) is above the factor
    times the mean of the last loss_spike_window trained steps' losses is a spike. Only trained steps with a
    finite loss enter the window, a spike's own loss never; it is judged once the window is full (so not in the
    first loss_spike_window steps of a run or after a resume: the window is not saved)."""

    def __init__(self, c: NeoXConfig):
        self.c = c
        self.recent: collections.deque[float] = collections.deque(maxlen=c.loss_spike_window)

    def check(self, engine, state: TrainState, mean_loss: float | None, metrics: MetricsWriter) -> None:
        """`mean_loss`: this step's loss averaged over data-parallel ranks (None for a skipped update)."""
        c = self.c
        if c.loss_spike_factor is None or mean_loss is None:
            return
        full = len(self.recent) == self.recent.maxlen
        mean = sum(self.recent) / max(len(self.recent), 1)
        if not parallel.any_rank(full and mean_loss > c.loss_spike_factor * mean):  # every rank stops together
            self.recent.append(mean_loss)
            return
        before = state.last_saved
        save(engine, c, state)
        metrics.write({"iteration": state.iteration, "loss_spike": mean_loss})
        metrics.close()
        resumed = state.resumed_from
        folder = resumed.parent if resumed is not None and resumed.name == f"global_step{before}" else c.save
        raise UserError(spike_message(c, state.iteration, mean_loss, mean, before, folder))


def spike_message(c: NeoXConfig, step: int, loss: float, mean: float, before: int | None, folder) -> str:
    """The one line a loss spike stops the run with: what, and how to resume past it with a skip range
    (`before`: the newest checkpoint before the spike, in `folder`)."""
    saved = f"saved step {step} in {c.save}" if c.save else "nothing saved (no `save` folder)"
    head = (f"loss spike at step {step}: loss {loss:.4f} is above loss_spike_factor {c.loss_spike_factor:g} x "
            f"{mean:.4f}, the mean of the last {c.loss_spike_window} steps; {saved} and stopped. ")
    if before is not None and before < step:
        return head + (f"To go back before it without its batches, write global_step{before} into "
                       f"{folder}/latest and resume with skip_train_iteration_ranges: "
                       f"[[{before + 1}, {step}]] (the batches since that checkpoint, the spike's included; "
                       "widen it to skip more)")
    return head + (f"No checkpoint before it: to train without its batch, start again with "
                   f"skip_train_iteration_ranges: [[{step}, {step}]] (widen it to skip more)")


# ---------------------------------------------------------------------- test-only faults
def injected_fault(iteration: int) -> str | None:
    """Test-only (state.TEST_FAIL_ENV, "RANK:STEP:grads" or "RANK:STEP:spike"): "grads" on this rank's steps from
    STEP on (NaN gradients behind a finite loss), "spike" at step STEP (the loss x 50); None almost always.
    loop._forward_backward applies them (not in pipelined runs)."""
    at = test_failure("grads")
    if at is not None and iteration >= at:
        return "grads"
    return "spike" if test_failure("spike") == iteration else None


class NanGradient(torch.autograd.Function):
    """Fault "grads": the loss unchanged, every gradient behind it NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")
