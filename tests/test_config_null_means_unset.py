"""A null means unset, as upstream: upstream's NeoXArgs.validate_types skips any None value, so `key: null` is
valid there for every key whose default is None (`train_data_paths: null`, `eval_tasks: null`,
`use_wandb: null`, ...). Here such a null is the key not given: its default, and a later file's null undoes an
earlier file's value. The sizes a model needs (num_layers, hidden_size, num_attention_heads, seq_length) stay
one line when null, and a null for a key whose upstream default is a value stays the type error it was."""

import logging

import pytest

from conftest import REPO
from neox_fork.config import upstream as up
from neox_fork.config.loading import load_config
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.errors import UserError

TINY = REPO / "configs" / "tiny.yml"
FIELDS = {name for name, f in NeoXConfig.__dataclass_fields__.items() if "doc" in f.metadata}


def null_default_names() -> list[str]:
    lines = (REPO / "tests" / "upstream_neox_null_defaults.txt").read_text().splitlines()
    assert "commit ea7aefd8" in lines[0]
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_list_is_upstreams_and_the_loader_knows_it():
    names = null_default_names()
    assert len(names) == len(set(names)) == 130
    upstream = {line.strip() for line in (REPO / "tests" / "upstream_neox_keys.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert set(names) <= upstream
    assert {n for n in names if n in FIELDS} == up.NULL_DEFAULT_FIELDS
    assert all(up.KEYS[n][1] is None for n in names if n not in FIELDS)  # the table's defaults say so too
    assert set(up.REQUIRED) <= set(names)


@pytest.mark.parametrize("key", [k for k in null_default_names() if k not in up.REQUIRED])
def test_key_null_over_tiny_yml_loads_as_the_key_not_given(tmp_path, key):
    over = tmp_path / "null.yml"
    over.write_text(f"{key}: null\n")
    c = load_config(TINY, over)
    if key in FIELDS:
        assert getattr(c, key) == getattr(NeoXConfig(), key)  # tiny.yml's value too is undone
        assert c.sources.get(key) in (None, str(over))  # a field that takes null keeps it (set by this file)
    else:
        assert key not in c.upstream_keys


def test_a_later_null_undoes_an_earlier_value_and_says_so(tmp_path, caplog):
    over = tmp_path / "null.yml"
    over.write_text("train_data_paths: null\neval_tasks: null\nuse_wandb: null\n")
    with caplog.at_level(logging.INFO, logger="neox_fork.config.loading"):
        c = load_config(TINY, over)
    assert (c.train_data_paths, c.eval_tasks, c.use_wandb) == ([], [], False)
    assert "train_data_paths" not in c.sources and "unsets train_data_paths" in caplog.text
    # overrides (deepy's and the tools') go the same way
    assert load_config(TINY, overrides={"valid_data_paths": None, "train_iters": None}).valid_data_paths == []


@pytest.mark.parametrize("key", up.REQUIRED)
def test_a_null_size_the_model_needs_is_one_line(tmp_path, key):
    over = tmp_path / "null.yml"
    over.write_text(f"{key}: null\n")
    with pytest.raises(UserError) as err:
        load_config(TINY, over)
    assert str(err.value).startswith(f"{over}: key '{key}' is null, but a model needs it (upstream requires it too)")
    assert "\n" not in str(err.value)


def test_a_null_where_upstream_has_a_value_stays_a_type_error(tmp_path):
    over = tmp_path / "null.yml"
    over.write_text("hidden_dropout: null\n")
    with pytest.raises(UserError, match=f"{over}: key 'hidden_dropout' must be float, got None"):
        load_config(TINY, over)
