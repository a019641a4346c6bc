"""Batched (left-padded) KV-cache decoding equals one-prompt decoding, full recomputation and transformers;
sampling follows transformers' processors and is reproducible; TP=2 cooperating ranks equal TP=1."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from distributed import run_distributed
from neox_fork.checkpoint import store as checkpoint
from neox_fork.inference.generation import SamplingParams, generate, last_logits, load_for_inference, process_logits
from neox_fork.checkpoint.hf import export_folder
from test_generate_matches_transformers import trained_looking_checkpoint

PROMPTS = [[510, 4495, 273], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [42], [100, 200, 300, 400, 500, 600, 700]]


def test_batched_left_padded_greedy_equals_unbatched_recompute_and_transformers(one_process, tmp_path):
    model = trained_looking_checkpoint(tmp_path / "ckpt", seed=2)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_on_eod=False)

    batched, _ = generate(model, PROMPTS, greedy, batch_size=4)
    alone, _ = generate(model, PROMPTS, greedy, batch_size=1)
    recomputed, _ = generate(model, PROMPTS, greedy, batch_size=4, use_cache=False)
    assert batched == alone == recomputed

    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, width:].tolist()
    assert batched == expected


def test_masked_cached_forward_equals_the_model_forward(one_process, tmp_path):
    model = trained_looking_checkpoint(tmp_path / "ckpt", seed=3)
    tokens = torch.tensor([PROMPTS[1]])
    positions = torch.arange(tokens.shape[1])[None]
    ours = last_logits(model, tokens, positions, torch.ones_like(tokens, dtype=torch.bool), 0)
    with torch.no_grad():
        reference = model(tokens)[:, -1]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_sampling_processors_match_transformers():
    torch.manual_seed(0)
    logits, previous = torch.randn(3, 500) * 3, torch.randint(0, 500, (3, 20))
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                              TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    expected = hf(previous, logits.clone())
    ours = process_logits(logits, previous, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1))


def test_seeded_sampling_is_reproducible_and_independent_of_batching(one_process, tmp_path):
    model = trained_looking_checkpoint(tmp_path / "ckpt", seed=4)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2,
                            seed=11, stop_on_eod=False)
    first, _ = generate(model, PROMPTS, params, batch_size=4)
    again, _ = generate(model, PROMPTS, params, batch_size=4)
    one_by_one, _ = generate(model, PROMPTS, params, batch_size=1)
    params.seed = 12
    other_seed, _ = generate(model, PROMPTS, params, batch_size=4)
    assert first == again == one_by_one
    assert first != other_seed


def _tp_generate(rank, ckpt):
    model, config, _ = load_for_inference(ckpt, tp_cooperate=True)
    from neox_fork.parallel import groups as parallel

    assert model.word_embeddings.weight.shape[0] == 50304 // parallel.tp_size()  # this rank's slice only
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, stop_on_eod=False)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, stop_on_eod=False)
    return generate(model, PROMPTS, greedy)[0], generate(model, PROMPTS, sampled)[0]


@pytest.mark.multiproc
def test_tp2_cooperating_ranks_equal_tp1(tmp_path):
    from neox_fork.parallel import groups as parallel

    parallel.initialize(1)
    model = trained_looking_checkpoint(tmp_path / "tp1", seed=5)
    state, config, folder = checkpoint.load_merged(tmp_path / "tp1")
    checkpoint.save_model_checkpoint(tmp_path / "tp2", 7, checkpoint.split_tp(state, 2), config,
                                     folder / checkpoint.TOKENIZER_FILE)
    expected = _tp_generate(0, tmp_path / "tp1")
    parallel.destroy()
    del model
    ranks = run_distributed(_tp_generate, 2, str(tmp_path / "tp2"))
    assert ranks[0] == ranks[1] == expected
