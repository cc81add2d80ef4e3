#!/usr/bin/env bash
# Stop the local Slurm cluster started by slurm/up.sh. Idempotent.
#
#   sudo bash slurm/down.sh [--all]
#
# Stops every slurmd, slurmctld and slurmdbd, removes the n1..nN block from
# /etc/hosts and the simulated GPU device files. MariaDB and munged keep running (they are cheap and make the next
# up.sh faster) unless --all is given. Configuration, accounting database and
# job state are kept; running jobs are cancelled first.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ALL=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --all) ALL=1; shift ;;
        -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
need_root
take_lock

if ctld_ok; then
    mapfile -t jobs < <(squeue -h -o '%i' 2>/dev/null || true)
    if ((${#jobs[@]})); then
        say "jobs: cancelling ${#jobs[@]} job(s)"
        scancel --quiet "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 40); do # let slurmd kill the steps (KillWait=5) before it stops
            [[ -z "$(squeue -h -t running,completing -o '%i' 2>/dev/null)" ]] && break
            sleep 0.25
        done
    fi
fi

running=()
for d in slurmd slurmctld slurmdbd; do
    [[ -n "$(slurm_daemon_pids "$d" /run/$d-*.pid /run/$d.pid)" ]] && running+=("$d")
done
if ((${#running[@]})); then
    say "stopping ${running[*]}"
    stop_slurm_daemons slurmd slurmctld
    stop_slurm_daemons slurmdbd
else
    say "slurm daemons: not running"
fi

# Job steps orphaned by a slurmd that died (proctrack/linuxproc cannot reap them).
stepd=$(pids_named slurmstepd | paste -sd' ' -)
if [[ -n "$stepd" ]]; then
    say "stopping leftover slurmstepd: $stepd"
    # shellcheck disable=SC2086
    stop_pids 10 $stepd
fi

if [[ -d "$FAKE_GPU_DIR" ]]; then
    rm -rf "$FAKE_GPU_DIR"
    say "simulated GPU device files removed ($FAKE_GPU_DIR)"
fi

if grep -qF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null; then
    hosts_remove_block
    say "/etc/hosts: node block removed"
fi

if ((ALL)); then
    if pid=$(daemon_pid "$MYSQL_PIDFILE" mariadbd); then
        say "stopping mariadbd"
        stop_pids 60 "$pid"
    elif mysql_ok; then
        mariadb-admin --socket="$MYSQL_SOCK" shutdown >/dev/null 2>&1 || true
        say "stopping mariadb (mariadb-admin shutdown)"
    fi
    if munge_ok; then
        mpid=$(pids_named munged | paste -sd' ' -)
        say "stopping munged"
        # shellcheck disable=SC2086
        [[ -n "$mpid" ]] && stop_pids 10 $mpid
    fi
fi
say "down"
