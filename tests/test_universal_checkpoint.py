"""A run changes tensor-parallel size, data-parallel size and ZeRO stage mid-run through DeepSpeed's Universal
Checkpointing (tools/ckpts/to_universal.py, then `load_universal: true`) and takes the steps the uninterrupted run
takes, data position and LR schedule included.

Runs (train.py on local ranks joined by gloo; bf16 with fp32 masters; dropout off; grouped-query attention with
biases, so every kind of parameter is merged and cut: replicated norms and row-parallel biases, the fused QKV
in whole key/value groups and its bias, [up; gate], row-parallel weights, the padded vocabulary):

    ref   TP=1 x DP=1, ZeRO-1, steps 1-10, saving step 5 too: the uninterrupted run (pipe_parallel_size 1)
    down  TP=2 + SP x DP=2, ZeRO-1, steps 1-5  -> universal -> TP=1 x DP=1, ZeRO-1, steps 6-10
    up    ref's step 5                         -> universal -> TP=2 x DP=2, ZeRO-2, steps 6-10

Bounds. The universal tensors are exact: DeepSpeed's converter, run unchanged, gives per parameter the fp32
master that rounds to the very bf16 weight we saved, in the layout of our own TP merge (checkpoint/store.py,
checked against TP=1 runs elsewhere). A resumed run starts from exactly the saved state (masters, Adam
moments, step, schedule, data position), so its data position and learning rate equal the uninterrupted
run's at every step. Its losses are computed at another layout, whose bf16 reductions round in another
order: as derived in test_sequence_parallel.py (8-bit mantissa, each op rounds to 2^-9 relative), a loss
through two layers agrees to 2^-6. These runs show every layout change works in bf16 within rounding, but
the bound is too wide to catch a wrong layout in a model this young: with the fused QKV merged as two
sub-parameters (broken on purpose) they still pass, while the exact converter test below fails, the TP=1 -> TP=2
load below (masters compared bit for bit) fails, and the fp32 change in
test_sequence_parallel_and_zero2_training.py (1e-5) misses step 4 by 4e-3 relative. Those are the sharp ones.
"""

import re
import shutil
import subprocess

import pytest
import torch
import yaml

from checkpoint_bytes import assert_files_hold_only_their_tensors
from conftest import PYTHON, REPO, read_metrics, run_training, tiny_keys, write_train_config
from distributed import run_distributed
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import universal
from neox_fork.errors import UserError

STEPS, STOP = 10, 5
LOSS_RTOL_BF16 = 2**-6
ARCH = dict(precision="bfloat16", hidden_dropout=0.0, num_kv_heads=2, use_bias_in_attn_linear=True,
            use_bias_in_mlp=True, optimizer={"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                                                         "eps": 1e-5}})


def _config(folder, corpus, tp=1, **keys):
    """Vocabulary padding is a multiple of make_vocab_size_divisible_by x TP: kept at 768 for every TP."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_train_config(folder, corpus, train_iters=STEPS, model_parallel_size=tp,
                              make_vocab_size_divisible_by=256 // tp, **ARCH, **keys)


def _resume_universal(config, nproc, **changes):
    """Convert the newest checkpoint of `config`'s run, then continue it to STEPS with `changes`."""
    keys = yaml.safe_load(config.read_text())
    universal.convert(keys["save"], workers=1)
    tp = changes.get("model_parallel_size", 1)
    keys.update(exit_interval=None, extra_save_iters=None, load=keys["save"], load_universal=True,
                make_vocab_size_divisible_by=256 // tp, **changes)
    config.write_text(yaml.safe_dump(keys))
    return run_training(config, nproc=nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("universal")
    ref = _config(root / "ref", small_corpus, train_micro_batch_size_per_gpu=4, extra_save_iters=[STOP],
                  pipe_parallel_size=1)  # GPT-NeoX's per-layer weight files (down: weights in mp_rank files)
    run_training(ref)
    down = _config(root / "down", small_corpus, tp=2, sequence_parallel=True, train_micro_batch_size_per_gpu=2,
                   exit_interval=STOP)
    run_training(down, nproc=4)
    down_out = _resume_universal(down, 1, model_parallel_size=1, sequence_parallel=False,
                                 train_micro_batch_size_per_gpu=4)
    up = _config(root / "up", small_corpus, train_micro_batch_size_per_gpu=4)
    shutil.copytree(checkpoint.step_dir(root / "ref" / "ckpt", STOP), checkpoint.step_dir(root / "up" / "ckpt", STOP))
    checkpoint.write_atomic(root / "up" / "ckpt" / checkpoint.LATEST_FILE, checkpoint.step_name(STOP))
    up_out = _resume_universal(up, 4, model_parallel_size=2, train_micro_batch_size_per_gpu=2,
                               zero_optimization={"stage": 2})
    return root, down_out.stdout, up_out.stdout


def assert_continues_ref(root, name):
    ref, run = root / "ref" / "ckpt", root / name / "ckpt"
    resumed = list(range(STOP + 1, STEPS + 1))
    losses, ref_losses = read_metrics(run), read_metrics(ref)
    assert sorted(losses)[-len(resumed):] == resumed and sorted(ref_losses) == list(range(1, STEPS + 1))
    for it in resumed:
        assert losses[it] == pytest.approx(ref_losses[it], rel=LOSS_RTOL_BF16), (name, it)
    for key in ("consumed_samples", "lr"):
        got, want = read_metrics(run, key), read_metrics(ref, key)
        assert [got[it] for it in resumed] == [want[it] for it in resumed], key


@pytest.mark.slow
@pytest.mark.multiproc
def test_tp2_sp_dp2_to_tp1_dp1_continues_the_run(runs):
    root, out, _ = runs
    assert f"(saved at TP=2 x DP=2) at TP=1 x DP=1, iteration {STOP} ({4 * STOP} samples consumed)" in out
    assert_continues_ref(root, "down")


@pytest.mark.slow
@pytest.mark.multiproc
def test_tp1_zero1_to_tp2_dp2_zero2_continues_the_run(runs):
    root, _, out = runs
    assert f"(saved at TP=1 x DP=1) at TP=2 x DP=2, iteration {STOP}" in out
    assert_continues_ref(root, "up")
    final = checkpoint.resolve(root / "up" / "ckpt")  # what the resumed run saves is a ZeRO-2 TP=2 x DP=2 state
    assert checkpoint.tp_size_of(final) == 2 and checkpoint.dp_size_of(final) == 2
    states = {f.name: checkpoint.read_file(f) for f in final.glob("*.pt")}  # every file, through the safe reader
    assert int(states["bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt"]["optimizer_state_dict"]["zero_stage"]) == 2


def _load_universal(rank, keys):
    """train.py's setup (engine and resume) on the universal checkpoint of keys["load"]: this rank's fp32
    master (DeepSpeed's safe_get_full_fp32_param: whole over data-parallel ranks, this TP rank's slice) and
    bf16 weight of every parameter, as loaded, before any step."""
    from deepspeed.utils import safe_get_full_fp32_param

    from neox_fork.training import loop as training
    from neox_fork.config.loading import from_dict

    run = training.setup(from_dict(keys))
    params = run.engine.module.named_parameters()
    masters = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in params}
    weights = {n: t.detach().clone() for n, t in checkpoint.model_state(run.engine.module).items()}
    return run.state.iteration, masters, weights


@pytest.mark.slow
@pytest.mark.multiproc
def test_tp1_universal_loads_at_tp2_as_exactly_the_saved_masters(runs, small_corpus, tmp_path):
    """The sharp check of a TP increase: the TP=1 step's universal checkpoint loaded by a TP=2 run; its two
    ranks' fp32 masters merged back (checkpoint.merge_tp_shards, checked against TP=1 runs elsewhere) are bit
    for bit the saved TP=1 masters, and its bf16 weights the saved weights. No arithmetic happens on load
    (slicing only), so the bound is equality: a fused QKV or [up; gate] cut the wrong way moves rows."""
    root, _, _ = runs
    source = checkpoint.universal_dir(root / "up" / "ckpt", STOP)  # ref's TP=1 step 5, converted
    load = tmp_path / "load"
    shutil.copytree(source, checkpoint.universal_dir(load, STOP))
    checkpoint.write_atomic(load / checkpoint.LATEST_UNIVERSAL_FILE, source.name)
    keys = yaml.safe_load(_config(tmp_path / "cfg", small_corpus, tp=2).read_text())
    keys.update(load=str(load), load_universal=True, save=None, train_micro_batch_size_per_gpu=4)
    ranks = run_distributed(_load_universal, 2, keys)
    assert [iteration for iteration, _, _ in ranks] == [STOP, STOP]
    masters = checkpoint.merge_tp_shards([m for _, m, _ in ranks])
    weights = checkpoint.merge_tp_shards([w for _, _, w in ranks])
    saved, _, _ = checkpoint.load_merged(root / "ref" / "ckpt", STOP)
    assert set(masters) == set(saved) == set(weights)
    for name, weight in saved.items():
        fp32 = checkpoint.read_file(source / "zero" / name / "fp32.pt")["param"]  # TP=1: ref's own master
        assert torch.equal(masters[name], fp32), name
        assert torch.equal(weights[name], weight), name


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeeds_converter_runs_unchanged_and_merges_as_our_layout(runs, tmp_path):
    """`python -m deepspeed.checkpoint.ds_to_universal` on TP=2 x DP=2 step folder: each parameter's fp32
    master rounds to the merged weight we saved (checkpoint.load_merged), every parameter is there."""
    root, _, _ = runs
    step = checkpoint.step_dir(root / "down" / "ckpt", STOP)
    out = tmp_path / "converted" / "global_step5_universal"
    subprocess.run([PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step),
                    "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   cwd=REPO, check=True, capture_output=True)
    merged, _, _ = checkpoint.load_merged(root / "down" / "ckpt", STOP)
    for name, weight in merged.items():
        saved = checkpoint.read_file(out / "zero" / name / "fp32.pt")
        assert saved["param"].dtype == torch.float32
        assert torch.equal(saved["param"].to(weight.dtype), weight), name


@pytest.mark.slow
@pytest.mark.multiproc
def test_universal_folders_store_only_their_tensors(runs):
    """tools/ckpts/to_universal.py's output (tests/checkpoint_bytes.py): per-parameter files, no whole buffers."""
    root, _, _ = runs
    for name in ("down", "up"):
        folder = checkpoint.universal_dir(root / name / "ckpt", checkpoint.read_latest_universal(root / name / "ckpt"))
        assert assert_files_hold_only_their_tensors(folder) > 10


@pytest.mark.slow
@pytest.mark.multiproc
def test_another_layout_without_load_universal_is_one_line(runs, small_corpus):
    root, _, _ = runs
    config = _config(root / "wrong", small_corpus, tp=2, load=str(root / "ref" / "ckpt"))
    run = run_training(config, nproc=2, check=False)
    assert run.returncode != 0
    assert (
        f"error: checkpoint {checkpoint.step_dir(root / 'ref' / 'ckpt', STEPS)} was saved at model_parallel_size 1 x 1 "
        "data-parallel ranks but this run uses 2 x 1; to change parallelism run `python tools/ckpts/to_universal.py "
        f"--input-dir {root / 'ref' / 'ckpt'}` and resume with load_universal: true") in run.stderr.splitlines()


@pytest.mark.slow
@pytest.mark.multiproc
def test_universal_files_load_only_through_the_safe_reader(runs, tmp_path):
    """A payload in a converted file is refused before DeepSpeed reads it, and DeepSpeed's own
    torch.load(weights_only=False) refuses it too inside universal.safe_unpickling."""
    from test_checkpoint_never_runs_code import plant

    root, _, _ = runs
    folder = tmp_path / "global_step5_universal"
    shutil.copytree(checkpoint.universal_dir(root / "up" / "ckpt", STOP), folder)
    merged, _, _ = checkpoint.load_merged(root / "ref" / "ckpt", STOP)
    universal.check_folder(folder, merged, tp=1)  # the intact folder fits a TP=1 model
    marker, target = tmp_path / "MARKER", folder / "zero" / "layers.1.attention.dense.bias" / "exp_avg.pt"
    plant(target, marker)
    refused = f"refusing checkpoint file '{target}': it would load 'builtins.exec'"
    with pytest.raises(UserError, match=re.escape(refused)):
        universal.check_folder(folder, merged, tp=1)
    with universal.safe_unpickling(), pytest.raises(Exception, match="Unsupported global: GLOBAL exec"):
        torch.load(target, weights_only=False)
    assert not marker.exists()


def test_patterns_name_every_kind_of_parameter(one_process):
    """Worked out by hand from model/transformer.py: a plain-MLP GPT-NeoX layer with biases, learned positions and a tied
    head (the StableLM-like runs above cover the gated MLP and the untied head)."""
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model

    model = build_model(from_dict(tiny_keys(num_kv_heads=2, use_bias_in_attn_linear=True, use_bias_in_mlp=True,
                                            mlp_type="regular", activation="gelu", pos_emb="learned",
                                            no_weight_tying=False)))
    info = universal.checkpoint_info(dict(model.named_parameters()), 1024)
    layer = r"layers\.\d+\."
    assert info == {
        "universal_checkpoint_version": 0.4, "original_vocab_size": 1024,
        "tp_replicated_parameter_patterns": [
            r"position_embeddings\.weight$", *(layer + p for p in (
                r"input_layernorm\.weight$", r"input_layernorm\.bias$", r"attention\.dense\.bias$",
                r"post_attention_layernorm\.weight$", r"post_attention_layernorm\.bias$", r"mlp\.linear2\.bias$")),
            r"final_norm\.weight$", r"final_norm\.bias$"],
        "parameter_with_row_parallelism_patterns": [layer + r"attention\.dense\.weight$",
                                                    layer + r"mlp\.linear2\.weight$"],
        "vocabulary_parameter_patterns": [r"word_embeddings\.weight$"],
    }  # query_key_value and plain linear1 (+ biases) are column-parallel: DeepSpeed's default, dim 0


def test_each_new_rank_takes_the_rng_of_the_saved_rank_at_its_coordinates():
    # (tp_rank, dp_rank, saved_tp, saved_dp) -> (saved global rank = dp x saved_tp + tp, same TP rank)
    assert universal.rng_source(1, 1, 2, 2) == (3, True)  # same layout: its own file
    assert universal.rng_source(0, 0, 2, 2) == (0, True)  # TP=2 x DP=2 -> TP=1 x DP=1
    assert universal.rng_source(1, 0, 1, 1) == (0, False)  # TP=1 -> TP=2: default stream only
    assert universal.rng_source(1, 1, 1, 1) == (0, False)
    assert universal.rng_source(0, 3, 2, 2) == (2, True)  # DP=2 -> DP=4: dp 3 takes dp 1


def test_load_universal_needs_a_converted_checkpoint_and_zero(tmp_path):
    from neox_fork.config.loading import from_dict

    with pytest.raises(UserError, match="load_universal is on but .* has no latest_universal file; make one with "
                                        "python tools/ckpts/to_universal.py"):
        universal.resolve_load(from_dict(tiny_keys(load=str(tmp_path), load_universal=True)))
    with pytest.raises(UserError, match="load_universal needs zero_optimization stage 1 or 2"):
        from_dict(tiny_keys(load_universal=True, zero_optimization={"stage": 0}))


def test_a_pipelined_expert_parallel_load_cuts_for_the_tensor_parallel_rank(one_process):
    """DeepSpeed's universal loader cuts each parameter for its mpu's tensor-parallel rank and size; a pipelined run's
    mpu is DeepSpeed's grid, whose model axis is TP x EP ranks (training/pipeline.py). For the load the optimizer sees
    TP's (training/state.py). Pipe 2 x EP 2 x TP 2 (8 ranks) loaded one process's universal checkpoint and matched
    one process exactly by hand; without this it stopped on the first tensor ('full param numel 12288 != tensor
    slice numel 6144 * tp_world_size 4'). Pipe 2 x EP 2 (TP 1) runs in test_moe_pipeline_and_universal_resume.py."""
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    from neox_fork.parallel import groups as parallel
    from neox_fork.training import state

    class Grid:  # TP x EP = 4 ranks on the model axis, this rank the last
        def get_slice_parallel_rank(self):
            return 3

        def get_slice_parallel_world_size(self):
            return 4

        get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size = (get_slice_parallel_rank,
                                                                                get_slice_parallel_world_size)

        def get_data_parallel_rank(self):
            return 1

    class Optimizer:
        mpu = Grid()

    optimizer, grid = Optimizer(), Optimizer.mpu
    with state._tensor_parallel_grid(optimizer):
        # as deepspeed.runtime.base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir asks
        assert bwc_tensor_model_parallel_rank(mpu=optimizer.mpu) == parallel.tp_rank() == 0
        assert optimizer.mpu.get_slice_parallel_world_size() == parallel.tp_size() == 1
        assert optimizer.mpu.get_data_parallel_rank() == 1
    assert optimizer.mpu is grid
