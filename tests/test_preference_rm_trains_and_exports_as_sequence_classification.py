"""Reward models (`train_impl: rm`): the one-output head reads the last trained position; the export is the
family's transformers *ForSequenceClassification whose score equals ours; after a short run on the shipped
pairs (`--for-rm`) the exported model scores the chosen answer above the rejected one on most pairs."""

from pathlib import Path

import numpy
import pytest
import torch

from conftest import run_training, tiny_keys, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data.chat import ChatOptions, preprocess_chat, write_chat_tokenizer
from neox_fork.checkpoint.hf import export_folder
from neox_fork.model.transformer import build_model

CHAT = Path(__file__).resolve().parents[1] / "examples" / "chat"


def _hf_scores(folder, rows):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # one unpadded row at a time: the score is the last token's
        return numpy.array([model(torch.tensor(r)[None]).logits[0, 0].item() for r in rows])


@pytest.mark.parametrize("family", ["stablelm", "gpt_neox", "llama"])
def test_exported_reward_model_scores_as_ours(one_process, tmp_path, family):
    arch = {"stablelm": {}, "gpt_neox": dict(mlp_type="regular", activation="gelu", gpt_j_residual=True, use_bias_in_mlp=True,
                             use_bias_in_attn_linear=True),
            "llama": dict(norm="rmsnorm", use_bias_in_norms=False, rotary_pct=1.0)}[family]
    c = from_dict(tiny_keys(seq_length=16, train_impl="rm", dataset_impl="pairwise", pos_train_data_paths=["p"],
                            neg_train_data_paths=["n"], hidden_dropout=0.0, attention_dropout=0.0, **arch))
    torch.manual_seed(0)
    model = build_model(c).eval()
    with torch.no_grad():
        model.rm_linear.weight.normal_(0, 1.0)  # scores of size ~1, not ~0.02
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 1000, (3, 16), generator=g)
    lengths = [16, 11, 7]  # the last trained position: the row's last real token
    mask = torch.zeros(3, 16)
    for r, n in enumerate(lengths):
        mask[r, n - 1] = 1
    ours = model(tokens, loss_mask=mask, score="reward").detach().numpy()
    ckpt = checkpoint.save_model_checkpoint(tmp_path / "rm", 1, [checkpoint.model_state(model)], c)
    out = export_folder(ckpt.parent, tmp_path / "hf", save_tokenizer=False)
    import json

    assert json.loads((out / "config.json").read_text())["architectures"][0].endswith("ForSequenceClassification")
    theirs = _hf_scores(out, [tokens[r, :n].tolist() for r, n in enumerate(lengths)])
    numpy.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)  # fp32, two implementations of 2 layers


@pytest.mark.slow
def test_trained_reward_model_prefers_chosen_after_export(small_corpus, trained_checkpoint, tmp_path):
    tokenizer = write_chat_tokenizer(str(small_corpus / "tokenizer.json"), str(CHAT / "chat_template.jinja"),
                                     str(tmp_path / "tokenizer"))
    preprocess_chat([str(CHAT / "demo_chat_pairs.jsonl")], str(tmp_path / "rm"), tokenizer,
                    jsonl_keys=["chosen", "rejected"], options=ChatOptions(for_rm=True))
    p = str(tmp_path / "rm")
    config = write_train_config(
        tmp_path, small_corpus, train_impl="rm", dataset_impl="pairwise", train_data_paths=[], valid_data_paths=[],
        pos_train_data_paths=[p + "_chosen_document"], neg_train_data_paths=[p + "_rejected_document"],
        pos_train_label_data_paths=[p + "_chosen_label_document"],
        neg_train_label_data_paths=[p + "_rejected_label_document"], load=str(trained_checkpoint), finetune=True,
        hidden_dropout=0.0, seq_length=96, train_micro_batch_size_per_gpu=4, train_iters=40, warmup=0.0,
        z_loss=0.001)
    run_training(config)
    out = export_folder(tmp_path / "ckpt", tmp_path / "hf", save_tokenizer=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    scores = {}
    for key in ("chosen", "rejected"):
        docs = IndexedDataset(f"{p}_{key}_document")
        scores[key] = _hf_scores(out, [docs[i][:-1].tolist() for i in range(len(docs))])  # inputs: tokens[:-1]
    wins = int((scores["chosen"] > scores["rejected"]).sum())
    assert wins >= 0.75 * len(scores["chosen"]), (wins, len(scores["chosen"]))
