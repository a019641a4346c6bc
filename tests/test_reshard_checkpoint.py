"""tools/ckpts/reshard_checkpoint.py splits weights for another TP size and back without changing a bit."""


import torch

from conftest import NEOX_TOKENIZER, run_cli, tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import build_model


def reshard(src, dst, tp):
    return run_cli("tools/ckpts/reshard_checkpoint.py", "--input-dir", str(src),
                   "--output-dir", str(dst), "--tp", str(tp))


def test_reshard_to_tp2_and_back_is_bit_exact(one_process, tmp_path):
    config = from_dict(tiny_keys(vocab_size=None, vocab_file=str(NEOX_TOKENIZER), num_gpus=1))
    model = build_model(config, 50277)
    checkpoint.save_model_checkpoint(tmp_path / "tp1", 42, [checkpoint.model_state(model)], config, NEOX_TOKENIZER)
    assert reshard(tmp_path / "tp1", tmp_path / "tp2", 2).returncode == 0
    folder = checkpoint.resolve(tmp_path / "tp2")
    assert folder.name == "global_step42" and checkpoint.tp_size_of(folder) == 2
    saved = checkpoint.load_config_of(folder)
    assert saved.model_parallel_size == 2 and saved.padded_vocab_size() == 50304 and saved.num_gpus is None
    assert (folder / "tokenizer.json").is_file()
    assert reshard(tmp_path / "tp2", tmp_path / "back", 1).returncode == 0
    a, _, _ = checkpoint.load_merged(tmp_path / "tp1")
    b, _, _ = checkpoint.load_merged(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tp_size_the_model_cannot_take_is_one_clear_line(one_process, tmp_path):
    config = from_dict(tiny_keys())
    checkpoint.save_model_checkpoint(tmp_path / "tp1", 1, [checkpoint.model_state(build_model(config))], config)
    run = reshard(tmp_path / "tp1", tmp_path / "tp3", 3)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {checkpoint.resolve(tmp_path / 'tp1')}: a vocabulary of 1024 rows cannot be split over 3 "
        "tensor-parallel ranks; use a tensor-parallel size that divides 1024"]
