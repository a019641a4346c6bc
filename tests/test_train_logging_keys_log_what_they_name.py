"""Upstream's logging and profiling keys, from one short training run with all of them on.

The run (train.py, one process, the tiny model, 4 steps of 2 x 64 tokens) writes metrics.jsonl, TensorBoard
events, a Comet offline archive (the real comet_ml client) and a torch profiler trace; each key's output is
compared with an independent number: DeepSpeed's own global gradient norm, the weights of the checkpoints the
run saved, Adam's first moment after one step worked by hand, the tokens of the first batch, and upstream's
noise-scale formula worked by hand.
"""

import json
import math
import zipfile

import pytest
import torch

from conftest import read_metrics, run_training, write_train_config

STEPS = 4
# offline, and none of the client's slow environment probes (git patch, host details, crash reports)
COMET_ENV = {"COMET_START_ONLINE": "false", "COMET_ERROR_TRACKING_ENABLE": "false",
             **{f"COMET_AUTO_LOG_{k}": "false" for k in ("ENV_DETAILS", "GIT_METADATA", "GIT_PATCH", "CODE",
                                                         "ENV_HOST", "ENV_CPU", "ENV_GPU", "ENV_NETWORK",
                                                         "ENV_DISK", "CO2")}}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, small_corpus):
    folder = tmp_path_factory.mktemp("neoxtrain_logging")
    config = write_train_config(
        folder, small_corpus, train_iters=STEPS, checkpoint_factor=1, hidden_dropout=0.0, tensorboard_dir=str(
            folder / "tb"), log_grad_norm=True, log_param_norm=True, log_optimizer_states=True,
        log_grad_pct_zeros=True, log_gradient_noise_scale=True, gradient_noise_scale_n_batches=2, profile=True,
        profile_step_start=1, profile_step_stop=2, memory_profiling=True, memory_profiling_path=str(folder / "mem"),
        use_comet=True, comet_project="neoxtest", comet_experiment_name="tiny-run", comet_tags=["neox", "test"],
        comet_others={"purpose": "test"})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**COMET_ENV, "COMET_OFFLINE_DIRECTORY": str(folder / "comet")}.items():
            mp.setenv(key, value)
        run = run_training(config)
    return folder, run


def _rows(folder):
    return [json.loads(line) for line in (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()]


def _by_prefix(folder, prefix):
    """{iteration: {name: value}} of the metrics whose key starts with `prefix`."""
    out = {}
    for row in _rows(folder):
        values = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
        if values:
            out.setdefault(row["iteration"], {}).update(values)
    return out


@pytest.mark.slow
def test_gradient_norms_add_up_to_deepspeeds_global_norm(logged_run):
    folder, _ = logged_run
    per_param, total = _by_prefix(folder, "gradient_norms/"), read_metrics(folder / "ckpt", "grad_norm")
    assert sorted(per_param) == list(range(1, STEPS + 1))
    for step, norms in per_param.items():
        # DeepSpeed computes its norm of the same gradients on its own (before clipping)
        assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total[step], rel=1e-5)


@pytest.mark.slow
def test_parameter_norms_are_the_saved_weights_norms(logged_run):
    from neox_fork.checkpoint import store as checkpoint

    folder, _ = logged_run
    norms = _by_prefix(folder, "parameter_norms/")
    for step in (1, STEPS):
        weights, _, _ = checkpoint.load_merged(folder / "ckpt", step=step)
        assert norms[step].keys() <= weights.keys()
        for name, value in norms[step].items():
            assert value == pytest.approx(weights[name].double().norm().item(), rel=1e-5), (step, name)


@pytest.mark.slow
def test_optimizer_state_norms_after_one_step_are_adams_first_moment(logged_run):
    folder, _ = logged_run
    states, grads = _by_prefix(folder, "optimizer_state_norms/"), _by_prefix(folder, "gradient_norms/")
    total = read_metrics(folder / "ckpt", "grad_norm")[1]
    clip = min(1.0, 1.0 / (total + 1e-6))  # gradient_clipping 1.0, as DeepSpeed clips
    first = sorted(v for k, v in states[1].items() if k.endswith("_exp_avg"))
    # Adam's m after one step is (1 - beta1) x the clipped gradient; beta1 = 0.9 in the test config
    expected = sorted(0.1 * clip * v for v in grads[1].values())
    assert first == pytest.approx(expected, rel=1e-5)
    assert len([k for k in states[1] if k.endswith("_exp_avg_sq")]) == len(expected)


@pytest.mark.slow
def test_pct_grad_zeros_of_the_embedding_are_the_unseen_tokens(logged_run, small_corpus):
    from neox_fork.config.loading import load_config
    from neox_fork.data.datasets import DataSettings, build_batch_iterator, build_datasets
    from neox_fork.data.tokenizer import build_tokenizer

    folder, _ = logged_run
    c = load_config(folder / "config.yml")
    tokenizer = build_tokenizer(c.tokenizer_type, c.vocab_file)
    train, _, _ = build_datasets(DataSettings.from_config(c, 1), tokenizer)
    batch = next(build_batch_iterator(train, consumed_samples=0, micro_batch_size=c.train_micro_batch_size_per_gpu,
                                      data_parallel_rank=0, data_parallel_size=1))
    rows = c.padded_vocab_size(tokenizer.vocab_size)
    seen = len(torch.unique(batch["tokens"]))  # an embedding row gets a gradient only from its token
    pct = _by_prefix(folder, "pct_grad_zeros/")[1]["word_embeddings.weight"]
    assert pct == pytest.approx(100.0 * (rows - seen) / rows, abs=1e-9)


def test_noise_scale_is_upstreams_estimate_worked_by_hand():
    from neox_fork.training.step_logging import GradientNoiseScale

    gns = GradientNoiseScale(batch_size=2, n_batches=2)
    sq = lambda ts: sum(float(t.pow(2).sum()) for t in ts)  # noqa: E731
    gns.update([torch.tensor([2.0, 0.0])], sq)
    assert gns.noise_scale is None  # the large batch needs n_batches steps
    gns.update([torch.tensor([0.0, 1.0])], sq)
    # B_small 2, B_big 4; G_big = [1, 0.5] -> 1.25, G_small = [0, 1] -> 1
    # |G|^2 = (4 x 1.25 - 2 x 1) / 2 = 1.5; tr(S) = (1 - 1.25) / (1/2 - 1/4) = -1; the EMAs' scales cancel
    assert gns.noise_scale == pytest.approx(-1 / 1.5, rel=1e-12)
    gns.update([torch.tensor([1.0, 1.0])], sq)
    gns.update([torch.tensor([1.0, 3.0])], sq)
    # G_big = [1, 2] -> 5, G_small -> 10: |G|^2 = (20 - 20) / 2 = 0, tr(S) = (10 - 5) x 4 = 20
    # EMA (beta 0.99) before bias correction: g2 0.01 x 1.5 -> 0.99 x 0.015 + 0 ; tr 0.01 x -1 -> 0.99 x -0.01 + 0.2
    g2, tr = 0.99 * 0.015, 0.99 * -0.01 + 0.01 * 20
    assert gns.noise_scale == pytest.approx(tr / g2, rel=1e-9)


@pytest.mark.slow
def test_noise_scale_is_logged_once_the_large_batch_is_complete(logged_run):
    folder, _ = logged_run
    logged = read_metrics(folder / "ckpt", "noise_scale")
    assert 1 not in logged and {2, 3, 4} <= logged.keys()  # n_batches 2
    assert all(math.isfinite(v) for v in logged.values())


@pytest.mark.slow
def test_tensorboard_and_comet_get_the_same_metrics(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = logged_run
    loss = read_metrics(folder / "ckpt", "lm_loss")
    key = "gradient_norms/word_embeddings.weight"
    grad = read_metrics(folder / "ckpt", key)
    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(grad, rel=1e-6)
    archives = list((folder / "comet").glob("*.zip"))
    assert len(archives) == 1, "no Comet offline archive"
    with zipfile.ZipFile(archives[0]) as z:
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
    metrics = {}
    for m in messages:
        if m["type"] == "metric_msg":
            metrics.setdefault(m["payload"]["metric"]["metricName"], {})[m["payload"]["metric"]["step"]] = float(
                m["payload"]["metric"]["metricValue"])
    assert metrics["lm_loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics[key] == pytest.approx(grad, rel=1e-6)
    others = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
    assert others.get("purpose") == "test" and others.get("Name") == "tiny-run"
    experiment = json.loads(zipfile.ZipFile(archives[0]).read("experiment.json"))
    assert experiment.get("project_name") == "neoxtest" and sorted(experiment.get("tags", [])) == ["neox", "test"]


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_profiled_steps(logged_run):
    folder, _ = logged_run
    traces = list((folder / "tb").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1, list((folder / "tb").iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert steps, "the trace holds no profiled step"


@pytest.mark.slow
def test_memory_profiling_says_in_one_line_where_it_cannot_run(logged_run):
    folder, run = logged_run
    if torch.cuda.is_available():
        assert (folder / "mem" / "mem_snapshot.pickle").is_file()
        return
    lines = [line for line in run.stdout.splitlines() if "memory_profiling" in line]
    assert len(lines) == 1 and "needs a CUDA device" in lines[0]
    assert not (folder / "mem").exists()
