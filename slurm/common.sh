# Shared body of slurm/*.sbatch (sourced, not run): hostfile and overlay from the allocation, rank
# environment, `deepy.py`, and a requeue when training stopped early (USR1 before the time limit).
# Expects CONFIGS, SAVE, PYTHON and ACCOUNT from the sbatch script and runs in the repository root.

TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}
RUN_DIR="$SAVE/slurm"
HOSTFILE="$RUN_DIR/hostfile-$SLURM_JOB_ID"
OVERLAY="$RUN_DIR/job-$SLURM_JOB_ID.yml"
ACCOUNT_JSON=null
[ -z "$ACCOUNT" ] || ACCOUNT_JSON="\"$ACCOUNT\""
mkdir -p "$RUN_DIR"

# One line per node of the allocation: the DeepSpeed hostfile deepy selects ranks from.
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$TASKS_PER_NODE/" >"$HOSTFILE"

# load == save, so a requeued (or resubmitted) job resumes from save/latest. A per-job master port lets
# two jobs share a node. This file is listed last, so it wins over the user's configs.
cat >"$OVERLAY" <<YML
# written by slurm/common.sh for job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})
{
  "save": "$SAVE",
  "load": "$SAVE",
  "hostfile": "$HOSTFILE",
  "num_nodes": $SLURM_JOB_NUM_NODES,
  "num_gpus": $TASKS_PER_NODE,
  "launcher": "slurm",
  "deepspeed_slurm": true,
  "master_port": $((20000 + SLURM_JOB_ID % 20000)),
  "account": $ACCOUNT_JSON
}
YML

# Rank environment (srun passes the whole environment on to every rank).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}  # srun >= 22.05 no longer inherits --cpus-per-task
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead peer raises within the collective timeout, not never
export NCCL_ASYNC_ERROR_HANDLING=1        # the same for torch < 2.2
export PYTHONFAULTHANDLER=1
export TOKENIZERS_PARALLELISM=false
# export NCCL_SOCKET_IFNAME=...  NCCL_IB_HCA=...  NCCL_DEBUG=WARN   # cluster-specific network settings

echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x $TASKS_PER_NODE ranks;" \
    "configs: $CONFIGS $OVERLAY"
LATEST_BEFORE=$(cat "$SAVE/latest" 2>/dev/null || echo none)
STARTED=$(date +%s)
set +e
# shellcheck disable=SC2086  # CONFIGS is a list of files
"$PYTHON" deepy.py train.py $CONFIGS "$OVERLAY"
rc=$?
# A hang (a rank's phase deadline passed: neox_fork/launch/hangs.py) is usually the node, not the code: requeue, at
# most MAX_HANG_REQUEUES times (the stacks of each hang stay in $SAVE/stacks). deepy says 75 itself when it
# supervised the ranks; after srun the ranks' stacks files tell.
# shellcheck disable=SC2086
if [ "$rc" != 0 ] && { [ "$rc" = 75 ] || "$PYTHON" -m neox_fork.launch hung "$STARTED" $CONFIGS "$OVERLAY" >&2; }; then
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_HANG_REQUEUES:-2}" ]; then
        echo "job $SLURM_JOB_ID hung: requeueing (restart ${SLURM_RESTART_COUNT:-0} of at most ${MAX_HANG_REQUEUES:-2})" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 75
    fi
    echo "job $SLURM_JOB_ID hung again after ${SLURM_RESTART_COUNT:-0} requeues (MAX_HANG_REQUEUES): not requeueing" >&2
    exit 75
fi
# Ranks save and exit 0 on USR1 (sent 120 s before the time limit, or by `scancel -s USR1`): requeue
# until save/latest reaches train_iters. A plain scancel (TERM) ends this shell too, so no requeue.
# shellcheck disable=SC2086
# A run that saved nothing new is not requeued (no endless loop on a job that cannot progress).
if [ "$rc" = 0 ] && ! "$PYTHON" -m neox_fork.launch finished $CONFIGS "$OVERLAY" >/dev/null; then
    if [ "$(cat "$SAVE/latest" 2>/dev/null || echo none)" = "$LATEST_BEFORE" ]; then
        echo "training stopped before train_iters without a new checkpoint: not requeueing" >&2
        exit 1
    fi
    echo "training stopped before train_iters: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
