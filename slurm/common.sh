# shellcheck shell=bash disable=SC2034
# Shared helpers for slurm/up.sh, slurm/down.sh and slurm/status.sh.
# Sourced, never executed. All paths are the Debian 12 standard locations.

SLURM_DIR_SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CLUSTER_NAME="${IRM_SLURM_CLUSTER:-irm}"
PARTITION="debug"
SLURM_USER="slurm"

SLURM_ETC="/etc/slurm"
SLURM_CONF="$SLURM_ETC/slurm.conf"
SLURMDBD_CONF="$SLURM_ETC/slurmdbd.conf"
SLURM_CONF_TEMPLATE="$SLURM_DIR_SELF/slurm.conf.in"
GRES_CONF="$SLURM_ETC/gres.conf"
FAKE_GPU_DIR="/run/irm-slurm-gpus"  # simulated GPU device files (slurm/up.sh --gpus G)

LOG_DIR="/var/log/slurm"
CTLD_SPOOL="/var/spool/slurmctld"
SLURMD_SPOOL_BASE="/var/spool/slurmd"
CTLD_PIDFILE="/run/slurmctld.pid"
DBD_PIDFILE="/run/slurmdbd.pid"
CTLD_LOG="$LOG_DIR/slurmctld.log"
DBD_LOG="$LOG_DIR/slurmdbd.log"
APT_LOG="$LOG_DIR/irm-apt.log"

SLURMD_PORT_BASE=17000          # node nK listens on 17000+K
DBD_PORT=6819

MYSQL_SOCK="/run/mysqld/mysqld.sock"
MYSQL_PIDFILE="/run/mysqld/mysqld.pid"
MYSQL_DATADIR="/var/lib/mysql"
MYSQL_LOG="/var/log/mysql/irm-mariadb.log"
DB_NAME="slurm_acct_db"
DB_USER="slurm"

HOSTS_BEGIN="# BEGIN irm-slurm nodes (managed by slurm/up.sh, removed by slurm/down.sh)"
HOSTS_END="# END irm-slurm nodes"

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { printf '[slurm] %s\n' "$*"; }

# die MESSAGE [LOGFILE]: print the log tail (if any), then one error line; exit 1.
die() {
    local msg="$1" log="${2:-}"
    if [[ -n "$log" && -r "$log" ]]; then
        printf -- '--- last lines of %s ---\n' "$log" >&2
        tail -n 25 "$log" >&2 || true
        printf -- '---\n' >&2
    fi
    printf '[slurm] ERROR: %s\n' "$msg" >&2
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo bash $0)"
}

# Serialise up.sh / down.sh / fail-node.sh (e.g. parallel CI steps). Every daemon
# started while holding it must get "9>&-", or it would keep the lock forever.
take_lock() {
    exec 9>/run/irm-slurm.lock
    flock -w 300 9 || die "another slurm/*.sh is still running (lock /run/irm-slurm.lock)"
}

# true if PID exists and is not a zombie (killed daemons may linger as zombies
# until their parent, often PID 1 of a container, reaps them).
pid_running() {
    local st
    [[ -r "/proc/$1/stat" ]] || return 1
    st=$(<"/proc/$1/stat") 2>/dev/null || return 1
    st=${st##*) }
    [[ "${st%% *}" != Z ]]
}

# pid of a daemon from its pidfile, only if running and its comm matches.
daemon_pid() {  # PIDFILE COMM
    local pidfile="$1" comm="$2" pid
    [[ -r "$pidfile" ]] || return 1
    read -r pid <"$pidfile" 2>/dev/null || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    pid_running "$pid" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    echo "$pid"
}

# Stop pids: SIGTERM all at once, wait up to WAIT_S s (default 30) for all, then SIGKILL.
stop_pids() {  # WAIT_S PID...
    local wait_s="$1" i pid alive
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < wait_s * 20; i++)); do
        alive=0
        for pid in "$@"; do pid_running "$pid" && alive=1 && break; done
        ((alive)) || return 0
        sleep 0.05
    done
    kill -KILL "$@" 2>/dev/null || true
    sleep 0.2
}

# Node names in the current slurm.conf (expanded), one per line.
conf_nodes() {
    [[ -r "$SLURM_CONF" ]] || return 0
    sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$SLURM_CONF"
}

slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }
slurmd_log() { echo "$LOG_DIR/slurmd-$1.log"; }

munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mysql_ok() { command -v mariadb-admin >/dev/null && mariadb-admin --connect-timeout=3 --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; }
ctld_ok() { command -v scontrol >/dev/null && [[ "$(timeout 5 scontrol ping 2>/dev/null || true)" == *"is UP"* ]]; }
dbd_answers() { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
sacct_ok() { command -v sacct >/dev/null && timeout 15 sacct -n -X -S now-1minutes >/dev/null 2>&1; }
dbd_ok() { daemon_pid "$DBD_PIDFILE" slurmdbd >/dev/null; }

# wait_started NAME COMM TIMEOUT_S LOG CHECK...: poll CHECK until it succeeds; die
# with the log tail if it does not within TIMEOUT_S or if no COMM process is left.
wait_started() {
    local name="$1" comm="$2" t="$3" log="$4"
    shift 4
    local deadline=$((SECONDS + t)) grace=$((SECONDS + 2))
    while :; do
        "$@" && return 0
        if ((SECONDS >= grace)) && [[ -z "$(pids_named "$comm")" ]]; then
            die "$name exited during startup" "$log"
        fi
        ((SECONDS < deadline)) || die "$name not answering after ${t} s" "$log"
        sleep 0.2
    done
}

# all pids of processes whose comm is exactly NAME (our daemons only).
pids_named() {
    local pid
    for pid in $(pgrep -x "$1" 2>/dev/null); do pid_running "$pid" && echo "$pid"; done
    return 0
}

# pids of one kind of slurm daemon: from its pidfiles, plus strays without one
# (stale pidfile, started by hand or by an init script). Exact comm match only.
slurm_daemon_pids() {  # COMM PIDFILE...
    local comm="$1" pf pid
    shift
    {
        for pf in "$@"; do
            [[ -e "$pf" ]] || continue
            daemon_pid "$pf" "$comm" || true
        done
        pids_named "$comm"
    } | sort -un
}

# Stop daemons by comm name (slurmd, slurmctld, slurmdbd), all in parallel.
stop_slurm_daemons() {  # COMM...
    local comm pids=()
    for comm in "$@"; do
        case "$comm" in
            slurmd) mapfile -t -O "${#pids[@]}" pids < <(slurm_daemon_pids slurmd /run/slurmd-*.pid /run/slurmd.pid) ;;
            slurmctld) mapfile -t -O "${#pids[@]}" pids < <(slurm_daemon_pids slurmctld "$CTLD_PIDFILE") ;;
            slurmdbd) mapfile -t -O "${#pids[@]}" pids < <(slurm_daemon_pids slurmdbd "$DBD_PIDFILE") ;;
        esac
    done
    stop_pids 30 "${pids[@]}"
    for comm in "$@"; do
        case "$comm" in
            slurmd) rm -f /run/slurmd-*.pid /run/slurmd.pid ;;
            slurmctld) rm -f "$CTLD_PIDFILE" ;;
            slurmdbd) rm -f "$DBD_PIDFILE" ;;
        esac
    done
}

# Rewrite /etc/hosts in place (it may be a bind mount, so never mv over it).
hosts_remove_block() {
    grep -qF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null || return 0
    local tmp
    tmp=$(mktemp)
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '
        $0 == b {skip = 1; next}
        $0 == e {skip = 0; next}
        !skip {print}' /etc/hosts >"$tmp"
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}
