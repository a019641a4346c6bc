"""Checkpoints in GPT-NeoX's layouts (issue 11): what we write has gpt-neox's file and tensor names for the
configured pipe_parallel_size, and checkpoints laid out as gpt-neox lays them out convert, fine-tune and
resume here.

The GPT-NeoX checkpoints are built in this file from the documented layout, not by our writer:
layer index 0 the embedding, 2..L+1 the transformer layers (their own names), L+3 the final norm
(`norm.*`), L+4 the output layer (`final_linear.weight`); one `layer_{idx:02d}-model_{tp:02d}-model_states.pt`
file per layer and TP rank with pipe_parallel_size >= 1 (the mp_rank file keeps the engine state and
`module: None`), `sequential.{idx}.<name>` keys in the mp_rank file's `module` with 0. gpt-neox also
saves each layer's rotary `inv_freq` buffer, keeps no sample count, and keeps its YAML under configs/.
"""

import random
import shutil

import numpy as np
import pytest
import torch
import yaml

from checkpoint_readers import run_trainings, training_config
from conftest import tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.checkpoint.hf import export_folder
from neox_fork.model.transformer import build_model
from neox_fork.training.optim import lr_at


def gpt_neox_layers(state, num_layers):
    """{layer index: tensors} of one TP rank, as gpt-neox names them."""
    def under(prefix, new=""):
        return {new + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    layers = {0: {**under("word_embeddings.", "word_embeddings."), **under("position_embeddings.",
                                                                           "position_embeddings.")}}
    for i in range(num_layers):
        layers[i + 2] = under(f"layers.{i}.")
        layers[i + 2]["attention.rotary_emb.inv_freq"] = torch.rand(4)  # a buffer gpt-neox saves
    layers[num_layers + 3] = under("final_norm.", "norm.")
    layers[num_layers + 4] = under("output_layer.", "final_linear.") or layers[0]  # tied: the embedding again
    return layers


def write_gpt_neox_step(folder, shards, num_layers, pipe, engine_state=None, config_keys=None):
    """A step folder as gpt-neox writes it; engine_state: an mp_rank file's other entries to keep."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        layers = gpt_neox_layers(shard, num_layers)
        states = dict(engine_state[rank]) if engine_state else {"iteration": 0, "mp_world_size": len(shards),
                                                                "dp_world_size": 1}
        states.pop("consumed_samples", None)
        states.update(random_rng_state=random.getstate(), np_rng_state=np.random.get_state(),
                      args={"num_layers": num_layers, "model_parallel_size": len(shards)})
        if pipe:
            states["module"] = None
            for idx, tensors in layers.items():
                torch.save(tensors, folder / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
        else:
            states["module"] = {f"sequential.{idx}.{k}": v for idx, t in layers.items() for k, v in t.items()}
        torch.save(states, folder / f"mp_rank_{rank:02d}_model_states.pt")
    if config_keys is not None:
        (folder / "configs").mkdir()
        (folder / "configs" / "neox.yml").write_text(yaml.safe_dump(config_keys))


def test_we_write_gpt_neox_file_and_tensor_names(one_process, trained_checkpoint, tmp_path):
    keys = tiny_keys(pos_emb="rotary", no_weight_tying=True)
    model = build_model(from_dict(keys))
    state = checkpoint.model_state(model)
    L = keys["num_layers"]
    expected = {idx: set(t) for idx, t in gpt_neox_layers(state, L).items()}
    for layers in expected.values():
        layers.discard("attention.rotary_emb.inv_freq")
    for pipe in (0, 1):
        config = from_dict({**keys, "pipe_parallel_size": pipe})
        folder = checkpoint.save_model_checkpoint(tmp_path / f"pipe{pipe}", 3, checkpoint.split_tp(state, 2), config)
        for rank in (0, 1):
            module = checkpoint.read_file(folder / f"mp_rank_{rank:02d}_model_states.pt")["module"]
            if pipe:
                assert module == {}
                files = {p.name for p in folder.glob(f"layer_*-model_{rank:02d}-model_states.pt")}
                assert files == {f"layer_{idx:02d}-model_{rank:02d}-model_states.pt" for idx in expected}
                for idx, names in expected.items():
                    layer = checkpoint.read_file(folder / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
                    assert set(layer) == names, idx
            else:
                assert set(module) == {f"sequential.{idx}.{k}" for idx, names in expected.items() for k in names}
                assert not list(folder.glob("layer_*"))
        merged, _, _ = checkpoint.load_merged(folder)
        assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    # checkpoints users already have, in the layout this project wrote before, still read
    old = tmp_path / "old" / "global_step3"
    old.mkdir(parents=True)
    torch.save({"module": state, "iteration": 3, "mp_world_size": 1}, old / "mp_rank_00_model_states.pt")
    checkpoint.save_config(old, from_dict(keys))
    merged, _, _ = checkpoint.load_merged(old)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    # and training writes the same for the pipe_parallel_size it runs with
    folder = checkpoint.resolve(trained_checkpoint)
    module = checkpoint.read_file(folder / "mp_rank_00_model_states.pt")["module"]
    if checkpoint.load_config_of(folder).pipe_parallel_size >= 1:
        assert module == {} and (folder / "layer_00-model_00-model_states.pt").is_file()
        assert "final_linear.weight" in checkpoint.read_file(folder / f"layer_{L + 4:02d}-model_00-model_states.pt")
    else:
        assert all(k.startswith("sequential.") for k in module)


@pytest.mark.slow
@pytest.mark.parametrize("pipe", [1, 0])
def test_gpt_neox_checkpoints_convert_and_fine_tune(one_process, small_corpus, tmp_path, pipe):
    train_config = training_config(tmp_path / "ft", small_corpus, tmp_path / "neox", finetune=True, train_iters=1)
    keys = yaml.safe_load(train_config.read_text())
    keys.pop("load"), keys.pop("finetune")
    config = from_dict(keys)
    state = checkpoint.model_state(build_model(config, 600))
    tp = 2 if pipe else 1
    write_gpt_neox_step(tmp_path / "neox" / "global_step5", checkpoint.split_tp(state, tp), config.num_layers, pipe,
                        config_keys={**keys, "model_parallel_size": tp})
    (tmp_path / "neox" / "latest").write_text("global_step5")
    merged, _, _ = checkpoint.load_merged(tmp_path / "neox")
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    out = export_folder(tmp_path / "neox", tmp_path / "hf")
    # converted: transformers' own model on the exported folder computes what ours does on those weights
    # (fp32 both; the same products summed in other orders: ~1e-6 relative per op, 1e-4 leaves room)
    from transformers import AutoModelForCausalLM

    ours = build_model(config, 600).eval()
    ours.load_state_dict(state, strict=False)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)
    status, stdout, stderr = run_trainings({"ft": train_config})["ft"]
    assert status == 0, stderr[-2000:]
    assert "fine-tuning from the weights of" in stdout
    # fine-tuned from those weights: one AdamW step moves each element by at most lr_0 (Adam's first
    # update is m / sqrt(v) = +-1, less with eps) plus the decay lr_0 * wd * |w|; the run's own seeded
    # initialisation is nowhere near them
    tuned, _, _ = checkpoint.load_merged(tmp_path / "ft" / "ckpt")
    ft_config = from_dict(yaml.safe_load(train_config.read_text()))
    lr0, wd = lr_at(ft_config, 0), ft_config.weight_decay
    assert tuned.keys() == state.keys()
    for name, w in state.items():
        bound = lr0 * (1 + wd * w.abs()) * (1 + 1e-5)
        assert bool(((tuned[name] - w).abs() <= bound).all()), name


@pytest.mark.slow
@pytest.mark.parametrize("pipe", [1, 0])
def test_gpt_neox_checkpoints_resume_exactly(trained_checkpoint, small_corpus, tmp_path, pipe):
    """Step 1 of a training run rewritten in gpt-neox's layout resumes to exactly the run's step 2."""
    src = checkpoint.step_dir(trained_checkpoint, 1)
    folder = tmp_path / "neox" / "global_step1"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("layer_*", "mp_rank_*"))
    config = checkpoint.load_config_of(src)
    state = checkpoint.load_model_shards(src)
    engine_state = [checkpoint.read_file(src / "mp_rank_00_model_states.pt")]
    write_gpt_neox_step(folder, state, config.num_layers, pipe, engine_state=engine_state)
    (tmp_path / "neox" / "latest").write_text("global_step1")
    train_config = training_config(tmp_path / "run", small_corpus, tmp_path / "neox", finetune=False, train_iters=2)
    status, stdout, stderr = run_trainings({"resume": train_config})["resume"]
    assert status == 0, stderr[-2000:]
    assert "at iteration 1" in stdout
    resumed, _, _ = checkpoint.load_merged(tmp_path / "run" / "ckpt")
    expected, _, _ = checkpoint.load_merged(trained_checkpoint, step=2)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


@pytest.mark.parametrize("pipe", [1, 0])
def test_grouped_query_attention_rows_are_in_gpt_neox_order_per_rank(one_process, tmp_path, pipe):
    """Under GQA, gpt-neox's fused QKV holds, per TP rank, [the rank's query heads; its key heads; its value
    heads] (its gqa_project splits the rank's rows in that order). Expected rows are cut from the Hugging Face
    q/k/v projections, whose correctness the family parity tests prove against transformers."""
    from neox_fork.checkpoint.hf import to_hf_state_dict
    from test_hf_families_match_transformers import family_config

    # 2 key/value heads per TP rank: with one per rank both orders coincide
    config = family_config("llama-gqa", pipe_parallel_size=pipe, num_attention_heads=8, num_kv_heads=4)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in checkpoint.model_state(build_model(config)).items()}
    hf = to_hf_state_dict(state, config)
    tp, d = 2, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * d // tp, config.kv_heads * d // tp
    folder = checkpoint.save_model_checkpoint(tmp_path, 1, checkpoint.split_tp(state, tp), config)
    for rank in range(tp):
        if pipe:
            written = checkpoint.read_file(folder / f"layer_02-model_{rank:02d}-model_states.pt")
            qkv = written["attention.query_key_value.weight"]
        else:
            module = checkpoint.read_file(folder / f"mp_rank_{rank:02d}_model_states.pt")["module"]
            qkv = module["sequential.2.attention.query_key_value.weight"]
        attn = "model.layers.0.self_attn."
        expected = torch.cat([hf[attn + "q_proj.weight"][rank * q_rows:(rank + 1) * q_rows],
                              hf[attn + "k_proj.weight"][rank * kv_rows:(rank + 1) * kv_rows],
                              hf[attn + "v_proj.weight"][rank * kv_rows:(rank + 1) * kv_rows]])
        assert torch.equal(qkv, expected), rank
    merged, _, _ = checkpoint.load_merged(folder)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
