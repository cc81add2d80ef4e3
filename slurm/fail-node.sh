#!/usr/bin/env bash
# Simulate the failure of one node of the local cluster (for fault-tolerance tests).
#
#   sudo bash slurm/fail-node.sh nK [--hard]
#
# Default: SIGKILL the node's slurmd only. Its running job steps keep running,
#   orphaned (proctrack/linuxproc), until the node comes back; slurmctld marks the
#   node DOWN after SlurmdTimeout (~30-45 s) and ends its jobs NODE_FAIL (batch
#   jobs are requeued, JobRequeue=1; they may restart after cred_expire=30 s).
# --hard: also SIGKILL the node's slurmstepd and job processes (a machine crash).
# Bring the node back with: sudo bash slurm/up.sh --nodes N  (restarts missing slurmd).
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODE="" HARD=0
for a in "$@"; do
    case "$a" in
        --hard) HARD=1 ;;
        -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        n[0-9]*) NODE="$a" ;;
        *) die "unknown argument: $a (see --help)" ;;
    esac
done
[[ -n "$NODE" ]] || die "usage: fail-node.sh nK [--hard]"
need_root
take_lock
grep -qx "$NODE" <<<"$(conf_nodes)" || die "$NODE is not a node of $SLURM_CONF"

victims=()
if pid=$(daemon_pid "$(slurmd_pidfile "$NODE")" slurmd); then
    victims+=("$pid")
else
    say "slurmd $NODE: not running"
fi
if ((HARD)); then
    # slurmstepd of the node: it listens on <SlurmdSpoolDir>/<node>_<job>.<step>
    while read -r spid; do victims+=("$spid"); done < <(
        ss -xlpH 2>/dev/null | grep -F "$SLURMD_SPOOL_BASE/$NODE/${NODE}_" |
            grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
    # job processes carry SLURMD_NODENAME=<node> in their environment
    for envf in /proc/[0-9]*/environ; do
        p=${envf#/proc/}
        p=${p%/environ}
        [[ "$p" == "$$" ]] && continue
        if grep -qzx "SLURMD_NODENAME=$NODE" "$envf" 2>/dev/null; then victims+=("$p"); fi
    done
fi
((${#victims[@]})) || { say "nothing to kill on $NODE"; exit 0; }
kill -KILL "${victims[@]}" 2>/dev/null || true
say "$NODE failed at $(date +%T): killed ${#victims[@]} process(es) (${victims[*]})"
