"""A step folder carries what GPT-NeoX's tools read: configs/ holds each config file of the run byte for byte,
and the merged config.yml has no null values (upstream's converter reads a present key as set) and loads back
to the same config."""

import dataclasses

import pytest
import yaml

from conftest import REPO
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict, load_config


def test_save_config_copies_each_file_as_given_and_drops_nulls(tmp_path):
    a = tmp_path / "neoxkeys_a" / "model.yml"
    b = tmp_path / "neoxkeys_b" / "model.yml"  # the same file name twice: both kept
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_bytes(b"# comments and layout survive\r\n{\n  'num-layers': 3,   \"intermediate_size\": null,\n}\n")
    b.write_bytes(b"merge_file: merges.txt\nhidden_size: 128\nnum_kv_heads: ~\n")
    c = load_config(REPO / "configs" / "tiny.yml", a, b)
    folder = tmp_path / "global_step1"
    folder.mkdir()
    checkpoint.save_config(folder, c)
    kept = sorted(p.name for p in (folder / "configs").iterdir())
    assert kept == ["2-model.yml", "model.yml", "tiny.yml"]
    assert (folder / "configs" / "tiny.yml").read_bytes() == (REPO / "configs" / "tiny.yml").read_bytes()
    assert (folder / "configs" / "model.yml").read_bytes() == a.read_bytes()
    assert (folder / "configs" / "2-model.yml").read_bytes() == b.read_bytes()
    saved = yaml.safe_load((folder / "config.yml").read_text())
    assert None not in saved.values() and "intermediate_size" not in saved and "num_kv_heads" not in saved
    assert saved["num_layers"] == 3 and saved["merge_file"] == "merges.txt"
    # upstream requires max_position_embeddings (its converter reads it); null here means seq_length
    assert saved["max_position_embeddings"] == saved["seq_length"] == c.max_positions
    assert from_dict(saved).to_dict() == saved and from_dict(saved).max_positions == c.max_positions
    assert from_dict(saved) == dataclasses.replace(c, max_position_embeddings=c.seq_length)


def test_a_null_that_is_not_the_default_is_kept_so_the_config_loads_back_the_same(tmp_path):
    c = from_dict({"wandb_project": None})  # default "neox": leaving it out would change it
    assert c.to_dict()["wandb_project"] is None and from_dict(c.to_dict()).wandb_project is None


@pytest.mark.slow
def test_a_training_run_keeps_its_config_file_in_every_step_folder(trained_checkpoint):
    given = (trained_checkpoint.parent / "config.yml").read_bytes()
    for step in (1, 2):
        folder = trained_checkpoint / f"global_step{step}"
        assert [p.name for p in (folder / "configs").iterdir()] == ["config.yml"]
        assert (folder / "configs" / "config.yml").read_bytes() == given
        saved = yaml.safe_load((folder / "config.yml").read_text())
        assert None not in saved.values()
        assert from_dict(saved).to_dict() == load_config(trained_checkpoint.parent / "config.yml").to_dict()
