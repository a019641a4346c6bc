"""Every program that reads a checkpoint, run the way a user runs it, for the safe-load and corrupt-file tests.

The tools run in this process through their own `main` (a refusal must come before any code from the
file could run, so a payload would fire here and be seen); fine-tuning and resuming start train.py.
"""

import contextlib
import importlib.util
import io

from conftest import REPO, run_training, write_train_config

TOOLS = {"convert": "tools/convert_to_hf.py", "reshard": "tools/ckpts/reshard_checkpoint.py", "generate": "generate.py",
         "eval": "eval.py", "to_universal": "tools/ckpts/to_universal.py"}


def tool_args(name, ckpt, out):
    return {"convert": ["--input-dir", ckpt, "--output-dir", out / "hf"],
            "reshard": ["--input-dir", ckpt, "--output-dir", out / "tp2", "--tp", "2"],
            "generate": ["--checkpoint", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
            "eval": ["--checkpoint", ckpt, "--tasks", "neox_arith", "--limit", "1", "--output", out / "eval.json"],
            "to_universal": ["--input-dir", ckpt, "--workers", "1"],
            }[name]


def run_tool(name, ckpt, out, *extra):
    """(exit status, stderr) of one tool's main() on `ckpt`."""
    from neox_fork.parallel import groups as parallel

    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / TOOLS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err, status = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.main([str(a) for a in (*tool_args(name, ckpt, out), *extra)])
    except SystemExit as exit_:
        status = exit_.code
    finally:
        parallel.destroy()
    return status, err.getvalue()


def training_config(folder, corpus, ckpt, finetune, **keys):
    """A config that loads `ckpt` (weights only with `finetune`) and trains one more step into folder/ckpt."""
    folder.mkdir(parents=True, exist_ok=True)
    keys.setdefault("train_iters", 3)
    keys.setdefault("override_lr_scheduler", True)  # one step more than the checkpoint's schedule was made for
    return write_train_config(folder, corpus, load=str(ckpt), finetune=finetune, **keys)


def run_trainings(configs):
    """{name: (exit status, stdout, stderr)} of train.py on each of `configs` ({name: config path})."""
    runs = {name: run_training(config, check=False) for name, config in configs.items()}
    return {name: (run.returncode, run.stdout, run.stderr) for name, run in runs.items()}


def weights_file(step_folder, rank=0):
    """The file every reader reads for rank `rank`'s embedding: GPT-NeoX's layer 0 file where the step has
    layer files (pipe_parallel_size >= 1), else the mp_rank file."""
    layer = step_folder / f"layer_00-model_{rank:02d}-model_states.pt"
    return layer if layer.is_file() else step_folder / f"mp_rank_{rank:02d}_model_states.pt"
