# What scripts/slurm_localhost.sh (one node on localhost) and scripts/fake_cluster.sh (one slurmd per
# namespaced host) share; sourced by both. Both keep everything under one folder, $B.

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq $((limit * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "error: $what did not come up within ${limit}s; logs in $B/log" >&2
    tail -n 20 "$B"/log/* "$B"/slurm/log/* >&2 2>/dev/null || true
    return 1
}

# slurm.conf's common keys: munge auth, everything under one state folder, no accounting, quick scheduling.
#   slurm_conf_common DIR USER [%n]   DIR: the state folder; USER: SlurmUser and SlurmdUser; %n: one spool
#                                     folder, pid and log file per node (several slurmd share DIR)
slurm_conf_common() {
    local dir=$1 user=$2 per_node=${3:-}
    cat <<EOF
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool${per_node:+/$per_node}
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd${per_node:+-$per_node}.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd${per_node:+-$per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=1
EOF
}
