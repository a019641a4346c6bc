#!/usr/bin/env bash
# A real one-node Slurm (slurmctld + slurmd + munged) on localhost, everything under one scratch folder.
# Used by tests/test_slurm_*.py and for trying the sbatch scripts on a laptop. Runs as root (CI does).
#
#   scripts/slurm_localhost.sh install        apt-get the Debian packages if slurmctld is missing
#   scripts/slurm_localhost.sh start DIR      start the daemons; prints `export SLURM_CONF=DIR/etc/slurm.conf`
#   scripts/slurm_localhost.sh stop DIR       scontrol shutdown, then stop munged
#
# Ports: SLURMCTLD_PORT / SLURMD_PORT from the environment, else two free ones. CPUs: SLURM_CPUS or nproc.
set -euo pipefail

# shellcheck source=scripts/local_slurm.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_slurm.sh"

PACKAGES="slurmctld slurmd slurm-client munge"

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "error: Slurm is not installed and installing it needs root: apt-get install $PACKAGES" >&2
        exit 2
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    install
    mkdir -p "$B"/{munge,etc,state,spool,log}
    chmod 755 "$B/munge"  # munged refuses a socket folder others cannot enter
    local ctld_port=${SLURMCTLD_PORT:-$(free_port)} d_port=${SLURMD_PORT:-$(free_port)}
    local cpus=${SLURM_CPUS:-$(nproc)} user
    user=$(id -un)

    [ -f "$B/munge/munge.key" ] || mungekey -c -f -k "$B/munge/munge.key"
    chmod 600 "$B/munge/munge.key"
    munged -F --force --key-file="$B/munge/munge.key" --socket="$B/munge/munge.socket" \
        --pid-file="$B/munge/munged.pid" --log-file="$B/log/munged.log" --seed-file="$B/munge/seed" \
        >>"$B/log/munged.log" 2>&1 &
    echo $! >"$B/munge/munged.bgpid"
    wait_for 10 munged test -S "$B/munge/munge.socket"

    {
        cat <<EOF
ClusterName=localhost
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
EOF
        slurm_conf_common "$B" "$user"
        echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$B/etc/slurm.conf"
    export SLURM_CONF="$B/etc/slurm.conf"
    slurmctld -D -i -f "$SLURM_CONF" >>"$B/log/slurmctld.out" 2>&1 &
    echo $! >"$B/slurmctld.bgpid"
    slurmd -D -N localhost -f "$SLURM_CONF" >>"$B/log/slurmd.out" 2>&1 &
    echo $! >"$B/slurmd.bgpid"
    wait_for 30 "the Slurm node" bash -c '[ "$(sinfo -h -o %T)" = idle ]'
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    export SLURM_CONF="$B/etc/slurm.conf"
    if [ -f "$SLURM_CONF" ]; then
        scancel --full --quiet --signal=KILL --user="$(id -un)" 2>/dev/null || true
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    # Whatever did not go with the shutdown, by the pids this script started (never by name).
    for f in slurmctld.bgpid slurmd.bgpid munge/munged.bgpid; do
        [ -f "$B/$f" ] || continue
        local pid
        pid=$(cat "$B/$f")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill "$pid" 2>/dev/null || true
        rm -f "$B/$f"
    done
}

case "${1:-}" in
    install) install ;;
    start) B=$(realpath -m "${2:?usage: $0 start DIR}"); start ;;
    stop) B=$(realpath -m "${2:?usage: $0 stop DIR}"); stop ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
