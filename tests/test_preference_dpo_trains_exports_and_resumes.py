"""DPO end to end on the shipped preference pairs (examples/chat/demo_chat_pairs.jsonl, `--only-last`):

* the first step, policy = reference and dropout off, logs lm_loss ln 2 and zero rewards, with upstream's
  metric names in metrics.jsonl;
* after a short run, the implicit reward computed with transformers from the exported policy and the exported
  reference (log p_policy - log p_reference of the answer's trained tokens) prefers the chosen answer on most
  training pairs; the reference saved in the checkpoint is the starting weights;
* resuming from a mid-run checkpoint copied elsewhere (the reference must come from the checkpoint: the
  policy's weights there are not the reference) gives exactly the uninterrupted run's losses;
* bad pairwise data (pairs that do not match, a pair that trains nothing) is one line.
"""

import json
import math
import shutil

import numpy
import pytest
import torch

from checkpoint_bytes import assert_files_hold_only_their_tensors
from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.data.pairwise import PairFiles, PairwiseSamples
from neox_fork.errors import UserError

STEPS, HALF = 40, 20
METRICS = ("lm_loss", "chosen_rewards", "rejected_rewards", "reward_acc", "margins", "chosen_pos", "chosen_neg",
           "ref_pos", "ref_neg")


def dpo_keys(pairs, **overrides):
    p = str(pairs / "pairs")
    keys = dict(train_impl="dpo", dataset_impl="pairwise", train_data_paths=[], valid_data_paths=[],
                pos_train_data_paths=[p + "_chosen_document"], neg_train_data_paths=[p + "_rejected_document"],
                pos_train_label_data_paths=[p + "_chosen_label_document"],
                neg_train_label_data_paths=[p + "_rejected_label_document"], finetune=True, hidden_dropout=0.0,
                seq_length=96, train_micro_batch_size_per_gpu=4, train_iters=STEPS, checkpoint_factor=HALF,
                dpo_beta=0.1, warmup=0.0)
    keys.update(overrides)
    return keys


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, small_corpus, preference_pairs, trained_checkpoint):
    folder = tmp_path_factory.mktemp("pref_dpo")
    run_training(write_train_config(folder, small_corpus, **dpo_keys(preference_pairs, load=str(trained_checkpoint))))
    return folder / "ckpt"


@pytest.mark.slow
def test_first_step_is_ln2_with_zero_rewards_and_upstream_names(dpo_run):
    rows = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["iteration"] == 1)
    assert set(METRICS) <= set(first)
    assert first["lm_loss"] == pytest.approx(math.log(2), abs=1e-6)  # fp32: equal log-probs, beta x 0
    assert first["chosen_rewards"] == first["rejected_rewards"] == first["margins"] == 0.0
    assert first["chosen_pos"] == first["ref_pos"] and first["chosen_neg"] == first["ref_neg"]


def _answer_logprobs(model_dir, pairs, key):
    """Each conversation's summed log p of its trained tokens, by transformers from an exported folder."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokens = IndexedDataset(str(pairs / f"pairs_{key}_document"))
    labels = IndexedDataset(str(pairs / f"pairs_{key}_label_document"))
    out = []
    with torch.no_grad():
        for i in range(len(tokens)):
            ids = torch.tensor(tokens[i][:97], dtype=torch.long)[None]
            target = torch.tensor(labels[i][:97], dtype=torch.long)[None, 1:]
            logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)
            trained = target >= 0
            out.append(logp[0, trained[0]].gather(-1, target[trained][:, None]).sum().item())
    return numpy.array(out)


@pytest.mark.slow
def test_exported_policy_prefers_chosen_by_its_implicit_reward(dpo_run, preference_pairs, trained_checkpoint, tmp_path):
    pairs = preference_pairs
    from neox_fork.checkpoint.hf import export_folder

    step = checkpoint.step_dir(dpo_run, STEPS)
    saved_ref, _, _ = checkpoint.load_merged(step / "reference")
    assert_files_hold_only_their_tensors(step)  # the reference's files too (tests/checkpoint_bytes.py)
    start, _, _ = checkpoint.load_merged(trained_checkpoint)
    for name in start:  # the checkpoint carries the starting weights as the reference
        torch.testing.assert_close(saved_ref[name], start[name], rtol=0, atol=0, msg=name)
    policy = export_folder(dpo_run, tmp_path / "policy", save_tokenizer=False)
    reference = export_folder(step / "reference", tmp_path / "reference", save_tokenizer=False)
    reward = {key: _answer_logprobs(policy, pairs, key) - _answer_logprobs(reference, pairs, key)
              for key in ("chosen", "rejected")}
    wins = int((reward["chosen"] > reward["rejected"]).sum())
    assert wins >= 0.75 * len(reward["chosen"]), (wins, len(reward["chosen"]))


@pytest.mark.slow
def test_resume_from_a_copied_checkpoint_is_exact(dpo_run, small_corpus, preference_pairs, tmp_path):
    pairs = preference_pairs
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint.step_dir(dpo_run, HALF), moved / f"global_step{HALF}")
    (moved / "latest").write_text(f"global_step{HALF}")
    config = write_train_config(tmp_path, small_corpus, **dpo_keys(pairs, load=str(moved), finetune=False))
    run_training(config)
    resumed, whole = read_metrics(tmp_path / "ckpt"), read_metrics(dpo_run)
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    assert all(resumed[i] == whole[i] for i in resumed), [(i, resumed[i], whole[i]) for i in resumed]
    for name in ("chosen_rewards", "margins"):
        assert read_metrics(tmp_path / "ckpt", name) == {i: read_metrics(dpo_run, name)[i] for i in resumed}


def _write(prefix, docs, dtype=numpy.int32):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.mark.parametrize("case", ["counts", "label_lengths", "nothing_trained"])
def test_bad_pairs_are_one_line(tmp_path, case):
    pos = _write(tmp_path / "pos", [[1, 2, 3, 4], [5, 6, 7]])
    neg = _write(tmp_path / "neg", [[1, 2, 9], [5, 6, 8, 8]] + ([[3, 3]] if case == "counts" else []))
    pos_labels = [[-100, -100, 3, 4], [-100, 6, 7]] if case != "label_lengths" else [[-100, 3], [-100, 6, 7]]
    neg_labels = [[-100, -100, 9], [-100, -100, -100, -100] if case == "nothing_trained" else [-100, 6, 8, 8]]
    pl = _write(tmp_path / "pos_label", pos_labels)
    nl = _write(tmp_path / "neg_label", neg_labels[:2])
    expected = {"counts": "holds 3 documents but .*pos holds 2", "label_lengths": "document 0 has 2 entries",
                "nothing_trained": "neg_label: document 1 trains no position"}[case]
    with pytest.raises(UserError, match=expected) as e:
        PairwiseSamples([PairFiles(pos, neg, pl, nl)], seq_length=8, num_samples=4, seed=1)
    assert "\n" not in str(e.value)


def test_pairs_stay_together_padded_and_masked(tmp_path):
    pos = _write(tmp_path / "pos", [[1, 2, 3, 4], [5, 6, 7]])
    neg = _write(tmp_path / "neg", [[1, 2, 9], [5, 6, 8, 8, 8, 8, 8, 8, 8, 8]])
    samples = PairwiseSamples([PairFiles(pos, neg)], seq_length=6, num_samples=5, seed=1)
    seen = set()
    for k in range(len(samples)):
        item = samples[k]
        chosen = item["tokens"][0].tolist()
        seen.add(chosen[0])
        if chosen[0] == 1:  # pair 0: inputs tokens[:-1] padded with 0, targets tokens[1:] padded with -100
            assert item["tokens"].tolist() == [[1, 2, 3, 0, 0, 0], [1, 2, 0, 0, 0, 0]]
            assert item["labels"].tolist() == [[2, 3, 4, -100, -100, -100], [2, 9, -100, -100, -100, -100]]
        else:  # pair 1: the rejected side is cut at seq_length + 1 tokens (allow_chopped)
            assert item["tokens"].tolist() == [[5, 6, 0, 0, 0, 0], [5, 6, 8, 8, 8, 8]]
            assert item["labels"][1].tolist() == [6, 8, 8, 8, 8, 8]
        assert item["loss_mask"].tolist() == (item["labels"] >= 0).float().tolist()
    assert seen == {1, 5} and len(samples) == 5
    kept = PairwiseSamples([PairFiles(pos, neg)], seq_length=6, num_samples=2, seed=1, allow_chopped=False)
    assert {kept[k]["tokens"][0, 0].item() for k in range(len(kept))} == {1}  # the long pair is skipped


@pytest.mark.slow
def test_universal_checkpoint_carries_the_reference(dpo_run, trained_checkpoint, tmp_path):
    from neox_fork.checkpoint import universal

    moved = tmp_path / "moved"
    shutil.copytree(checkpoint.step_dir(dpo_run, HALF), moved / f"global_step{HALF}")
    (moved / "latest").write_text(f"global_step{HALF}")
    out = universal.convert(moved, workers=1)
    carried, _, _ = checkpoint.load_merged(out / "reference")  # what resume_universal reads, at any TP
    start, _, _ = checkpoint.load_merged(trained_checkpoint)
    for name in start:
        torch.testing.assert_close(carried[name], start[name], rtol=0, atol=0, msg=name)
