"""A truncated, garbage or missing checkpoint file is one line naming the file and what is wrong, and the
step folders that do load, for every reader (convert, reshard, generate, eval, fine-tune, resume)."""

import shutil

import pytest

from checkpoint_readers import TOOLS, run_tool, run_trainings, training_config, weights_file
from neox_fork.checkpoint import store as checkpoint
from neox_fork.errors import UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_checkpoint):
    """The training checkpoint (steps 1 and 2), and the same weights split for TP=2."""
    tp2 = tmp_path_factory.mktemp("corrupt") / "tp2"
    for step in (1, 2):
        checkpoint.reshard(trained_checkpoint, tp2, 2, step=step)
    return trained_checkpoint, tp2


def damage(src, dst, how):
    """A copy of `src` whose step 2 has one broken file; returns (copy, that file, what the error says)."""
    shutil.copytree(src, dst)
    step = checkpoint.step_dir(dst, 2)
    if how == "missing":  # a tensor-parallel rank's weights
        path = step / checkpoint.MODEL_FILE.format(1)
        path.unlink()
        return dst, path, "is missing (the checkpoint has 2 tensor-parallel ranks)"
    if how == "missing_zero_shard":  # read by DeepSpeed's loader on resume
        path = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        path.unlink()
        return dst, path, "is missing"
    path = weights_file(step)
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return dst, path, f"is truncated or damaged ({len(data) // 2} bytes; its zip archive is incomplete)"
    path.write_bytes(b"not a checkpoint\n" * 64)
    return dst, path, "is not a PyTorch checkpoint file (it starts with b'not ')"


def expected_line(ckpt, path, what):
    return (f"error: checkpoint file '{path}' {what}; step folders in '{ckpt}' that load: global_step1 "
            "(pick one with --step or 'latest')")


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing"])
def test_each_tool_names_the_broken_file_and_the_steps_that_load(trained, tmp_path, how):
    ckpt, path, what = damage(trained[1] if how == "missing" else trained[0], tmp_path / "ckpt", how)
    for name in TOOLS:
        status, err = run_tool(name, ckpt, tmp_path / name)
        assert status == 2, (name, err)
        assert err.strip().splitlines() == [expected_line(ckpt, path, what)], name


@pytest.mark.slow
def test_fine_tune_and_resume_name_the_broken_file_and_the_steps_that_load(trained, small_corpus, tmp_path):
    configs, expected = {}, {}
    cases = {"finetune": [("truncated", trained[0]), ("garbage", trained[0]), ("missing", trained[1])],
             "resume": [("truncated", trained[0]), ("garbage", trained[0]), ("missing_zero_shard", trained[0])]}
    for mode, damages in cases.items():
        for how, src in damages:
            name = f"{mode}_{how}"
            ckpt, path, what = damage(src, tmp_path / name / "load", how)
            configs[name] = training_config(tmp_path / name, small_corpus, ckpt, finetune=mode == "finetune")
            expected[name] = expected_line(ckpt, path, what)
    for name, (status, out, err) in run_trainings(configs).items():
        assert status == 2, (name, out[-2000:], err[-2000:])
        assert "Traceback" not in err, (name, err[-3000:])
        assert err.strip().splitlines()[-1] == expected[name], name


@pytest.mark.parametrize("name, read, expected", [
    ("latest", checkpoint.read_latest, "expected 'global_stepN', found 'global_step1x'"),
    ("latest_universal", checkpoint.read_latest_universal, "expected 'global_stepN_universal', found 'global_step1x'"),
])
def test_a_pointer_file_naming_no_step_is_one_line(tmp_path, name, read, expected):
    (tmp_path / name).write_text("global_step1x\n")
    with pytest.raises(UserError) as err:
        read(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / name}: {expected}") and "\n" not in str(err.value)
