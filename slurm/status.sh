#!/usr/bin/env bash
# Show the state of the local Slurm cluster; exit 0 only if it is usable
# (controller up, every configured node responding and not down/drained,
# sacct answering).
#
#   bash slurm/status.sh [-q]      (-q: only the verdict line)
set -uo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUIET=0
[[ "${1:-}" == "-q" ]] && QUIET=1
out() { ((QUIET)) || printf '%s\n' "$*"; }

problems=()

if ! command -v sinfo >/dev/null; then
    echo "[slurm] NOT USABLE: slurm is not installed (run: sudo bash slurm/up.sh)"
    exit 1
fi

flag() { if "$@"; then echo up; else echo DOWN; fi; }
out "daemons:"
out "  munged     $(flag munge_ok)"
out "  mariadb    $(flag mysql_ok)"
if pid=$(daemon_pid "$DBD_PIDFILE" slurmdbd); then
    out "  slurmdbd   up (pid $pid)"
else
    out "  slurmdbd   DOWN"
    problems+=("slurmdbd not running")
fi
if ctld_ok; then
    out "  slurmctld  up (pid $(daemon_pid "$CTLD_PIDFILE" slurmctld 2>/dev/null || echo '?'))"
else
    out "  slurmctld  DOWN"
    problems+=("slurmctld not answering")
fi
nodes=$(conf_nodes)
[[ -n "$nodes" ]] || problems+=("no nodes in $SLURM_CONF")
for n in $nodes; do
    if pid=$(daemon_pid "$(slurmd_pidfile "$n")" slurmd); then
        out "  slurmd $n  up (pid $pid)"
    else
        out "  slurmd $n  DOWN"
        problems+=("slurmd $n not running")
    fi
done

if ctld_ok; then
    out ""
    out "sinfo:"
    ((QUIET)) || sinfo -N -o '%10N %10P %12T %5c %10m %E' 2>&1 | sed 's/^/  /'
    bad=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 !~ /^(idle|mixed|allocated|completing|planned|reserved)$/ {print $1 "=" $2}' | sort -u | paste -sd' ' -)
    [[ -z "$bad" ]] || problems+=("nodes not usable: $bad")
    out ""
    out "squeue:"
    ((QUIET)) || squeue -o '%.10i %.9P %.20j %.8u %.10T %.10M %.6D %R' 2>&1 | sed 's/^/  /'
fi

out ""
if sacct_ok; then
    out "sacct: ok"
else
    out "sacct: FAILED"
    problems+=("sacct does not work")
fi

if ((${#problems[@]})); then
    printf '[slurm] NOT USABLE: %s\n' "$(IFS='|'; echo "${problems[*]}")"
    exit 1
fi
echo "[slurm] usable: cluster $CLUSTER_NAME, nodes $(paste -sd, - <<<"$nodes")"
