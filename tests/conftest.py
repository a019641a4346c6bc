"""Shared fixtures: paths, a tiny config, and a one-process parallel state for model tests."""

import contextlib
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# GPT-NeoX-20B's tokenizer, installed into the venv by scripts/setup.sh (scripts/install_test_tokenizer.sh)
NEOX_TOKENIZER = Path(sys.prefix) / "share" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
PYTHON = sys.executable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its CPU shared-memory op in every process that starts its distributed backend, into
# TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). The build file names this checkout's .venv path,
# so checkouts sharing the default folder rebuild it for one another (minutes a time on 2 cores); kept
# per checkout, it builds once and later processes (and their children) only load it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


STABLELM_ARCHITECTURE = dict(pos_emb="rotary", rotary_pct=0.25, norm="layernorm", use_bias_in_norms=True,
                             mlp_type="gated", activation="silu", use_bias_in_attn_linear=False,
                             use_bias_in_mlp=False, gpt_j_residual=False, no_weight_tying=True,
                             zero_optimization={"stage": 1}, lr_decay_style="cosine")


def tiny_keys(**overrides):
    """The tests' model: StableLM's architecture (named key by key) at a width a CPU runs in milliseconds."""
    keys = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=256, vocab_size=1000,
                tokenizer_type="HFTokenizer", mlp_multiple_of=32, weight_decay=0.01, eval_iters=10, log_interval=10,
                **STABLELM_ARCHITECTURE)
    keys.update(overrides)
    return keys


# Files whose tests start Slurm daemons or simulated hosts: they share addresses, namespaces and daemons, so
# under pytest-xdist they run on one worker, one after another.
CLUSTER_FILES = ("test_multinode_", "test_slurm_")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The README's `-n 2` (pytest-xdist) hands out whole files, so each file's module fixtures (a shared run
    several tests read) are built once; the cluster files go to one worker together, and first, being the
    longest chain of launches."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            file = nodeid.split("::", 1)[0]
            return "cluster" if Path(file).name.startswith(CLUSTER_FILES) else file

        def _assign_work_unit(self, node):
            if "cluster" in self.workqueue:
                self.workqueue.move_to_end("cluster", last=False)
            super()._assign_work_unit(node)

    return FileScheduling(config, log)


def shared_folder(tmp_path_factory, name, build):
    """A session fixture's folder, built once per run: under pytest-xdist the workers share it (the first to
    take the lock builds it, the others wait and read it), so each worker does not pay for its own copy."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock, contextlib.ExitStack() as release:
        fcntl.flock(lock, fcntl.LOCK_EX)
        release.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build by another worker left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture
def one_process():
    """TP=1 process groups in this process (a private one-rank gloo group)."""
    from neox_fork.parallel import groups as parallel

    parallel.initialize(1)
    yield
    parallel.destroy()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A small demo corpus (stdlib code and docs, 600-token BPE) shared by the training tests."""
    from neox_fork.data.demo import build_demo_data

    return shared_folder(tmp_path_factory, "corpus",
                         lambda out: build_demo_data(str(out), vocab_size=600, max_bytes=400_000, workers=1))


def write_train_config(folder, corpus, **overrides):
    """A YAML config for a training subprocess: the tiny architecture at test size, fp32, one step a log."""
    import yaml

    keys = tiny_keys(vocab_size=None, seq_length=64, vocab_file=str(corpus / "tokenizer.json"),
                     train_data_paths=[str(corpus / "train_text_document")],
                     valid_data_paths=[str(corpus / "valid_text_document")],
                     train_micro_batch_size_per_gpu=2, train_iters=8, log_interval=1, eval_interval=1000,
                     eval_iters=2, optimizer={"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}},
                     warmup=0.1, min_lr=3e-4, save=str(folder / "ckpt"), num_workers=0,
                     distributed_backend="gloo", seed=7, hidden_dropout=0.1)
    keys.update(overrides)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(keys))
    return path


def read_metrics(save_dir, key="lm_loss"):
    """{iteration: value} of one field of SAVE_DIR/metrics.jsonl."""
    import json

    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["iteration"]] = row[key]
    return out


def run_cli(script, *args, nproc=1, timeout=600, env=None):
    """`python SCRIPT ARGS...` in the checkout, on `nproc` local ranks joined by gloo as torchrun would start
    them: a subprocess.CompletedProcess (text output, status). Each rank is forked with its imports done
    (distributed.run_script): a fresh interpreter would spend most of a tiny run importing torch,
    megatron-core and DeepSpeed. Tests of the launchers themselves (torchrun, deepy, srun) start them for real."""
    from distributed import run_script

    return run_script(REPO / script, args, dict(os.environ if env is None else env), REPO, timeout, nproc=nproc)


def run_training(config_path, nproc=1, timeout=600, check=True):
    """train.py CONFIG (run_cli) with one OpenMP thread a rank; a failed run fails the test unless check=False."""
    run = run_cli("train.py", config_path, nproc=nproc, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and run.returncode != 0:
        raise AssertionError(f"training failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return run


def finetune_from_random_hf_model(config_path, model_class, config_class, hf_dir, imported_dir):
    """A transformers `model_class` of the training config's shape (random from seed 0, fp32) saved to `hf_dir`,
    imported with tools/ckpts/convert_hf_llama_to_neox.py into `imported_dir`, and the config made to fine-tune
    from it (`load`, `finetune: true`). Returns (the transformers model, the config as loaded before)."""
    import torch

    from neox_fork.checkpoint.hf import hf_config_dict
    from neox_fork.config.loading import load_config

    config = load_config(config_path)
    keys = hf_config_dict(config, config.padded_vocab_size(600), "fp32")
    for k in ("architectures", "model_type", "torch_dtype"):
        keys.pop(k)
    torch.manual_seed(0)
    model = model_class(config_class(**keys))
    model.save_pretrained(hf_dir)
    done = run_cli("tools/ckpts/convert_hf_llama_to_neox.py", "--hf-dir", str(hf_dir), "--output-dir",
                   str(imported_dir))
    assert done.returncode == 0, done.stderr
    Path(config_path).write_text(Path(config_path).read_text() + f"load: {imported_dir}\nfinetune: true\n")
    return model, config


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, small_corpus):
    """A real training checkpoint (fp32, one process, ZeRO-1) with steps 1 and 2; copy it before changing it."""
    def train(folder):
        run_training(write_train_config(folder, small_corpus, train_iters=2, checkpoint_factor=1))

    return shared_folder(tmp_path_factory, "trained", train) / "ckpt"


def wait_until(predicate, timeout, what):
    """Poll `predicate` until it returns something true (returned), or fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr)  # phase timings with -s
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size, name) -> a fresh tmpfs of `size` (mount's spelling: '5m') under tmp_path, unmounted after the
    test; the test is skipped, with the reason, where this process cannot mount (it needs root)."""
    import subprocess

    mounted = []

    def mount(size, name="full"):
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(target)
        return target

    try:
        yield mount
    finally:
        for target in mounted:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(scope="session")
def sft_chat_data(tmp_path_factory, small_corpus):
    """The shipped chat set (examples/chat) preprocessed with the demo tokenizer and its chat template:
    {"tokenizer": folder, "train"/"valid": (data prefix, label prefix)} for masked fine-tuning runs."""
    from neox_fork.data.chat import ChatOptions, preprocess_chat, write_chat_tokenizer

    chat = REPO / "examples" / "chat"

    def build(out):
        write_chat_tokenizer(str(small_corpus / "tokenizer.json"), str(chat / "chat_template.jinja"),
                             str(out / "tok"))
        for split in ("train", "valid"):
            preprocess_chat([str(chat / f"demo_chat_{split}.jsonl")], str(out / split), str(out / "tok"),
                            jsonl_keys=["messages"], options=ChatOptions())

    out = shared_folder(tmp_path_factory, "sft_chat", build)
    data = {"tokenizer": str(out / "tok")}
    for split in ("train", "valid"):
        data[split] = (str(out / f"{split}_messages_document"), str(out / f"{split}_messages_label_document"))
    return data


@pytest.fixture(scope="session")
def preference_pairs(tmp_path_factory, small_corpus):
    """The shipped preference pairs (examples/chat/demo_chat_pairs.jsonl) preprocessed with the demo chat
    tokenizer and `--only-last`: a folder holding pairs_{chosen,rejected}_{,label_}document."""
    from neox_fork.data.chat import ChatOptions, preprocess_chat, write_chat_tokenizer

    chat = REPO / "examples" / "chat"

    def build(folder):
        tokenizer = write_chat_tokenizer(str(small_corpus / "tokenizer.json"), str(chat / "chat_template.jinja"),
                                         str(folder / "tokenizer"))
        preprocess_chat([str(chat / "demo_chat_pairs.jsonl")], str(folder / "pairs"), tokenizer,
                        jsonl_keys=["chosen", "rejected"], options=ChatOptions(only_last=True))

    return shared_folder(tmp_path_factory, "pref_pairs", build)

