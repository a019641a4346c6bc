"""RoPE scaling (`rope_scaling`, neox_fork/model/rope_scaling.py) computes what transformers computes.

For each type (linear, dynamic, yarn, longrope, llama3), at full and 25% partial rotary:
- the inverse frequencies and the attention factor equal `ROPE_INIT_FUNCTIONS`' for the same fields, and the
  cos/sin tables our `Rotary` gives a decoding sequence of calls equal those of transformers' rotary module
  (dynamic and longrope change with the length). Bit-equal, not only within fp32 rounding: the same
  operations run in the same order;
- a transformers model of each of the four classes with that `rope_parameters` imports, gives the same logits
  at 100 positions (past original_max_position_embeddings 32), greedy-generates the same tokens with and without
  a KV cache, and exports back with bit-exact weights and the same `rope_parameters` and max_position_embeddings.
  The logits without scaling differ from transformers' by far more than the bound, so the check sees it;
- tensor parallelism (TP=2, with sequence parallelism for the loss) gives the logits and loss of one process;
  a training run with pipeline x tensor x sequence parallelism trains as one process does, and its checkpoint
  exports to a transformers model with the same logits (slow tier).

Logit bound: the random models have unit-scale norms and weights of std 0.2, so logits reach about 12.
Llama, Mistral and StableLm give bit-equal logits; GPTNeoX's layers (parallel residual, its attention) sum
the same products in another order, which moves a logit by a few fp32 roundings of the values summed (up
to 9e-6 here, 0.7e-6 of the largest |logit|). `LOGIT_RTOL` = 4e-6 of the largest |logit| (about 35 fp32 unit
roundoffs) leaves room for another machine's summation order; plain RoPE misses by 3.6 or more.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, StableLmConfig, StableLmForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from distributed import run_distributed
from neox_fork.checkpoint.hf import export_folder, import_folder
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.model import rope_scaling
from neox_fork.model.transformer import Rotary

ORIGINAL = 32  # original_max_position_embeddings of the test models; they run 100 positions
LENGTH = 100
LOGIT_RTOL = 4e-6


def fields(kind: str, rotary_dim: int) -> dict:
    """rope_parameters of each type (transformers' names) for `rotary_dim` rotary dims, without rope_theta."""
    half = rotary_dim // 2
    return {
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 4.0},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 8.0, "mscale": 0.8,
                 "mscale_all_dim": 0.5},
        "longrope": {"short_factor": [1.0 + 0.05 * i for i in range(half)],
                     "long_factor": [1.5 + 0.5 * i for i in range(half)], "original_max_position_embeddings": ORIGINAL},
        "llama3": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL},
    }[kind]


TYPES = ["linear", "dynamic", "yarn", "longrope", "llama3"]


def hf_max_positions(kind):
    """transformers' threshold for dynamic is max_position_embeddings; the others scale from original to 4x."""
    return ORIGINAL if kind == "dynamic" else 4 * ORIGINAL


# ---------------------------------------------------------------------- frequencies
@pytest.mark.parametrize("pct", [1.0, 0.25])
@pytest.mark.parametrize("variant", [*TYPES, "yarn-plain"])
def test_frequencies_and_attention_factor_equal_rope_init_functions(variant, pct):
    head_dim, theta = 64, 500000.0
    dim = int(head_dim * pct)
    kind = variant.split("-")[0]
    f = fields(kind, dim)
    if variant == "yarn-plain":  # yarn's other paths: attention factor from factor alone (a 0 mscale_all_dim is
        # unset, as a 0 beta_slow), no truncation
        f = {**f, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0, "beta_slow": 0}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=hf_max_positions(kind),
                         rope_parameters={"rope_type": kind, "rope_theta": theta, "partial_rotary_factor": pct,
                                          **{k: v for k, v in f.items() if v is not None}})
    ours_scaling = {"rope_type": kind, **{k: v for k, v in f.items() if v is not None}}
    if kind == "dynamic":  # ours reads the threshold from original_max_position_embeddings (default: ours)
        ours_scaling["original_max_position_embeddings"] = ORIGINAL
    lengths = [None]
    if kind == "dynamic":
        lengths += [torch.tensor(ORIGINAL + 1), torch.tensor(LENGTH), torch.tensor(1000)]
    if kind == "longrope":
        lengths += [ORIGINAL, ORIGINAL + 1]
    for seq_len in lengths:
        theirs, their_factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
        ours, our_factor = rope_scaling.frequencies(ours_scaling, dim, theta, 4 * ORIGINAL, seq_len=seq_len)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (dim // 2,)
        assert torch.equal(ours, theirs), (kind, seq_len)
        assert our_factor == their_factor, (kind, seq_len)
    if kind in ("yarn", "longrope"):
        assert their_factor != 1.0  # the attention factor is exercised


@pytest.mark.parametrize("kind", TYPES)
def test_rotary_tables_equal_transformers_over_a_decoding_sequence(kind):
    """Calls as cached decoding makes them: a prompt of 20 positions, then one position at a time past the
    original length; transformers' module keeps its state between the calls (dynamic grows its base)."""
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

    dim = 16  # 25% of a 64-dim head: StableLM's partial rotary
    config = StableLmConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=hf_max_positions(kind),
                            rope_parameters={"rope_type": kind, "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                             **fields(kind, dim)})
    theirs = StableLmRotaryEmbedding(config)
    scaling = {"rope_type": kind, **fields(kind, dim)}
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = ORIGINAL
    ours = Rotary(dim, 10000.0, scaling, 4 * ORIGINAL)
    x = torch.zeros(1, dtype=torch.float32)
    calls = [torch.arange(20)[None]] + [torch.tensor([[p]]) for p in range(20, 50)] + [torch.arange(LENGTH)[None]]
    for positions in calls:
        cos, sin = theirs(x, positions)
        our_cos, our_sin = ours(positions)
        assert torch.equal(our_cos[:, :, 0], cos) and torch.equal(our_sin[:, :, 0], sin), positions.max().item()


# ---------------------------------------------------------------------- the four classes
def hf_model(cls: str, kind: str):
    """A transformers model of the class with scaled RoPE; head size 32 (8 rotary dims at 25%), random weights."""
    common = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  max_position_embeddings=hf_max_positions(kind))
    pct = 0.25 if cls in ("gpt_neox", "stablelm") else 1.0
    rope = {"rope_type": kind, "rope_theta": 10000.0, **fields(kind, int(32 * pct))}
    if cls == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=pct, use_parallel_residual=True,
                                                 rope_parameters={**rope, "partial_rotary_factor": pct}))
    elif cls == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=rope))
    elif cls == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, sliding_window=24,
                                                 rope_parameters=rope))
    else:
        model = StableLmForCausalLM(StableLmConfig(**common, num_key_value_heads=2,
                                                   rope_parameters={**rope, "partial_rotary_factor": pct}))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def standard_rope(path) -> tuple[dict, int]:
    """rope_parameters and max_position_embeddings of a folder as transformers reads them (defaults filled)."""
    config = AutoConfig.from_pretrained(path)
    return {"partial_rotary_factor": 1.0, **config.rope_parameters}, config.max_position_embeddings


@pytest.mark.parametrize("cls", ["gpt_neox", "llama", "mistral", "stablelm"])
@pytest.mark.parametrize("kind", TYPES)
def test_scaled_hf_model_imports_matches_transformers_past_the_original_length_and_exports_back(
        one_process, tmp_path, kind, cls):
    from neox_fork.inference.generation import SamplingParams, generate, load_for_inference

    theirs = hf_model(cls, kind)
    theirs.save_pretrained(tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "ckpt")
    ours, config, _ = load_for_inference(tmp_path / "ckpt")
    assert rope_scaling.rope_type(config.rope_scaling) == kind

    tokens = torch.randint(0, 1000, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        bound = LOGIT_RTOL * expected.abs().max().item()
        assert (ours(tokens) - expected).abs().max().item() <= bound
        scaled = ours.rotary
        ours.rotary = Rotary(scaled.dim, scaled.base)  # the same weights with plain RoPE: far off
        assert (ours(tokens) - expected).abs().max().item() > 100 * bound
        ours.rotary = scaled

    prompt = [5, 17, 300, 2, 999, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # 20 < 32 < 20 + 40
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_on_eod=False)
    for cache in (True, False):  # dynamic: the cached keys keep the frequencies of their step, as in transformers
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                               pad_token_id=0, use_cache=cache)[0, len(prompt):].tolist()
        got, _ = generate(ours, [prompt], params, use_cache=cache)
        assert got[0] == want, cache

    export_folder(tmp_path / "ckpt", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert standard_rope(tmp_path / "back") == standard_rope(tmp_path / "hf")
    source = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    back = json.loads((tmp_path / "back" / "config.json").read_text())["rope_parameters"]
    assert {**back, "partial_rotary_factor": None} == {**source, "partial_rotary_factor": None}


def test_transformers4_rope_scaling_imports_and_other_types_are_one_line(one_process, tmp_path):
    """A transformers 4 config.json (`rope_scaling` with `type`, rope_theta beside it) imports; a type that is
    not built, or fields it does not take, stop the import with one line."""
    theirs = hf_model("llama", "linear")
    theirs.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")
    config.update(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=10000.0)
    path.write_text(json.dumps(config))
    import_folder(tmp_path / "hf", tmp_path / "ckpt")
    from neox_fork.inference.generation import load_for_inference

    ours, ours_config, _ = load_for_inference(tmp_path / "ckpt")
    assert ours_config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    tokens = torch.arange(LENGTH)[None] * 7 % 1000
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-5)

    for rope, message in (({"rope_type": "proportional", "factor": 2.0}, "proportional RoPE .* not built"),
                          ({"rope_type": "mrope"}, "rope type 'mrope' is not supported"),
                          ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0},
                           "'low_freq_factor' is not read by rope_type linear")):
        path.write_text(json.dumps({**config, "rope_scaling": rope}))
        with pytest.raises(UserError, match=message):
            import_folder(tmp_path / "hf", tmp_path / "refused")


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn"}, "rope_type yarn needs factor"),
    ({"rope_type": "ntk", "factor": 2.0}, "rope_type 'ntk' is not supported; valid: default, linear, dynamic"),
    ({"type": "linear", "factor": 0}, "factor must be a positive number"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, "truncate must be true or false"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "list of 8 positive numbers"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0}, "different from"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, "give it as the config key rotary_emb_base"),
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2.5}, "a positive integer"),
    ({"rope_type": "linear", "factor": 2.0, "pos_emb": "learned"}, "but pos_emb is 'learned'; set pos_emb: rotary"),
])
def test_config_refuses_what_it_cannot_compute_in_one_line(scaling, message):
    pos_emb = scaling.pop("pos_emb", "rotary")
    with pytest.raises(UserError, match=message):
        from_dict(dict(pos_emb=pos_emb, hidden_size=64, num_attention_heads=4, rope_scaling=scaling))


def test_summary_names_the_scaling():
    assert rope_scaling.describe({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}) == \
        "yarn x4 from 4096"
    assert rope_scaling.describe(None) == "default"


# ---------------------------------------------------------------------- parallel
def _tp_logits_and_loss(rank, cases):
    """Per case: the logits (eval) and the training-mode loss of the model its keys build from their seed."""
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model
    from neox_fork.parallel import groups as parallel

    out = []
    for keys in cases:
        config = from_dict(keys)
        parallel.initialize(config.model_parallel_size, backend="gloo")  # once: later calls keep the groups
        parallel.seed_everything(config.seed)
        model = build_model(config)
        tokens = torch.arange(2 * 48).reshape(2, 48) * 7 % 1000
        with torch.no_grad():
            logits = model.eval()(tokens)
            loss = model.train()(tokens, labels=tokens.roll(-1, 1)).item()
        out.append((logits, loss))
    return out


def _tp_cases(tp):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=48,
                max_position_embeddings=64, vocab_size=1000, make_vocab_size_divisible_by=16 // tp, pos_emb="rotary",
                rotary_pct=0.5, mlp_type="gated", activation="silu", norm="rmsnorm", seed=3,
                model_parallel_size=tp, sequence_parallel=tp > 1)
    return [dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
            dict(base, rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16})]


@pytest.mark.multiproc
def test_tp2_with_sequence_parallel_gives_the_logits_and_loss_of_one_process():
    one = run_distributed(_tp_logits_and_loss, 1, _tp_cases(1))[0]
    two = run_distributed(_tp_logits_and_loss, 2, _tp_cases(2))
    assert (one[0][0] - one[1][0]).abs().max() > 1e-3  # same weights (seed), other scaling: other logits
    for case, (logits, loss) in enumerate(one):
        for rank in two:
            torch.testing.assert_close(rank[case][0], logits, rtol=0, atol=1e-5)
            assert rank[case][1] == pytest.approx(loss, rel=1e-5)  # as test_parallel_equivalence.py


@pytest.mark.slow
@pytest.mark.multiproc
def test_pp2_tp2_sequence_parallel_training_with_yarn_equals_one_process_and_exports(tmp_path, small_corpus):
    """train.py with rope_scaling at pipe 2 x tensor 2 (sequence parallel) trains as one process does (the
    bounds of test_parallel_equivalence.py); the checkpoint exports to a transformers model that computes what
    ours computes past the original length."""
    from neox_fork.inference.generation import load_for_inference
    from test_parallel_equivalence import assert_same_losses, assert_same_weights, train

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    keys = dict(rotary_pct=1.0, rope_scaling=yarn)
    one = train(tmp_path, small_corpus, "one", 1, train_micro_batch_size_per_gpu=4, **keys)
    both = train(tmp_path, small_corpus, "pp2tp2", 4, pipe_parallel_size=2, model_parallel_size=2,
                 pipe_partition_method="type:transformer", train_micro_batch_size_per_gpu=2,
                 gradient_accumulation_steps=2, sequence_parallel=True, **keys)
    assert_same_losses(both, one)
    assert_same_weights(both, one)

    export_folder(both, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.rope_parameters["rope_type"] == "yarn"
    ours, _, _ = load_for_inference(both)
    tokens = torch.arange(64)[None] * 7 % 600
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert (ours(tokens) - expected).abs().max().item() <= LOGIT_RTOL * max(1.0, expected.abs().max().item())
    assert math.isfinite(expected.sum().item())
