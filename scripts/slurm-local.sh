#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# A single-node Slurm cluster on this machine (localhost), for the tests and for
# trying the slurm launcher without a real cluster.
#
#   scripts/slurm-local.sh start [DIR]    install slurm-wlm + munge if missing (apt-get, root),
#                                         start munged, slurmctld and slurmd; prints the
#                                         `export SLURM_CONF=...` line to use the cluster
#   scripts/slurm-local.sh stop [DIR]     cancel its jobs, stop the three daemons
#   scripts/slurm-local.sh status [DIR]   is it up? (sinfo + squeue)
#   scripts/slurm-local.sh install        only install slurm-wlm + munge when missing (.ci/run)
#
# DIR (default $ADAMWPRUNE_SLURM_DIR, else /tmp/adamwprune-slurm) holds everything:
# slurm.conf, the munge key and socket, the controller's state, logs and pid files.
# The ports are picked free at start, so several clusters (one per DIR) can run at
# once. Only the processes whose pids this script wrote into DIR are ever stopped.
set -euo pipefail

cmd=${1:-}
dir=${2:-${ADAMWPRUNE_SLURM_DIR:-/tmp/adamwprune-slurm}}
conf=$dir/slurm.conf

say() { echo "slurm-local: $*" >&2; }
die() { say "$*"; exit 1; }

have_slurm() {
    local b
    for b in slurmctld slurmd munged sbatch squeue scontrol srun scancel; do
        command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_slurm() {
    have_slurm && return 0
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed; as root: apt-get install slurm-wlm munge"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get here"
    say "installing slurm-wlm and munge with apt-get (once)"
    local log=/tmp/slurm-local-apt.log
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
        apt-get update -q >>"$log" 2>&1 || true
        apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$log" 2>&1 ||
            die "apt-get install slurm-wlm munge failed; see $log"
    fi
    have_slurm || die "slurm-wlm installed but its programs are not on PATH"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local cpus mem ctld_port node_port
    cpus=${ADAMWPRUNE_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
    mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    ctld_port=$(free_port)
    node_port=$(free_port)
    while [ "$node_port" = "$ctld_port" ]; do node_port=$(free_port); done
    cat >"$conf" <<EOF
# Written by scripts/slurm-local.sh: a single-node cluster on localhost.
ClusterName=adamwprune-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# Finished jobs stay visible to squeue/scontrol for 10 minutes.
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_slurm
    export PATH=$PATH:/usr/sbin:/sbin
    if pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid" && pid_alive "$dir/munge/munged.pid"; then
        say "already running in $dir"
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    stop_daemons
    rm -rf "$dir/state" "$dir/spool"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    # munged refuses a socket directory that others cannot traverse
    chmod 755 "$dir" "$dir/munge"
    if [ ! -s "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    write_conf
    munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" ||
        die "munged did not start; see $dir/log/munged.log"
    export SLURM_CONF=$conf
    slurmctld -f "$conf" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -N localhost -f "$conf" || die "slurmd did not start; see $dir/log/slurmd.log"
    local i
    for i in $(seq 1 100); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            say "cluster up in $dir (sinfo: idle)"
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.2
    done
    die "the node did not become idle in 20 s; logs in $dir/log"
}

stop_daemons() {
    # SIGTERM to the three at once (each takes 1-2 s to exit), SIGKILL after 10 s
    local file pid pids="" i
    for file in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -s "$file" ] || continue
        pid=$(cat "$file")
        kill "$pid" 2>/dev/null && pids="$pids $pid"
        rm -f "$file"
    done
    for pid in $pids; do
        for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    done
}

stop() {
    export PATH=$PATH:/usr/sbin:/sbin
    if [ -f "$conf" ] && pid_alive "$dir/slurmctld.pid"; then
        export SLURM_CONF=$conf
        local jobs i
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 1 100); do
                [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    stop_daemons
    say "stopped ($dir)"
}

status() {
    export PATH=$PATH:/usr/sbin:/sbin
    pid_alive "$dir/slurmctld.pid" || { say "not running ($dir)"; return 1; }
    export SLURM_CONF=$conf
    sinfo
    squeue
}

case "$cmd" in
    install) install_slurm ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [DIR] | install" >&2; exit 2 ;;
esac
