"""A LoRA checkpoint (adapters + the base it names) is what generation and evaluation load: the model they build
has the adapters and computes our logits, in one process and with two tensor-parallel ranks.

Tolerances: fp32, the same model; TP=2 sums the same products in another order: 1e-5 on logits of order 1."""

import pytest
import torch

from distributed import run_distributed
from test_lora_export_peft_and_merged import lora_checkpoints

TOKENS = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(4))


def test_generation_loads_base_and_adapters(one_process, tmp_path):
    from neox_fork.inference.generation import load_for_inference

    model, _, lora = lora_checkpoints("stablelm-gqa", tmp_path)
    with torch.no_grad():
        ours = model(TOKENS)
    loaded, config, _ = load_for_inference(lora, tp_cooperate=False)
    assert config.adapter == "lora" and any(".lora." in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), ours, rtol=0, atol=1e-5)


def _logits_at_tp2(rank, folder):
    from neox_fork.inference.generation import load_for_inference

    model, _, _ = load_for_inference(folder, tp_cooperate=True, tp=2)
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.multiproc
def test_generation_at_tp2_loads_base_and_adapters(one_process, tmp_path):
    model, _, lora = lora_checkpoints("llama-gqa", tmp_path)
    with torch.no_grad():
        ours = model(TOKENS)
    for logits in run_distributed(_logits_at_tp2, 2, str(lora)):
        torch.testing.assert_close(logits, ours, rtol=0, atol=1e-5)


def test_reshard_of_a_lora_checkpoint_splits_its_adapters_on_the_same_base(one_process, tmp_path):
    """tools/ckpts/reshard_checkpoint.py at TP=2: the adapters split as lora_adapters.json says (GQA's fused QKV rows
    by whole groups), the base named, not copied; read back merged, base and adapters are unchanged (exact: the
    split only slices). Universal checkpoints of LoRA runs: tests/test_lora_pipeline_and_universal_resume.py."""
    from neox_fork.checkpoint import store as checkpoint

    _, _, lora = lora_checkpoints("llama-gqa", tmp_path)
    out = checkpoint.reshard(lora, tmp_path / "out", 2)
    assert checkpoint.tp_size_of(out) == 2
    assert checkpoint.lora_info(out)["base"] == checkpoint.lora_info(checkpoint.resolve(lora))["base"]
    assert not list(out.glob("layer_*"))
    assert all(".lora." in k for k in torch.load(out / checkpoint.MODEL_FILE.format(1), weights_only=True)["module"])
    a, _, _ = checkpoint.load_merged(lora)
    b, _, _ = checkpoint.load_merged(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
