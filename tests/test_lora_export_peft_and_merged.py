"""A LoRA checkpoint exports both ways (tools/convert_to_hf.py --peft-adapter): the PEFT folder, loaded by peft on
the base's Hugging Face export, computes our logits; the merged export (W + s B A) computes them too; and peft's
merge_and_unload() equals our merged export. For each HF class: GPTNeoX (fused QKV kept), Llama and StableLm with
grouped-query attention and Mistral (q/k/v and up/gate split from our fused matrices).

Tolerances: fp32; logits of order 1 from the same products summed in another order (HF's split q/k/v
projections, peft's separate adapter matmuls) agree to ~1e-6, bound 1e-5 as the other HF parity tests; the
merged weights are the same fp32 W + s (B A) with the product summed in another order: 1e-6.
"""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import run_cli
from test_hf_families_match_transformers import CLASS, family_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint.hf import export_folder
from neox_fork.errors import UserError
from neox_fork.model.adapters import adapter_sharding, is_adapter
from neox_fork.model.transformer import build_model

LORA = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.05, lora_target_modules="all-linear")
TARGETS = {"GPTNeoXForCausalLM": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]}
SPLIT_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def lora_checkpoints(name, tmp_path, **extra):
    """Our LoRA model of the family (every tensor random, B too), its base saved as a checkpoint and its adapters
    saved on that base as a LoRA run saves them."""
    config = family_config(name, **LORA, **extra)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora.B"):
                p.normal_(std=0.1)
            elif not is_adapter(n):
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    state = checkpoint.model_state(model)
    base = checkpoint.save_model_checkpoint(tmp_path / "base", 1, [{k: v for k, v in state.items()
                                                                    if not is_adapter(k)}], family_config(name))
    checkpoint.save_model_checkpoint(tmp_path / "lora", 2, [{k: v for k, v in state.items() if is_adapter(k)}],
                                     config, lora=(base, adapter_sharding(model)))
    return model, tmp_path / "base", tmp_path / "lora"


@pytest.mark.parametrize("name", ["stablelm-gqa", "llama-gqa", "pythia", "mistral-window"])
def test_peft_folder_and_merged_export_compute_our_logits(one_process, tmp_path, name):
    model, base, lora = lora_checkpoints(name, tmp_path)
    export_folder(base, tmp_path / "hf_base")
    if name == "stablelm-gqa":  # the command line once; the others call the function it calls
        run = run_cli("tools/convert_to_hf.py", "--input-dir", str(lora), "--output-dir", str(tmp_path / "merged"),
                      "--peft-adapter", str(tmp_path / "peft"))
        assert run.returncode == 0, run.stderr[-2000:]
    else:
        export_folder(lora, tmp_path / "merged", peft_adapter=tmp_path / "peft")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == TARGETS.get(CLASS[name], SPLIT_TARGETS)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)

    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
        base_logits = plain(tokens).logits
        peft_model = PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
        theirs = peft_model(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert type(merged).__name__ == CLASS[name]
        merged_logits = merged(tokens).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_logits, ours, rtol=0, atol=1e-5)
    unloaded = peft_model.merge_and_unload().state_dict()
    written = load_file(tmp_path / "merged" / "model.safetensors")
    adapted = [k for k in written
               if k.endswith(".weight") and k.rsplit(".", 2)[-2] in adapter_config["target_modules"]]
    assert len(adapted) == 2 * len(adapter_config["target_modules"])  # every adapted weight of both layers
    for key in written.keys() & unloaded.keys():  # transformers renames a few others (GPTNeoX's embed_out)
        torch.testing.assert_close(unloaded[key], written[key], rtol=0, atol=1e-6, msg=key)
    assert set(adapted) <= unloaded.keys()


def test_rslora_scale_reaches_peft(one_process, tmp_path):
    model, base, lora = lora_checkpoints("llama-gqa", tmp_path, use_rslora=True)
    export_folder(base, tmp_path / "hf_base")
    export_folder(lora, tmp_path / "merged", peft_adapter=tmp_path / "peft")
    tokens = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
        theirs = PeftModel.from_pretrained(plain, tmp_path / "peft").eval()(tokens).logits
        torch.testing.assert_close(theirs, model(tokens), rtol=0, atol=1e-5)


def test_peft_adapter_of_a_full_checkpoint_is_one_line(one_process, tmp_path):
    _, base, _ = lora_checkpoints("llama-gqa", tmp_path)
    with pytest.raises(UserError, match="no LoRA adapters"):
        export_folder(base, tmp_path / "out", peft_adapter=tmp_path / "peft")
