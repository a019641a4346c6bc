"""KTO data and objective together: conversations preprocessed with `--reward-key --binary-reward` come back one
per sample with their record's reward (+1 / -1, read here from the JSON records), and with the policy equal to
the reference the KTO loss of a micro-batch is, by hand, 0.5 x mean(weight of half 1) x (1 - sigmoid(0)) +
0.5 x mean(weight of half 2) x (1 - sigmoid(0)); bad reward settings are one line."""

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.data.chat import ChatOptions, preprocess_chat, write_chat_tokenizer
from neox_fork.data.datasets import collate_samples
from neox_fork.data.pairwise import build_kto
from neox_fork.data.tokenizer import TokenizerSource
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model
from neox_fork.training.preference import Objective, make_reference

CHAT = Path(__file__).resolve().parents[1] / "examples" / "chat"


def write_kto_data(folder, small_corpus):
    """The first 8 shipped pairs as 16 unpaired conversations (chosen: good, rejected: not), preprocessed with
    `--reward-key good --binary-reward` into FOLDER/kto_messages_{,label_,reward_}document; returns the records."""
    records = []
    for line in (CHAT / "demo_chat_pairs.jsonl").read_text().splitlines()[:8]:
        pair = json.loads(line)
        records += [{"messages": pair["chosen"], "good": True}, {"messages": pair["rejected"], "good": False}]
    (folder / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = write_chat_tokenizer(str(small_corpus / "tokenizer.json"), str(CHAT / "chat_template.jinja"),
                                     str(folder / "tokenizer"))
    preprocess_chat([str(folder / "kto.jsonl")], str(folder / "kto"), tokenizer, jsonl_keys=["messages"],
                    options=ChatOptions(only_last=True, reward_key="good", binary_reward=True))
    return records


@pytest.fixture(scope="module")
def kto_data(small_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref_kto")
    return folder, write_kto_data(folder, small_corpus)


def _config(small_corpus, folder, **overrides):
    p = str(folder / "kto_messages")
    keys = tiny_keys(vocab_size=None, vocab_file=str(small_corpus / "tokenizer.json"), seq_length=96,
                     train_impl="kto", pack_impl="unpacked", train_data_paths=[p + "_document"],
                     train_label_data_paths=[p + "_label_document"], train_reward_data_paths=[p + "_reward_document"],
                     valid_data_paths=[], train_micro_batch_size_per_gpu=4, train_iters=2, hidden_dropout=0.0,
                     attention_dropout=0.0, kto_desirable_weight=1.0, kto_undesirable_weight=3.0)
    keys.update(overrides)
    return from_dict(keys)


def test_rewards_follow_their_conversations_and_the_first_loss_is_by_hand(one_process, small_corpus, kto_data):
    folder, records = kto_data
    c = _config(small_corpus, folder)
    tokenizer = TokenizerSource.of_config(c).build()
    train, _ = build_kto(c, tokenizer, world_size=1)
    for k in range(len(train)):  # every sample: one conversation and its own record's reward
        item = train[k]
        text = tokenizer.decode([t for t in item["tokens"].tolist() if t])
        record = next(r for r in records if r["messages"][-1]["content"] in text)
        assert item["reward"].item() == (1.0 if record["good"] else -1.0)
    batch = collate_samples([train[k] for k in range(4)])
    assert batch["reward"].shape == (4,)
    torch.manual_seed(0)
    model = build_model(c, tokenizer.vocab_size)
    loss, metrics = Objective(c, make_reference(model))(model, batch)
    w = [1.0 if r > 0 else 3.0 for r in batch["reward"].tolist()]
    want = 0.5 * (w[0] + w[1]) / 2 * 0.5 + 0.5 * (w[2] + w[3]) / 2 * 0.5  # sigmoid(0) = 1/2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert metrics["kl"].item() == 0.0


@pytest.mark.parametrize("overrides, message", [
    (dict(pack_impl="packed"), "pack_impl: unpacked"),
    (dict(train_reward_data_paths=[]), "train_reward_data_paths"),
])
def test_bad_kto_settings_are_one_line(one_process, small_corpus, kto_data, overrides, message):
    folder, _ = kto_data
    with pytest.raises(UserError, match=message) as e:
        c = _config(small_corpus, folder, **overrides)
        build_kto(c, TokenizerSource.of_config(c).build(), world_size=1)
    assert "\n" not in str(e.value)
