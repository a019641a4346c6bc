"""QLoRA (adapter: qlora): the base linears are held in bitsandbytes' 4-bit NF4 while the adapters train, on the
CPU (bitsandbytes 0.50 runs matmul_4bit forward and backward there).

* the quantized model computes what the same model computes with each linear's weight replaced by bitsandbytes'
  own dequantisation of it (fp32; the 4-bit matmul dequantises and multiplies: 1e-5 on logits of order 1), and
  not what the full-precision base computes;
* at TP=2 it trains like TP=1 LoRA on the TP=2 ranks' dequantized weights (the 4-bit forward's tensor-parallel
  communication; bounds of tests/test_lora_adapters_forward_and_tp.py);
* through train.py the loss falls below the quantized base's on the same batches (a run at lr 1e-12), and the
  checkpoint holds the adapters only, as LoRA's.
"""

import pytest
import torch

from conftest import read_metrics, tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from test_lora_training_trains_only_adapters import STEPS, lora_run

bnb = pytest.importorskip("bitsandbytes")


def test_quantized_linears_compute_through_their_nf4_weights(one_process):
    from neox_fork.model.adapters import quantize_base
    from neox_fork.model.transformer import build_model

    config = from_dict(tiny_keys(adapter="qlora", lora_r=4, lora_alpha=8, lora_target_modules="all-linear"))
    model = build_model(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora.B"):
                p.normal_(std=0.1)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
    assert quantize_base(model) == 8
    names = [f"layers.{i}.{m}.weight" for i in range(2) for m in ("attention.query_key_value", "attention.dense",
                                                                   "mlp.linear1", "mlp.linear2")]
    modules = dict(model.named_modules())
    weights = [modules[n[: -len(".weight")]].weight for n in names]
    assert all(w.dtype == torch.uint8 and not w.requires_grad for w in weights)
    assert all((w.quant_state.quant_type, w.quant_state.blocksize) == ("nf4", 64) for w in weights)  # QLoRA's
    state = {k: v for k, v in model.state_dict().items() if k not in names and not k.endswith("_extra_state")}
    state.update({n: bnb.functional.dequantize_4bit(w.data, w.quant_state) for n, w in zip(names, weights)})
    with torch.no_grad():
        quantized = model(tokens)
        reference = build_model(config).eval()  # the same model, the dequantized weights in full precision
        missing, unexpected = reference.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        expected = reference(tokens)
    torch.testing.assert_close(quantized, expected, rtol=0, atol=1e-5)
    assert (quantized - full).abs().max() > 1e-3  # NF4 is not the full-precision base
    model.train()
    model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora." in n)


@pytest.mark.slow
@pytest.mark.multiproc
def test_qlora_trains_through_train_py_and_its_loss_falls(tmp_path, small_corpus, trained_checkpoint):
    trained = lora_run(tmp_path, small_corpus, trained_checkpoint, "qlora", adapter="qlora", checkpoint_factor=STEPS)
    optimizer = {"type": "Adam", "params": {"lr": 1e-12, "betas": [0.9, 0.95], "eps": 1e-5}}
    frozen = lora_run(tmp_path, small_corpus, trained_checkpoint, "frozen", adapter="qlora", optimizer=optimizer,
                      min_lr=1e-12)
    q, base = read_metrics(trained), read_metrics(frozen)
    assert abs(q[1] - base[1]) < 1e-6
    gap = sum(q[i] - base[i] for i in range(2, STEPS + 1)) / (STEPS - 1)  # mean over 2-6: the LoRA test's bound
    assert gap < -1e-3, (q, base)
    step = checkpoint.resolve(trained)
    saved = torch.load(step / checkpoint.MODEL_FILE.format(0), weights_only=False)
    assert saved["module"] and all(".lora." in n for n in saved["module"])


@pytest.mark.multiproc
def test_qlora_at_tp2_trains_like_lora_on_its_dequantized_weights():
    """Each TP rank quantizes its own slice (bitsandbytes' double quantization scales the block maxima over the
    whole tensor, so slices quantize unlike the whole): TP=2 QLoRA is compared with TP=1 LoRA on the TP=2 ranks'
    dequantized weights, merged. That checks the 4-bit forward's tensor-parallel communication exactly."""
    from distributed import run_distributed
    from neox_fork.checkpoint.store import merge_tp_shards
    from test_lora_adapters_forward_and_tp import _train_two_steps

    keys = tiny_keys(lora_r=4, lora_alpha=8, lora_dropout=0.2, lora_target_modules="all-linear", seed=9)
    two = run_distributed(_train_two_steps, 2, dict(keys, adapter="qlora", model_parallel_size=2))
    dequantized = merge_tp_shards([t["dequantized"] for t in two])
    assert len(dequantized) == 8
    one = run_distributed(_train_two_steps, 1, dict(keys, adapter="lora", model_parallel_size=1), dequantized)[0]
    for step in range(2):
        loss1, logits1, _, grads1 = one["steps"][step]
        assert abs(loss1 - two[0]["steps"][step][0]) < 1e-5
        torch.testing.assert_close(two[0]["steps"][step][1], logits1, rtol=0, atol=1e-5)
        merged = merge_tp_shards([t["steps"][step][3] for t in two], two[0]["specs"])
        for name, tensor in grads1.items():
            torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
