"""Opening a checkpoint never runs code from it (issue 18).

A pickled `__reduce__` payload that would create a marker file is planted in a real training checkpoint;
every reader (convert, reshard, generate, eval, fine-tune, resume through DeepSpeed) refuses it with one
line naming the file and the type, and the marker never appears. Everything training writes (fp32 and
bf16, TP=2, ZeRO-1 and ZeRO-2, universal checkpoints; the bf16 ones in test_universal_checkpoint.py) loads
through the same safe reader, and DeepSpeed's own zero_to_fp32 still reads our step folders. `--trust-checkpoint` loads the file and says so.
"""

import shutil

import pytest
import torch

from checkpoint_readers import TOOLS, run_tool, run_trainings, training_config, weights_file
from neox_fork.checkpoint import store as checkpoint


class Payload:
    """Unpickling this runs code (it creates `marker`): what an attacker would put in a checkpoint. It
    unpickles to None, so a trusted load goes on as if the entry were an empty slot."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path, marker):
    """Add a payload entry to a checkpoint file (we wrote it, so reading it trusted here is fine)."""
    states = checkpoint.read_file(path, trust=True)
    states["payload"] = Payload(marker)
    torch.save(states, path)


@pytest.fixture
def trained(trained_checkpoint):
    return trained_checkpoint


def test_fp32_zero1_files_load_safely_and_deepspeed_still_reads_them(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folders = [checkpoint.step_dir(trained, 1), checkpoint.step_dir(trained, 2)]
    for folder in folders:
        files = sorted(folder.glob("*.pt"))
        assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        for f in files:
            checkpoint.read_file(f)  # safe path: raises on anything outside the allowlist
    # DeepSpeed's own tool reads what we publish: its fp32 weights are the ones we saved
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(trained), tag=checkpoint.step_name(2))
    ours, _, _ = checkpoint.load_merged(trained)
    assert fp32.keys() == ours.keys()
    assert all(torch.equal(fp32[k], ours[k]) for k in ours)


def evil_copy(trained, tmp_path):
    """A copy of the trained checkpoint whose step-2 weights file carries a payload; (copy, that file, marker)."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil"
    shutil.copytree(trained, evil)
    model_file = weights_file(checkpoint.step_dir(evil, 2))
    plant(model_file, marker)
    return evil, model_file, marker


def test_a_pickled_payload_is_refused_by_every_tool(trained, tmp_path):
    evil, model_file, marker = evil_copy(trained, tmp_path)
    for name in TOOLS:
        status, err = run_tool(name, evil, tmp_path / name)
        assert status == 2, (name, err)
        assert err.strip().splitlines() == [
            f"error: refusing checkpoint file '{model_file}': it would load 'builtins.exec', which is not a type a "
            "checkpoint holds (loading it could run code); if you trust whoever wrote it, pass --trust-checkpoint "
            "(trust_checkpoint: true in a config) to load it with full unpickling, which can run code"], name
        assert not marker.exists(), name


@pytest.mark.slow
def test_a_pickled_payload_is_refused_by_fine_tuning_and_resuming(trained, small_corpus, tmp_path):
    evil, model_file, marker = evil_copy(trained, tmp_path)
    # only DeepSpeed's resume reads the ZeRO shards: a payload there must be refused by it too
    evil_optim = tmp_path / "evil_optim"
    shutil.copytree(trained, evil_optim)
    optim_file = checkpoint.step_dir(evil_optim, 2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(optim_file, marker)
    runs = run_trainings({
        "finetune": training_config(tmp_path / "finetune", small_corpus, evil, finetune=True),
        "resume": training_config(tmp_path / "resume", small_corpus, evil, finetune=False),
        "resume_optim": training_config(tmp_path / "resume_optim", small_corpus, evil_optim, finetune=False),
    })
    for name, (status, out, err) in runs.items():
        bad = optim_file if name == "resume_optim" else model_file
        assert status == 2, (name, out[-2000:], err[-2000:])
        assert err.strip().splitlines()[-1].startswith(f"error: refusing checkpoint file '{bad}': it would load "
                                                       "'builtins.exec'"), (name, err[-2000:])
        assert "Traceback" not in err, name
    assert not marker.exists()


def test_trust_checkpoint_lets_a_tool_load_it_and_says_so(trained, tmp_path, caplog):
    evil, model_file, marker = evil_copy(trained, tmp_path)
    caplog.clear()
    status, err = run_tool("convert", evil, tmp_path, "--trust-checkpoint")
    assert status == 0, err
    assert marker.exists()  # the user asked for it: the payload ran
    assert f"trust_checkpoint: unpickling '{model_file}' without restriction" in caplog.text


@pytest.mark.slow
def test_trust_checkpoint_lets_fine_tuning_load_it_and_says_so(trained, small_corpus, tmp_path):
    evil, _, marker = evil_copy(trained, tmp_path)
    runs = run_trainings({"finetune": training_config(tmp_path / "ft", small_corpus, evil, finetune=True,
                                                      trust_checkpoint=True, train_iters=1)})
    status, out, err = runs["finetune"]
    assert status == 0, err[-2000:]
    assert "trust_checkpoint is on" in out and marker.exists()
