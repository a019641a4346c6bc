"""model_summary sizes context parallelism: activations per rank over s/CP positions, ZeRO over data x context,
the Ulysses all-to-all bytes per step (worked by hand below), and the longest sequence that fits a GPU per CP."""

import contextlib
import io

import pytest

from neox_fork.perf import flops
from neox_fork.perf.summary import print_summary

GIB = 2**30


def _summary(tmp_path, **keys):
    overlay = tmp_path / "cp.yml"
    overlay.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = print_summary(["configs/stablelm-3b-4e1t.yml", str(overlay)], world_size=8, gpu="H100 SXM",
                               gpu_memory_gb=80)
    return result, out.getvalue()


def test_stablelm_16k_at_cp2_on_8_gpus(tmp_path):
    keys = dict(seq_length=16384, max_position_embeddings=16384, checkpoint_activations="true")
    one, _ = _summary(tmp_path, **keys)
    two, out = _summary(tmp_path, context_parallel_size=2, **keys)
    assert "parallelism: world 8 = tensor 1 x context 2 x data 4" in out
    # every layer activation covers half the positions
    assert two["activations_by_sequence_parallel"][False] == pytest.approx(one["activations_by_sequence_parallel"][False] / 2)
    # ZeRO-1 partitions the optimizer over data x context = 8 ranks at either size (world 8)
    assert two["memory"]["optimizer"] == pytest.approx(one["memory"]["optimizer"])
    # by hand: q, k, v and the output, 32 heads each (no GQA) x head_dim 80 x micro-batch 4 x 8192 positions a rank,
    # half of it sent: 4 x 32 x 80 x 4 x 8192 / 2 = 167,772,160 bf16 elements a layer and pass; 32 layers x 3 passes
    # (forward, recompute, backward) x 2 bytes = 30.0 GiB a step (one micro-batch a step)
    assert two["all_to_all_bytes_per_step"] == 167_772_160 * 2 * 32 * 3
    assert "Ulysses all-to-all per step per rank 30.000 GiB sent" in out
    assert "longest seq_length per 80 GiB GPU (micro-batch 4, recompute full): CP 1: 32768, CP 2: 65536, CP 4: 131072" in out


def test_longest_sequence_doubles_when_activations_dominate():
    def memory_at(cp):
        return lambda s: flops.training_memory_bytes(
            10**6, num_layers=32, hidden_size=4096, seq_length=s, micro_batch=1, tp=1, dp=1, zero_stage=1,
            dtype="bf16", checkpoint_activations=False, vocab_size=32000, cp=cp)
    budget = 70 * GIB
    at1, at2 = (flops.longest_sequence(memory_at(cp), budget, cp) for cp in (1, 2))
    assert at1 >= 1024 and at2 == 2 * at1
