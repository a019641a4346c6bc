# slurm.conf's keys that scripts/slurm_localhost.sh (one node on localhost) and scripts/fake_cluster.sh (one
# slurmd per namespaced host) share: munge auth, everything under one state folder, no accounting, quick
# scheduling. Sourced by both; prints the lines.
#
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
