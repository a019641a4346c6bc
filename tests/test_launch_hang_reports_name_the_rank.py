"""Which rank a hang report names, from the stacks files the ranks' watchdogs write (launch/hangs.py): files written
here as faulthandler writes them, so each rule is checked without a run (the real-process runs are in
tests/test_train_hangs_are_found_with_evidence.py and tests/test_slurm_localhost.py)."""

import os
import time

from neox_fork.launch import hangs

WAITING = ("Timeout (0:00:08)!\nThread 0x00007f (most recent call first):\n"
           '  File "/venv/torch/distributed/distributed_c10d.py", line 2806 in all_reduce\n'
           '  File "/repo/neox_fork/training/loop.py", line 90 in _dp_means\n')
STUCK = ("Timeout (0:00:08)!\nThread 0x00007f (most recent call first):\n"
         '  File "/repo/neox_fork/data/readers.py", line 12 in read\n')


def write(folder, rank, phase, dump="", age=0.0):
    """Rank `rank`'s file as training/watchdog.py leaves it: the header of its phase (no limit once finished)."""
    path = hangs.stacks_file(folder, rank)
    seconds = 0 if phase == hangs.FINISHED else 8
    path.write_bytes(hangs.header(rank, phase, seconds, "train_timeout_seconds") + dump.encode())
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def reports(folder, n):
    return [hangs.read_stacks(folder, r) for r in range(n)]


def test_a_rank_still_alive_when_its_peers_timed_out_is_named(tmp_path):
    write(tmp_path, 0, "step 4", WAITING)
    write(tmp_path, 1, "step 4")
    assert hangs.culprits(reports(tmp_path, 2), alive=[1]) == [1]


def test_a_rank_that_timed_out_outside_a_collective_is_named_not_its_waiting_peers(tmp_path):
    write(tmp_path, 0, "step 4", WAITING, age=5)  # its peers timed out first: the order does not decide
    write(tmp_path, 1, "step 3", STUCK, age=1)
    write(tmp_path, 2, "step 4", WAITING, age=3)
    assert hangs.culprits(reports(tmp_path, 3), alive=[]) == [1]


def test_after_srun_the_rank_killed_before_its_deadline_is_named(tmp_path):
    """srun ends every rank when the first exits: the stuck one has no dump, the waiting ones do."""
    write(tmp_path, 0, "step 4", WAITING)
    write(tmp_path, 1, "step 4")
    write(tmp_path, 2, hangs.FINISHED)  # a rank whose work was over is nobody's culprit
    line = hangs.find_hang(tmp_path, since=time.time() - 60)
    assert line.startswith("hang: rank 1 stopped answering (step 4, limit 8 s (train_timeout_seconds), since ")
    assert str(tmp_path) in line and f"status {hangs.HANG_STATUS}" in line


def test_when_every_rank_waited_in_a_collective_the_first_to_time_out_is_named(tmp_path):
    write(tmp_path, 0, "step 4", WAITING, age=1)
    write(tmp_path, 1, "step 4", WAITING, age=3)
    assert hangs.culprits(reports(tmp_path, 2), alive=[]) == [1]


def test_no_timeout_since_the_start_is_no_hang(tmp_path):
    write(tmp_path, 0, "step 4", WAITING, age=600)
    write(tmp_path, 1, "step 4", age=600)
    assert hangs.find_hang(tmp_path, since=time.time() - 60) is None  # an earlier job's dump
    assert hangs.find_hang(tmp_path / "missing", since=0) is None
