#!/usr/bin/env bash
# Bring up a real local Slurm cluster (slurmctld + slurmdbd/MariaDB + N slurmd) on
# this machine, for development and CI. Idempotent: a second run is a quick no-op.
#
#   sudo bash slurm/up.sh [--nodes N] [--cpus-per-node C] [--gpus G]
#       N: simulated nodes (or IRM_SLURM_NODES; default 1)
#       C: CPUs each node declares (or IRM_SLURM_CPUS_PER_NODE; default nproc/N, at least 2);
#          more than the machine has oversubscribes it, e.g. to test array parallelism caps.
#       G: simulated GPUs per node, GRES "gpu" (or IRM_SLURM_GPUS; default 0). Slurm schedules them and
#          sets CUDA_VISIBLE_DEVICES as on a GPU cluster; the device files behind them are character
#          devices with /dev/null's numbers under /run/irm-slurm-gpus (no CUDA: jobs still run on CPU).
#
# Nodes are named n1..nN, all on 127.0.0.1 (ports 17001..), partition "debug"; jobs go to the
# least-loaded node (LLN), so that array tasks spread over the nodes as on a busy real cluster.
# Optional env: IRM_SLURM_MEM_MARGIN_MB (memory kept for the OS, default ~10%),
#               IRM_SLURM_REQUEUE_EXIT (e.g. "75" -> RequeueExit=75),
#               IRM_SLURM_SLURMD_TIMEOUT (s before a silent node is DOWN, default 30),
#               IRM_SLURM_CLUSTER (cluster name, default "irm").
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }

NODES="${IRM_SLURM_NODES:-1}"
GPUS="${IRM_SLURM_GPUS:-0}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes | -n) NODES="${2:-}"; shift 2 || die "--nodes needs a value" ;;
        --nodes=*) NODES="${1#*=}"; shift ;;
        --cpus-per-node) IRM_SLURM_CPUS_PER_NODE="${2:-}"; shift 2 || die "--cpus-per-node needs a value" ;;
        --cpus-per-node=*) IRM_SLURM_CPUS_PER_NODE="${1#*=}"; shift ;;
        --gpus) GPUS="${2:-}"; shift 2 || die "--gpus needs a value" ;;
        --gpus=*) GPUS="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
{ [[ "$NODES" =~ ^[0-9]+$ ]] && ((NODES >= 1 && NODES <= 64)); } || die "--nodes must be an integer in 1..64, got '$NODES'"
{ [[ "$GPUS" =~ ^[0-9]+$ ]] && ((GPUS <= 16)); } || die "--gpus must be an integer in 0..16, got '$GPUS'"
need_root
take_lock

T0=$SECONDS

# --------------------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] || missing+=("$p")
done
mkdir -p "$LOG_DIR"
if ((${#missing[@]})); then
    say "packages: installing ${missing[*]} (log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${PACKAGES[@]}" >>"$APT_LOG" 2>&1 9>&-
    }
    if ! apt_install; then
        say "packages: install failed, running apt-get update and retrying"
        apt-get update -q >>"$APT_LOG" 2>&1 || die "apt-get update failed" "$APT_LOG"
        apt_install || die "apt-get install failed" "$APT_LOG"
    fi
else
    say "packages: installed"
fi
for b in slurmctld slurmd slurmdbd sinfo sacct sacctmgr munged mariadbd mariadb-admin; do
    command -v "$b" >/dev/null || die "'$b' not found after installing packages"
done

# --------------------------------------------------------------------------- directories
install -d -o "$SLURM_USER" -g "$SLURM_USER" -m 755 "$LOG_DIR" "$CTLD_SPOOL"
install -d -m 755 "$SLURM_ETC" "$SLURMD_SPOOL_BASE"
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/log/munge /etc/munge
install -d -o munge -g munge -m 711 /var/lib/munge
install -d -o mysql -g mysql -m 755 /run/mysqld /var/log/mysql

# --------------------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "munge: creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if munge_ok; then
    say "munge: munged running"
else
    say "munge: starting munged"
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 9>&- || die "munged failed to start" /var/log/munge/munged.log
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munge -n | unmunge does not work" /var/log/munge/munged.log
fi

# --------------------------------------------------------------------------- MariaDB
if mysql_ok; then
    say "mariadb: running"
else
    if [[ ! -d "$MYSQL_DATADIR/mysql" ]]; then
        say "mariadb: initialising $MYSQL_DATADIR"
        install -d -o mysql -g mysql -m 755 "$MYSQL_DATADIR"
        mariadb-install-db --user=mysql --datadir="$MYSQL_DATADIR" --skip-test-db >"$MYSQL_LOG.init" 2>&1 ||
            die "mariadb-install-db failed" "$MYSQL_LOG.init"
    fi
    # The data dir must belong to mysql (it is root-owned after some image builds).
    [[ "$(stat -c %U "$MYSQL_DATADIR")" == mysql ]] || chown -R mysql:mysql "$MYSQL_DATADIR"
    say "mariadb: starting mariadbd"
    # Local only: slurmdbd reaches the database through the Unix socket (StorageHost=localhost makes the
    # client library use the socket; checked with ss -xp), so TCP is off, and bound to loopback should a
    # config file turn it back on.
    setsid /usr/sbin/mariadbd --user=mysql --datadir="$MYSQL_DATADIR" --socket="$MYSQL_SOCK" \
        --bind-address=127.0.0.1 --skip-networking \
        --pid-file="$MYSQL_PIDFILE" --log-error="$MYSQL_LOG" \
        --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=1024M \
        </dev/null >/dev/null 2>&1 9>&- &
    wait_started "mariadbd (socket $MYSQL_SOCK)" mariadbd 60 "$MYSQL_LOG" mysql_ok
fi

# --------------------------------------------------------------------------- accounting DB
# The password goes into SQL string literals and slurmdbd.conf: only [A-Za-z0-9] (16-64 characters).
# A reused one (from an existing slurmdbd.conf) that does not match is replaced by a new one, which the
# ALTER USER below sets.
DB_PASS_RE='^[A-Za-z0-9]{16,64}$'
DB_PASS=""
if [[ -r "$SLURMDBD_CONF" ]]; then
    DB_PASS=$(sed -n 's/^StoragePass=//p' "$SLURMDBD_CONF" | head -n1)
fi
if [[ -n "$DB_PASS" && ! "$DB_PASS" =~ $DB_PASS_RE ]]; then
    say "mariadb: StoragePass in $SLURMDBD_CONF is not [A-Za-z0-9]{16,64}; generating a new one"
    DB_PASS=""
fi
if [[ -z "$DB_PASS" ]]; then
    DB_PASS=$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
fi
[[ "$DB_PASS" =~ $DB_PASS_RE ]] || die "could not generate a database password"
if MYSQL_PWD="$DB_PASS" mariadb --socket="$MYSQL_SOCK" -u"$DB_USER" -e "USE $DB_NAME" >/dev/null 2>&1; then
    say "mariadb: database $DB_NAME and user $DB_USER ok"
else
    say "mariadb: creating database $DB_NAME and user $DB_USER"
    mariadb --socket="$MYSQL_SOCK" -uroot >"$MYSQL_LOG.sql" 2>&1 <<SQL || die "creating the accounting database failed" "$MYSQL_LOG.sql"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
fi

# --------------------------------------------------------------------------- slurmdbd.conf
dbd_conf=$(cat <<EOF
# GENERATED by slurm/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=$SLURM_USER
DebugLevel=info
LogFile=$DBD_LOG
PidFile=$DBD_PIDFILE
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF
)
dbd_changed=0
if [[ ! -r "$SLURMDBD_CONF" ]] || [[ "$(cat "$SLURMDBD_CONF")" != "$dbd_conf" ]]; then
    # It holds the database password: written to a new file that is 0600 from its creation (umask 077),
    # then renamed over the old one, so it is never readable by others, not even for a moment.
    dbd_tmp=$(umask 077 && mktemp "$SLURMDBD_CONF.XXXXXX")
    (umask 077 && printf '%s\n' "$dbd_conf" >"$dbd_tmp")
    chown "$SLURM_USER:$SLURM_USER" "$dbd_tmp"
    chmod 600 "$dbd_tmp"
    mv -f "$dbd_tmp" "$SLURMDBD_CONF"
    dbd_changed=1
fi
chown "$SLURM_USER:$SLURM_USER" "$SLURMDBD_CONF"
chmod 600 "$SLURMDBD_CONF"

# --------------------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
NPROC=$(nproc)
MEM_TOTAL_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
if [[ -n "${IRM_SLURM_MEM_MARGIN_MB:-}" ]]; then
    [[ "$IRM_SLURM_MEM_MARGIN_MB" =~ ^[0-9]+$ ]] || die "IRM_SLURM_MEM_MARGIN_MB must be an integer"
    MARGIN=$IRM_SLURM_MEM_MARGIN_MB
else
    MARGIN=$((MEM_TOTAL_MB / 10))
    ((MARGIN < 512)) && MARGIN=512
    ((MARGIN > 4096)) && MARGIN=4096
fi
MEM_PER_NODE=$(((MEM_TOTAL_MB - MARGIN) / NODES))
((MEM_PER_NODE >= 256)) || die "not enough memory: ${MEM_TOTAL_MB} MB total for $NODES nodes"
CPN="${IRM_SLURM_CPUS_PER_NODE:-$((NPROC / NODES))}"
[[ "$CPN" =~ ^[0-9]+$ ]] || die "IRM_SLURM_CPUS_PER_NODE must be an integer, got '$CPN'"
((CPN >= 2)) || CPN=2 # so that "srun -n 2" works on every node (config_overrides)
DEF_MEM_PER_CPU=$((MEM_PER_NODE / CPN))

gres_node="" gres_types="# no GPUs (slurm/up.sh --gpus G simulates G per node)" gres=""
if ((NODES == 1)); then nodelist="n1"; else nodelist="n[1-$NODES]"; fi
if ((GPUS > 0)); then
    gres_node=" Gres=gpu:$GPUS"
    gres_types="GresTypes=gpu"$'\n'"AccountingStorageTRES=gres/gpu"
    # The gpu GRES plugin derives CUDA_VISIBLE_DEVICES from device files (a regular file is allocated but
    # sets no CUDA_VISIBLE_DEVICES: tried); several slurmd on this host share the same files.
    gres="# GENERATED by slurm/up.sh: $GPUS simulated GPUs per node"$'\n'"AutoDetect=off"$'\n'
    gres+="NodeName=$nodelist Name=gpu File=$FAKE_GPU_DIR/gpu[0-$((GPUS - 1))]"
fi
node_lines=""
for ((k = 1; k <= NODES; k++)); do
    node_lines+="NodeName=n$k NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT_BASE + k)) "
    node_lines+="CPUs=$CPN Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPN ThreadsPerCore=1 RealMemory=$MEM_PER_NODE$gres_node State=UNKNOWN"$'\n'
done
node_lines=${node_lines%$'\n'}
requeue_exit=""
SLURMD_TIMEOUT="${IRM_SLURM_SLURMD_TIMEOUT:-30}"
{ [[ "$SLURMD_TIMEOUT" =~ ^[0-9]+$ ]] && ((SLURMD_TIMEOUT >= 5)); } || die "IRM_SLURM_SLURMD_TIMEOUT must be an integer >= 5"
[[ -n "${IRM_SLURM_REQUEUE_EXIT:-}" ]] && requeue_exit="RequeueExit=$IRM_SLURM_REQUEUE_EXIT"

[[ -r "$SLURM_CONF_TEMPLATE" ]] || die "template $SLURM_CONF_TEMPLATE missing"
conf=$(<"$SLURM_CONF_TEMPLATE")
conf=${conf//@@SUMMARY@@/"$NODES node(s) x $CPN CPUs x $GPUS GPUs x $MEM_PER_NODE MB on $HOST (nproc=$NPROC, MemTotal=${MEM_TOTAL_MB}MB)"}
conf=${conf//@@CLUSTER@@/$CLUSTER_NAME}
conf=${conf//@@CTLD_HOST@@/$HOST}
conf=${conf//@@NODES@@/$node_lines}
conf=${conf//@@NODELIST@@/$nodelist}
conf=${conf//@@DEF_MEM_PER_CPU@@/$DEF_MEM_PER_CPU}
conf=${conf//@@REQUEUE_EXIT@@/$requeue_exit}
conf=${conf//@@SLURMD_TIMEOUT@@/$SLURMD_TIMEOUT}
conf=${conf//@@GRES_TYPES@@/$gres_types}

conf_changed=0
if [[ ! -r "$SLURM_CONF" ]] || [[ "$(cat "$SLURM_CONF")" != "$conf" ]]; then
    conf_changed=1
fi
current_gres=""
[[ -r "$GRES_CONF" ]] && current_gres=$(<"$GRES_CONF")
[[ "$current_gres" == "$gres" ]] || conf_changed=1
if ((conf_changed)); then
    old_nodes=$(conf_nodes | paste -sd, -)
    if ctld_ok || [[ -n "$(pids_named slurmd)$(pids_named slurmctld)" ]]; then
        say "slurm.conf: configuration changed (nodes: ${old_nodes:-none} -> $nodelist), stopping slurmctld/slurmd"
    fi
    stop_slurm_daemons slurmd slurmctld
    # slurmctld refuses to start on the state of a differently named cluster
    if [[ -r "$CTLD_SPOOL/clustername" && "$(cat "$CTLD_SPOOL/clustername")" != "$CLUSTER_NAME" ]]; then
        say "slurm.conf: cluster renamed, clearing old controller state in $CTLD_SPOOL"
        find "$CTLD_SPOOL" -mindepth 1 -delete
    fi
    printf '%s\n' "$conf" >"$SLURM_CONF"
    chmod 644 "$SLURM_CONF"
    rm -f "$GRES_CONF"
    if ((GPUS > 0)); then
        printf '%s\n' "$gres" >"$GRES_CONF"
        chmod 644 "$GRES_CONF"
    fi
    say "slurm.conf: written ($NODES node(s) $nodelist, $CPN CPUs and $MEM_PER_NODE MB each)"
else
    say "slurm.conf: up to date ($NODES node(s) $nodelist)"
fi
for ((k = 1; k <= NODES; k++)); do install -d -m 755 "$SLURMD_SPOOL_BASE/n$k"; done
# Simulated GPU device files: character devices with /dev/null's numbers (1, 3), 0666 as /dev/null is.
install -d -m 755 "$FAKE_GPU_DIR"
for ((i = 0; i < GPUS; i++)); do
    dev="$FAKE_GPU_DIR/gpu$i"
    [[ -c "$dev" ]] || { rm -f "$dev"; mknod -m 666 "$dev" c 1 3 || die "mknod $dev failed (simulated GPUs need root and mknod)"; }
done

# --------------------------------------------------------------------------- /etc/hosts
hosts_block="$HOSTS_BEGIN"$'\n'
for ((k = 1; k <= NODES; k++)); do hosts_block+="127.0.0.1 n$k"$'\n'; done
hosts_block+="$HOSTS_END"
current_block=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {p = 1} p {print} $0 == e {p = 0}' /etc/hosts 2>/dev/null || true)
if [[ "$current_block" != "$hosts_block" ]]; then
    hosts_remove_block
    [[ ! -s /etc/hosts || -z "$(tail -c1 /etc/hosts)" ]] || echo >>/etc/hosts
    printf '%s\n' "$hosts_block" >>/etc/hosts
    say "/etc/hosts: mapped n1..n$NODES to 127.0.0.1"
else
    say "/etc/hosts: n1..n$NODES already mapped"
fi

# --------------------------------------------------------------------------- slurmdbd
if ((dbd_changed)) && dbd_ok; then
    say "slurmdbd: slurmdbd.conf changed, restarting"
    stop_slurm_daemons slurmdbd
fi
if dbd_ok; then
    say "slurmdbd: running"
else
    stop_slurm_daemons slurmdbd # strays without pidfile
    say "slurmdbd: starting"
    slurmdbd >>"$DBD_LOG" 2>&1 9>&- || die "slurmdbd failed to start" "$DBD_LOG"
fi
wait_started "slurmdbd (sacctmgr list cluster)" slurmdbd 30 "$DBD_LOG" dbd_answers

# --------------------------------------------------------------------------- cluster registration
if grep -qx "$CLUSTER_NAME" <<<"$(sacctmgr -n -P list cluster format=cluster 2>/dev/null || true)"; then
    say "sacctmgr: cluster $CLUSTER_NAME registered"
else
    say "sacctmgr: adding cluster $CLUSTER_NAME"
    out=$(sacctmgr -i add cluster "$CLUSTER_NAME" 2>&1) || die "sacctmgr add cluster failed: $out" "$DBD_LOG"
fi

# --------------------------------------------------------------------------- slurmctld
if daemon_pid "$CTLD_PIDFILE" slurmctld >/dev/null && ctld_ok; then
    say "slurmctld: running"
else
    stop_slurm_daemons slurmctld
    say "slurmctld: starting"
    slurmctld >>"$CTLD_LOG" 2>&1 9>&- || die "slurmctld failed to start" "$CTLD_LOG"
    wait_started "slurmctld (scontrol ping)" slurmctld 30 "$CTLD_LOG" ctld_ok
fi

# --------------------------------------------------------------------------- slurmd(s)
started=()
for ((k = 1; k <= NODES; k++)); do
    node="n$k"
    if daemon_pid "$(slurmd_pidfile "$node")" slurmd >/dev/null; then continue; fi
    slurmd -N "$node" >>"$(slurmd_log "$node")" 2>&1 9>&- || die "slurmd -N $node failed to start" "$(slurmd_log "$node")"
    started+=("$node")
done
if ((${#started[@]})); then
    say "slurmd: started ${started[*]}"
else
    say "slurmd: $NODES running"
fi

# --------------------------------------------------------------------------- wait for idle nodes
node_states() { sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | sort -u; }
resumed=0
deadline=$((SECONDS + 60))
while :; do
    states=$(node_states)
    n_ready=$(awk '$2 ~ /^(idle|mixed|allocated|completing|planned|reserved)$/' <<<"$states" | wc -l)
    ((n_ready == NODES)) && break
    for ((k = 1; k <= NODES; k++)); do
        daemon_pid "$(slurmd_pidfile "n$k")" slurmd >/dev/null ||
            die "slurmd -N n$k exited during startup" "$(slurmd_log "n$k")"
    done
    # Nodes left DOWN/DRAINED by an earlier session (e.g. a failure test): put them back.
    if ((!resumed)) && grep -Eq ' (down|drained|draining)$' <<<"$states"; then
        bad=$(awk '$2 ~ /^(down|drained|draining)$/ {print $1}' <<<"$states" | paste -sd, -)
        if [[ -n "$bad" ]] && [[ -z "$(awk '$2 ~ /\*$/' <<<"$states")" ]]; then
            scontrol update nodename="$bad" state=resume >/dev/null 2>&1 && { say "slurmd: resumed $bad"; resumed=1; }
        fi
    fi
    if ((SECONDS > deadline)); then
        first_bad=$(awk '$2 !~ /^(idle|mixed|allocated|completing|planned|reserved)$/ {print $1; exit}' <<<"$states")
        die "nodes not ready after 60 s: $(paste -sd' ' - <<<"$states")" "$(slurmd_log "${first_bad:-n1}")"
    fi
    sleep 0.3
done
say "sinfo: $(sinfo -h -p "$PARTITION" -o '%P %a %D nodes %T %N' | paste -sd';' -)"

# --------------------------------------------------------------------------- sacct
deadline=$((SECONDS + 30))
until sacct_ok; do
    ((SECONDS < deadline)) || die "sacct does not work after 30 s" "$DBD_LOG"
    sleep 0.3
done
say "sacct: ok"
say "cluster '$CLUSTER_NAME' up: $NODES node(s), $GPUS simulated GPU(s) per node, partition $PARTITION ($((SECONDS - T0)) s)"
