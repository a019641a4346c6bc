"""Where training reports go: a progress line, SAVE_DIR/metrics.jsonl, TensorBoard, W&B and Comet.

Only global rank 0 writes. metrics.jsonl always exists (when `save` is set): one JSON object per
logged step, so a run can be plotted or compared without any extra package.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("neox_fork")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(m: dict, total_iters: int) -> str:
    parts = [f"step {m['iteration']}/{total_iters}", f"loss {m['lm_loss']:.4f}", f"lr {m['lr']:.3e}",
             f"grad_norm {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "grad_norm n/a",
             f"tokens/s {m['tokens_per_sec']:,.0f}"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {m['mfu']:.1%}")
    if m.get("hfu") is not None:
        parts.append(f"hfu {m['hfu']:.1%}")
    if m.get("moe_lbl") is not None:
        parts.append(f"moe_lbl {m['moe_lbl']:.4f}")
    loads = [v for k, v in m.items() if k.startswith("moe_tokens/")]
    if loads:  # the busiest expert's share over an even share (1.00: perfectly balanced)
        experts = len({k.rsplit("/", 1)[1] for k in m if k.startswith("moe_tokens/")})
        parts.append(f"moe_max_load {max(loads) * experts / max(sum(loads) / (len(loads) / experts), 1e-9):.2f}")
    parts.append(f"elapsed {format_duration(m['elapsed_sec'])}")
    parts.append(f"eta {format_duration(m['eta_sec'])}")
    return " | ".join(parts)


class MetricsWriter:
    def __init__(self, config, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        self.comet = None
        if not enabled:
            return
        if config.save:
            Path(config.save).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(config.save) / "metrics.jsonl", "a", buffering=1)
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=config.tensorboard_dir)
        if config.use_wandb:
            self.wandb = _start_wandb(config)
        if config.use_comet:
            self.comet = _start_comet(config)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
        step = metrics["iteration"]
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.comet:
            self.comet.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.comet:
            self.comet.end()
            self.comet = None


def _start_wandb(config):
    try:
        import wandb
    except ImportError:
        log.warning("use_wandb is true but wandb is not installed (pip install wandb); not logging to W&B")
        return None
    if config.wandb_host:
        os.environ.setdefault("WANDB_BASE_URL", config.wandb_host)
    return wandb.init(project=config.wandb_project or "neox_fork", entity=config.wandb_team or None,
                      group=config.wandb_group or None, name=config.wandb_name or None,
                      config=config.to_dict(), dir=config.save or None)


def _start_comet(config):
    """A Comet experiment as upstream starts one; COMET_* variables (API key, COMET_START_ONLINE=false for an
    offline archive in COMET_OFFLINE_DIRECTORY) choose where it goes, as the comet_ml client reads them."""
    try:
        import comet_ml
    except ImportError:
        log.warning("use_comet is true but comet_ml is not installed (pip install comet_ml); not logging to Comet")
        return None
    experiment = comet_ml.start(workspace=config.comet_workspace, project=config.comet_project,
                                experiment_config=comet_ml.ExperimentConfig(auto_output_logging=False,
                                                                            name=config.comet_experiment_name,
                                                                            tags=config.comet_tags))
    experiment.log_parameters(config.to_dict(), nested_support=True)
    if config.comet_others:
        experiment.log_others(config.comet_others)
    return experiment
