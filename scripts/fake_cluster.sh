#!/usr/bin/env bash
# A fake cluster on one machine: N hosts node1..nodeN, each a Linux network namespace with its own address,
# hostname and sshd, joined by a bridge that lives in a namespace of its own. The hosts share this machine's
# file system, which is how a cluster with a shared file system looks. Used by tests/test_multinode_*.py
# and for trying hostfile, MPI and multi-node Slurm launches on a laptop. Runs as root (CI does).
#
#   scripts/fake_cluster.sh install            apt-get what it uses (openssh-server, pdsh, openmpi-bin, Slurm)
#   scripts/fake_cluster.sh start DIR [N]      N hosts (default 2) with sshd; everything else lives in DIR
#   scripts/fake_cluster.sh slurm DIR          munged + slurmctld on node1 + one slurmd per host
#   scripts/fake_cluster.sh exec DIR HOST CMD  run CMD as if logged in on HOST (its network, its hostname,
#                                              the cluster's ssh keys on PATH); Slurm clients work from there
#   scripts/fake_cluster.sh stop DIR           take everything down; safe after a failed or partial start
#
# Containment: the hosts' addresses come from one /24 (FAKE_CLUSTER_SUBNET, default 10.213.77.0/24) that is
# checked to be unused on this machine; no address in it exists outside the namespaces and no namespace has a
# route out, so no packet of the cluster can reach another address. Inside a fresh namespace every port is
# free, so sshd (22), slurmctld (6817), slurmd (6818) keep their standard ports and cannot collide with
# anything outside, e.g. scripts/slurm_localhost.sh. /etc/hosts gets one marked block, removed by stop.
# Root's ~/.ssh is not touched: `exec` puts DIR/bin/ssh (ssh -F DIR/ssh/config) first on PATH.
set -euo pipefail

# shellcheck source=scripts/local_slurm.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_slurm.sh"

PACKAGES="openssh-server openssh-client pdsh openmpi-bin iproute2 util-linux slurmctld slurmd slurm-client munge"
PREFIX=neoxfc  # namespace names: neoxfc-node1 ..., neoxfc-switch
SUBNET=${FAKE_CLUSTER_SUBNET:-10.213.77.0/24}
NET=${SUBNET%.0/24}

die() { echo "error: $*" >&2; exit 2; }

install() {
    local missing="" tool
    for tool in sshd:openssh-server ssh:openssh-client pdsh:pdsh mpirun:openmpi-bin ompi_info:openmpi-bin \
        ip:iproute2 unshare:util-linux nsenter:util-linux slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client \
        munged:munge; do
        [ -x "/usr/sbin/${tool%%:*}" ] || command -v "${tool%%:*}" >/dev/null || missing="$missing ${tool#*:}"
    done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || die "missing$missing; installing needs root: apt-get install $PACKAGES"
    # Installing openssh-server would start the machine's own sshd on port 22 unless a policy forbids it.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null || {
        [ -z "$made_policy" ] || rm -f "$policy"; die "apt-get install $PACKAGES failed"; }
    [ -z "$made_policy" ] || rm -f "$policy"
}

load() {  # the cluster recorded in DIR by start
    [ -f "$B/cluster.env" ] || return 1
    # shellcheck disable=SC1091
    source "$B/cluster.env"
}

ns() { echo "$PREFIX-$1"; }

on() {  # on HOST CMD...: CMD in HOST's network namespace, under HOST's hostname, with the cluster's ssh
    local host=$1
    shift
    # nsenter, not `ip netns exec`: that remounts /sys, which hides /sys/fs/cgroup from slurmd
    nsenter --net="/run/netns/$(ns "$host")" unshare --uts -- env PATH="$B/bin:$PATH" FAKE_CLUSTER_HOST="$host" \
        sh -c 'hostname "$FAKE_CLUSTER_HOST" && exec "$@"' sh "$@"
}

check_free() {  # refuse a subnet, host name or namespace that is already in use on this machine
    [[ "$SUBNET" =~ ^(10|172\.(1[6-9]|2[0-9]|3[01])|192\.168)\.[0-9]+\.[0-9]+\.0/24$ ]] \
        || die "FAKE_CLUSTER_SUBNET '$SUBNET' must be a private /24 like 10.213.77.0/24"
    local used
    used=$(python3 - "$SUBNET" <<'PY'
import ipaddress, re, subprocess, sys
mine = ipaddress.ip_network(sys.argv[1])
text = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
text += subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
# ... and in every named network namespace already on the machine (containers, other test setups)
text += subprocess.run(["ip", "-all", "netns", "exec", "ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
for net in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", text):
    try:
        if ipaddress.ip_network(net, strict=False).overlaps(mine) and not net.startswith("0."):
            print(net)
    except ValueError:
        pass
PY
)
    [ -z "$used" ] || die "subnet $SUBNET overlaps ${used//$'\n'/, } on this machine; set FAKE_CLUSTER_SUBNET"
    ! grep -q "^[[:space:]]*${NET//./\\.}\." /etc/hosts || die "/etc/hosts already names addresses in $SUBNET"
    local i
    for i in $(seq "$N"); do
        ! getent hosts "node$i" >/dev/null || die "host name node$i already resolves ($(getent hosts "node$i"))"
    done
    ! ip netns list | grep -q "^$PREFIX-" \
        || die "a fake cluster is already running (namespaces: $(ip netns list | grep "^$PREFIX-" | cut -d' ' -f1 | tr '\n' ' ')); stop it first"
}

start() {
    install
    [ ! -e "$B/cluster.env" ] || die "$B already holds a cluster; stop it first"
    [[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 32 ] || die "number of hosts must be 1-32, got '$N'"
    check_free
    mkdir -p "$B"/{bin,ssh,log}
    printf 'NODES=%s\nSUBNET=%s\nNET=%s\n' "$N" "$SUBNET" "$NET" >"$B/cluster.env"

    # The network: a bridge in its own namespace, one veth pair per host (eth0 inside the host).
    ip netns add "$(ns switch)"
    ip -n "$(ns switch)" link add br0 type bridge
    ip -n "$(ns switch)" link set br0 up
    local i host addr
    for i in $(seq "$N"); do
        host=node$i addr=$NET.$i
        ip netns add "$(ns "$host")"
        ip link add "fc$$p$i" type veth peer name "fc$$h$i"
        ip link set "fc$$p$i" netns "$(ns switch)"
        ip link set "fc$$h$i" netns "$(ns "$host")"
        ip -n "$(ns switch)" link set "fc$$p$i" name "port$i" master br0 up
        ip -n "$(ns "$host")" link set "fc$$h$i" name eth0
        ip -n "$(ns "$host")" addr add "$addr/24" dev eth0
        ip -n "$(ns "$host")" link set eth0 up
        ip -n "$(ns "$host")" link set lo up
    done

    # Name resolution for every host (and for this machine's tools): one marked block.
    {
        echo "# >>> neox fake cluster $B"
        for i in $(seq "$N"); do echo "$NET.$i node$i"; done
        echo "# <<< neox fake cluster $B"
    } >>/etc/hosts

    # ssh: one client key for root, one host key per host, known_hosts pinned to those keys.
    ssh-keygen -q -t ed25519 -N "" -C "neox-fake-cluster" -f "$B/ssh/id_ed25519"
    cp "$B/ssh/id_ed25519.pub" "$B/ssh/authorized_keys"
    : >"$B/ssh/known_hosts"
    cat >"$B/ssh/config" <<EOF
Host *
    IdentityFile $B/ssh/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $B/ssh/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$B/ssh/config" >"$B/bin/ssh"
    chmod 755 "$B/bin/ssh"
    chmod 700 "$B/ssh"
    if [ ! -d /run/sshd ]; then mkdir -p /run/sshd && chmod 755 /run/sshd && touch "$B/made-run-sshd"; fi

    for i in $(seq "$N"); do
        host=node$i addr=$NET.$i
        mkdir -p "$B/$host"
        ssh-keygen -q -t ed25519 -N "" -C "$host" -f "$B/$host/ssh_host_ed25519_key"
        echo "$host,$addr $(cut -d' ' -f1,2 "$B/$host/ssh_host_ed25519_key.pub")" >>"$B/ssh/known_hosts"
        cat >"$B/$host/sshd_config" <<EOF
ListenAddress $addr
Port 22
HostKey $B/$host/ssh_host_ed25519_key
PidFile $B/$host/sshd.pid
AuthorizedKeysFile $B/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
MaxStartups 64
MaxSessions 64
LogLevel ERROR
EOF
        on "$host" /usr/sbin/sshd -D -e -f "$B/$host/sshd_config" >>"$B/log/sshd-$host.log" 2>&1 &
    done
    for i in $(seq "$N"); do
        wait_for 20 "sshd on node$i" on node1 ssh "node$i" true
    done
    echo "fake cluster: $N host(s) node1..node$N on $SUBNET; run commands with: $0 exec $B node1 CMD"
}

slurm() {
    load || die "no fake cluster in $B; run: $0 start $B"
    local S=$B/slurm i cpus
    cpus=${SLURM_CPUS:-$(nproc)}
    mkdir -p "$S"/{munge,etc,state,log} "$S/spool"
    chmod 755 "$S/munge"  # munged refuses a socket folder others cannot enter
    [ -f "$S/munge/munge.key" ] || mungekey -c -f -k "$S/munge/munge.key"
    chmod 600 "$S/munge/munge.key"
    # One munged for all hosts: they share the file system, so its socket is everyone's.
    on node1 munged -F --force --key-file="$S/munge/munge.key" --socket="$S/munge/munge.socket" \
        --pid-file="$S/munge/munged.pid" --log-file="$S/log/munged.log" --seed-file="$S/munge/seed" \
        >>"$S/log/munged.out" 2>&1 &
    wait_for 10 munged test -S "$S/munge/munge.socket"
    {
        cat <<EOF
ClusterName=fakecluster
SlurmctldHost=node1($NET.1)
SlurmctldPort=6817
SlurmdPort=6818
EOF
        slurm_conf_common "$S" root %n
        for i in $(seq "$NODES"); do
            echo "NodeName=node$i NodeAddr=$NET.$i CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$S/etc/slurm.conf"
    export SLURM_CONF=$S/etc/slurm.conf
    on node1 slurmctld -D -i -f "$SLURM_CONF" >>"$S/log/slurmctld.out" 2>&1 &
    for i in $(seq "$NODES"); do
        mkdir -p "$S/spool/node$i"
        on "node$i" slurmd -D -N "node$i" -f "$SLURM_CONF" >>"$S/log/slurmd-node$i.out" 2>&1 &
    done
    local want
    want=$(printf 'idle%.0s\n' $(seq "$NODES"))
    wait_for 30 "the Slurm nodes" bash -c "[ \"\$('$0' exec '$B' node1 sinfo -h -N -o %T)\" = '$want' ]"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    # Everything is found from what exists (namespaces, the marked /etc/hosts block), not only from DIR,
    # so a start that died half-way is still cleaned up.
    if [ -f "$B/slurm/etc/slurm.conf" ] && ip netns list | grep -q "^$(ns node1)\b"; then
        export SLURM_CONF=$B/slurm/etc/slurm.conf
        timeout 10 "$0" exec "$B" node1 scancel --full --quiet --signal=KILL --user=root >/dev/null 2>&1 || true
        timeout 10 "$0" exec "$B" node1 scontrol shutdown >/dev/null 2>&1 || true
    fi
    local name pids
    for name in $(ip netns list | cut -d' ' -f1 | grep "^$PREFIX-" || true); do
        # Every process in one of these namespaces was started by this cluster: TERM, then KILL.
        pids=$(ip netns pids "$name" 2>/dev/null || true)
        [ -z "$pids" ] || kill $pids 2>/dev/null || true
        for _ in $(seq 50); do
            [ -n "$(ip netns pids "$name" 2>/dev/null)" ] || break
            sleep 0.1
        done
        pids=$(ip netns pids "$name" 2>/dev/null || true)
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    done
    for name in $(ip netns list | cut -d' ' -f1 | grep "^$PREFIX-" || true); do
        for _ in $(seq 50); do
            [ -n "$(ip netns pids "$name" 2>/dev/null)" ] || break
            sleep 0.1
        done
        ip netns delete "$name" || true
    done
    if grep -q "^# >>> neox fake cluster " /etc/hosts; then
        # rewritten in place (the file may be a bind mount that cannot be renamed over), never empty on the way:
        # other processes resolve this machine's own name through it at any moment (gloo does at every group it
        # makes), and `>` would truncate it first. The kept lines are written over the start, then the tail cut.
        local kept
        kept=$(sed '/^# >>> neox fake cluster /,/^# <<< neox fake cluster /d' /etc/hosts)
        printf '%s\n' "$kept" | dd of=/etc/hosts conv=notrunc status=none
        truncate -s "$(printf '%s\n' "$kept" | wc -c)" /etc/hosts
    fi
    if [ -f "$B/made-run-sshd" ]; then rmdir /run/sshd 2>/dev/null || true; rm -f "$B/made-run-sshd"; fi
    rm -f "$B/cluster.env"
}

case "${1:-}" in
    install) install ;;
    start) B=$(realpath -m "${2:?usage: $0 start DIR [N]}"); N=${3:-2}; start ;;
    slurm) B=$(realpath -m "${2:?usage: $0 slurm DIR}"); slurm ;;
    exec)
        B=$(realpath -m "${2:?usage: $0 exec DIR HOST CMD...}")
        host=${3:?usage: $0 exec DIR HOST CMD...}
        shift 3
        load || die "no fake cluster in $B; run: $0 start $B"
        ip netns list | grep -q "^$(ns "$host")\b" || die "no host '$host' in the fake cluster (node1..node$NODES)"
        if [ -f "$B/slurm/etc/slurm.conf" ]; then export SLURM_CONF=$B/slurm/etc/slurm.conf; fi  # its own Slurm
        on "$host" "$@"
        ;;
    stop) B=$(realpath -m "${2:?usage: $0 stop DIR}"); stop ;;
    *) echo "usage: $0 install | start DIR [N] | slurm DIR | exec DIR HOST CMD... | stop DIR" >&2; exit 2 ;;
esac
