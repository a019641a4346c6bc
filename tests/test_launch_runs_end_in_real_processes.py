"""Every run ends when its work ends, in real processes: `python deepy.py SCRIPT CONFIG...` is started as a fresh
interpreter in a session of its own (never forked from the tests' preloaded server, tests/distributed.py), with
data-loader workers running, and each run must exit with the expected status within END_SECONDS of its last
piece of work, leaving no process of its session behind (deepy, a rank or a worker).

Issue 35: a pipeline-parallel run trained, saved its last checkpoint and then every rank waited forever in the
interpreter's exit, multiprocessing joining the rank's loader workers, which ignored its SIGTERM (DeepSpeed's
pipeline engine still held their iterator). The runs: PP=2 with an evaluation, TP=2 masked fine-tuning (SFT),
DP=2 DPO, generate.py on the pipelined checkpoint, a PP=2 run stopped by SIGTERM sent to every process of the
job (as scancel does: the workers must let their rank save first, then end when it does), and a rank whose
deepy is killed (its parent-death SIGTERM). docs/testing.md lists what the forked harness hides.

Bounds: END_SECONDS from the run's last line of work (its final `saved checkpoint`, generate.py's line on its
samples) until every process of the session has closed the output pipe and deepy has exited: 2-7 s measured on
a loaded 2-core machine. The hang this guards against was endless; a run still going END_SECONDS after its
work (or still working START_SECONDS after it started) fails, and whatever is left of it is killed.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest
import yaml

from conftest import PYTHON, REPO, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

END_SECONDS = 30
START_SECONDS = 300  # start-up to the last line of work: DeepSpeed's set-up on a busy machine
WORKERS = dict(num_workers=1)  # a loader worker per rank that reads data


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes (not zombies) of session `sid`: deepy, the ranks (each in its own process group, in
    deepy's session) and their loader workers."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:150]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


class Run:
    """`python deepy.py ARGS...` in its own session; its output read as it comes."""

    def __init__(self, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PYTHON, "deepy.py", *map(str, args)], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:  # ends when the last process holding the pipe (a worker, say) is gone
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str) -> float:
        """When `text` first appeared in the output (waits for it; the run ends first: fails)."""
        while True:
            if any(text in line for line in self.lines):
                return time.monotonic()
            assert self.reader.is_alive(), f"'{text}' never appeared ({self.proc.poll()}):\n{self.out[-4000:]}"
            assert time.monotonic() < self.started + START_SECONDS, f"no '{text}' yet:\n{self.out[-4000:]}"
            time.sleep(0.05)

    def end(self, last_work: str, status: int = 0) -> str:
        """Assert the run ends with `status` within END_SECONDS of the line holding `last_work`, and leaves no
        process of its session; returns its output. Whatever is left is killed."""
        try:
            work_done = self.wait_for(last_work)
            self.reader.join(max(0.0, work_done + END_SECONDS - time.monotonic()))
            try:
                self.proc.wait(max(0.0, work_done + END_SECONDS - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            ended = time.monotonic()
            while session_processes(self.sid) and time.monotonic() < work_done + END_SECONDS:
                time.sleep(0.1)  # a process that has closed its output may still be on its way out
            left = [describe(p) for p in session_processes(self.sid)]
            assert not self.reader.is_alive() and self.proc.returncode is not None, (
                f"still running {END_SECONDS} s after its work ended; processes of the run:\n"
                + "\n".join(left) + f"\n{self.out[-3000:]}")
            assert self.proc.returncode == status, f"status {self.proc.returncode}:\n{self.out[-4000:]}"
            assert not left, "left running after the run's output closed:\n" + "\n".join(left)
            print(f"ended {ended - work_done:.1f} s after '{last_work}' ({ended - self.started:.0f} s in all)")
            return self.out
        finally:
            for proc in session_processes(self.sid):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            self.proc.wait(10)


def test_pp2_run_with_an_evaluation_ends_and_generate_py_on_its_checkpoint_ends(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=3, eval_interval=3, pipe_parallel_size=2,
                                num_gpus=2, **WORKERS)
    out = Run("train.py", config).end(f"saved checkpoint {tmp_path / 'ckpt' / 'global_step3'}")
    assert "step 3: validation loss" in out  # the evaluation's iterator had workers too
    assert checkpoint.read_latest(tmp_path / "ckpt") == 3

    gen = tmp_path / "generate.yml"
    samples = tmp_path / "samples.jsonl"
    gen.write_text(yaml.safe_dump(dict(load=str(tmp_path / "ckpt"), pipe_parallel_size=1, num_gpus=1,
                                       text_gen_type="unconditional", num_samples=1, maximum_tokens=4,
                                       sample_output_file=str(samples))))
    Run("generate.py", config, gen).end("samples (unconditional) from")
    assert len(samples.read_text().splitlines()) == 1


def test_tp2_masked_fine_tuning_ends(tmp_path, sft_chat_data):
    overlay = tmp_path / "test.yml"
    overlay.write_text(yaml.safe_dump({
        "vocab-file": os.path.join(sft_chat_data["tokenizer"], "tokenizer.json"),
        "train-data-paths": [sft_chat_data["train"][0]], "train-label-data-paths": [sft_chat_data["train"][1]],
        "valid-data-paths": [sft_chat_data["valid"][0]], "valid-label-data-paths": [sft_chat_data["valid"][1]],
        "load": None, "finetune": False, "save": str(tmp_path / "ckpt"), "num-layers": 2, "hidden-size": 64,
        "seq-length": 64, "max-position-embeddings": 64, "train_micro_batch_size_per_gpu": 2, "train-iters": 2,
        "eval-interval": 2, "eval-iters": 1, "log-interval": 1, "model-parallel-size": 2, "num_gpus": 2,
        "num-workers": 1}))
    out = Run("train.py", REPO / "configs" / "tiny.yml", REPO / "configs" / "tiny-sft.yml", overlay).end(
        f"saved checkpoint {tmp_path / 'ckpt' / 'global_step2'}")
    assert "world 2 = tensor 2 x data 1" in out


def test_dp2_dpo_ends(tmp_path, small_corpus, preference_pairs):
    p = str(preference_pairs / "pairs")
    config = write_train_config(
        tmp_path, small_corpus, train_impl="dpo", dataset_impl="pairwise", train_data_paths=[], valid_data_paths=[],
        pos_train_data_paths=[p + "_chosen_document"], neg_train_data_paths=[p + "_rejected_document"],
        pos_train_label_data_paths=[p + "_chosen_label_document"],
        neg_train_label_data_paths=[p + "_rejected_label_document"], hidden_dropout=0.0, seq_length=96,
        train_iters=2, num_gpus=2, **WORKERS)
    out = Run("train.py", config).end(f"saved checkpoint {tmp_path / 'ckpt' / 'global_step2'}")
    assert "world 2 = tensor 1 x data 2" in out


def test_sigterm_to_every_process_of_a_pp2_run_saves_and_ends(tmp_path, small_corpus):
    """As scancel does: every process of the job gets SIGTERM. The workers drop it (their rank reads on until
    its step ends and saves), deepy passes it on, each rank saves and ends, and the workers with it."""
    config = write_train_config(tmp_path, small_corpus, train_iters=1000, pipe_parallel_size=2, num_gpus=2, **WORKERS)
    run = Run("train.py", config)
    run.wait_for("step 2/1000")
    everyone = session_processes(run.sid)
    assert len(everyone) >= 5, [p.cmdline() for p in everyone]  # deepy, 2 ranks, a worker each
    for proc in everyone:
        proc.send_signal(signal.SIGTERM)
    out = run.end("saved checkpoint")
    assert "stopping at step" in out
    step = checkpoint.read_latest(tmp_path / "ckpt")
    assert step is not None and step >= 2 and f"step {step + 1}/1000" not in out


def test_a_rank_whose_deepy_is_killed_saves_and_ends_with_its_worker(tmp_path, small_corpus):
    """The parent-death signal (SIGTERM when deepy dies) set in each rank's preexec: forked ranks have no deepy."""
    config = write_train_config(tmp_path, small_corpus, train_iters=1000, **WORKERS)
    run = Run("train.py", config)
    run.wait_for("step 2/1000")
    run.proc.kill()
    out = run.end("saved checkpoint", status=-signal.SIGKILL)
    assert "received SIGTERM" in out and "stopping at step" in out
    assert checkpoint.read_latest(tmp_path / "ckpt") >= 2
