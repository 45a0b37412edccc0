#!/usr/bin/env bash
# A three-node Ray cluster on this machine, to rehearse what cluster.yaml does in the cloud:
# a head with the `sweep_driver` resource (where the Tune and Train drivers run) and two worker
# raylets, each with a resource of its own so that placement can be seen, token authentication on.
#
#   scripts/local_cluster.sh up        # start head + 2 workers, wait until all 3 are alive
#   eval "$(scripts/local_cluster.sh env)"   # PATH, RAY_ADDRESS, RAY_API_SERVER_ADDRESS, the token
#   scripts/local_cluster.sh status    # `ray status` of this cluster
#   scripts/local_cluster.sh down      # stop exactly the processes `up` started, delete the state
#
# Settings (environment): DETR_RAY_CLUSTER_DIR (default /tmp/detr-ray-cluster: Ray's temp dir,
# the token, the list of started sessions; `up` takes only a new or empty directory and marks it,
# `down` deletes only a directory so marked), DETR_RAY_CLUSTER_PORT_BASE (default 24000: GCS on it,
# the dashboard on +1, the Ray client server on +2, node i's ports from +100*(i+1)),
# DETR_RAY_CLUSTER_HEAD_CPUS (1), DETR_RAY_CLUSTER_WORKER_CPUS (3), RAY_BIN (default: the repo's
# .venv/bin/ray, else `ray` on PATH). Nothing here touches other Ray instances on the machine:
# every port is explicit, the temp dir is private, and `down` does not use `ray stop` (which would
# stop every Ray process of the machine).
set -Eeuo pipefail   # -E: the ERR trap of `up` also fires inside its functions

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DETR_RAY_CLUSTER_DIR:-/tmp/detr-ray-cluster}"
BASE="${DETR_RAY_CLUSTER_PORT_BASE:-24000}"
HEAD_CPUS="${DETR_RAY_CLUSTER_HEAD_CPUS:-1}"
# Logical CPUs, not this machine's cores. 1 on the head: Train workers of >= 1 CPU cannot land
# there (the drivers hold a sliver of it). 3 per worker: two trials of two 1-CPU Train workers
# (docs/cluster.md, "Rehearsal on one machine") run at once and need both worker nodes.
WORKER_CPUS="${DETR_RAY_CLUSTER_WORKER_CPUS:-3}"
NUM_WORKERS=2
OBJECT_STORE_BYTES=$((1024 * 1024 * 1024))   # per node; Ray's default (30% of RAM each) is too greedy here

if [[ -n "${RAY_BIN:-}" ]]; then
    RAY="$RAY_BIN"
elif [[ -x "$ROOT/.venv/bin/ray" ]]; then
    RAY="$ROOT/.venv/bin/ray"
else
    RAY="$(command -v ray)" || { echo "error: no ray executable (make venv, or set RAY_BIN)" >&2; exit 2; }
fi
BIN="$(dirname "$RAY")"
PYTHON="$BIN/python"

TEMP="$DIR/ray-"               # + node index: each node has a temp dir (sessions, logs, runtime envs) of its own
TOKEN="$DIR/auth_token"
SESSIONS="$DIR/sessions"       # the process session ids of the started nodes, for `down`
MARKER="$DIR/.detr-ray-owner"  # names this script as the directory's maker (detr_ray/ownership.py)
OWNER='{"owner": "scripts/local_cluster.sh"}'
GCS_PORT="$BASE"
DASHBOARD_PORT=$((BASE + 1))
CLIENT_PORT=$((BASE + 2))

# The cluster runs with token authentication; every ray command below (and the user's, after
# `eval "$(scripts/local_cluster.sh env)"`) reads the token from this file.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$TOKEN"
# Jobs run `python ...` on the head: make that the Python this Ray belongs to.
export PATH="$BIN:$PATH"

# Ports of node i (0: head): raylet, object manager, dashboard agent (http, grpc), runtime-env
# agent, metrics, and a private range for worker processes.
node_port_args() {
    local p=$((BASE + 100 * ($1 + 1)))
    echo "--node-manager-port=$p --object-manager-port=$((p + 1))" \
         "--dashboard-agent-listen-port=$((p + 2)) --dashboard-agent-grpc-port=$((p + 3))" \
         "--runtime-env-agent-port=$((p + 4)) --metrics-export-port=$((p + 5))" \
         "--min-worker-port=$((p + 10)) --max-worker-port=$((p + 99))"
}

# Pids of the processes whose command line names one of this cluster's temp dirs (gcs, raylets,
# dashboard, monitors); their children (workers, agents) are found through the session id.
pids_of_cluster() {
    { pgrep -f -- "$TEMP[0-9]+/" || true; } | { grep -v -x -- "$$" || true; }
}

record_sessions() {
    local own
    own="$(ps -o sid= -p $$ | tr -d ' ')"
    { cat "$SESSIONS" 2>/dev/null || true
      for pid in $(pids_of_cluster); do ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ' || true; done
    } | awk -v own="$own" 'NF && $1 != own' | sort -u > "$SESSIONS.tmp"
    mv "$SESSIONS.tmp" "$SESSIONS"
}

any_alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# One temp dir per node, as on separate machines: nodes sharing one would share their log files
# (every log monitor would forward every node's logs) and their runtime-env caches (a worker
# node's agent would delete the working_dir that a job's driver on the head still runs in).
start_node() {   # start_node <index> <ray start args...>; a new session per node, so `down` finds it all
    local i="$1"; shift
    # shellcheck disable=SC2046
    setsid --wait "$RAY" start $(node_port_args "$i") --temp-dir="$TEMP$i" --disable-usage-stats \
        --object-store-memory="$OBJECT_STORE_BYTES" "$@" > "$DIR/start-node$i.log" 2>&1 \
        || { cat "$DIR/start-node$i.log" >&2; return 1; }
}

wait_for_nodes() {   # until the GCS sees all nodes alive, at most 90 s
    "$PYTHON" - "$DASHBOARD_PORT" "$((NUM_WORKERS + 1))" <<'EOF'
import sys, time
from ray.util.state import list_nodes
port, want = sys.argv[1], int(sys.argv[2])
deadline, last_error = time.time() + 90, None
while True:
    try:
        alive = [n for n in list_nodes(address=f"http://127.0.0.1:{port}") if n.state == "ALIVE"]
    except Exception as e:  # the dashboard may still be starting
        alive, last_error = [], e
    if len(alive) >= want:
        sys.exit(0)
    if time.time() > deadline:
        sys.exit(f"error: {len(alive)}/{want} nodes alive after 90 s" + (f" ({last_error})" if last_error else ""))
    time.sleep(1)
EOF
}

cmd_up() {
    # `down` deletes $DIR, so it must hold nothing this script did not create.
    if [[ -e "$DIR" && "$(cat "$MARKER" 2>/dev/null)" != "$OWNER" && -n "$(ls -A "$DIR")" ]]; then
        echo "error: $DIR holds files this script did not create; refusing to use it (nothing was changed)." \
             "Set DETR_RAY_CLUSTER_DIR to a new or empty directory" >&2
        exit 1
    fi
    if [[ -n "$(pids_of_cluster)" ]]; then
        echo "error: a cluster is already running from $DIR; run '$0 down' first" >&2
        exit 1
    fi
    for port in "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT"; do
        if port_in_use "$port"; then
            echo "error: port $port is in use; set DETR_RAY_CLUSTER_PORT_BASE to another base" >&2
            exit 1
        fi
    done
    mkdir -p "$DIR"
    echo "$OWNER" > "$MARKER"
    rm -f "$SESSIONS"
    if [[ ! -s "$TOKEN" ]]; then
        (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32), end='')" > "$TOKEN")
    fi
    trap 'echo "error: start failed; stopping what was started" >&2; record_sessions; cmd_down' ERR

    start_node 0 --head --port="$GCS_PORT" --dashboard-port="$DASHBOARD_PORT" \
        --dashboard-host=127.0.0.1 --ray-client-server-port="$CLIENT_PORT" \
        --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"sweep_driver": 100, "rehearsal_head": 1}'
    record_sessions
    local i
    for i in $(seq 1 "$NUM_WORKERS"); do
        start_node "$i" --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS" --num-gpus=0 \
            --resources="{\"rehearsal_worker_$i\": 1}"
        record_sessions
    done
    wait_for_nodes
    trap - ERR
    echo "Ray cluster up: head + $NUM_WORKERS workers (token authentication on)"
    echo "  dashboard:  http://127.0.0.1:$DASHBOARD_PORT   (the browser asks for the token: cat $TOKEN)"
    echo "  use it:     eval \"\$($0 env)\""
    echo "  stop it:    $0 down"
}

cmd_env() {
    echo "export PATH=$BIN:\$PATH"   # this Ray's `ray` and `python`
    echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$TOKEN"
}

cmd_status() {
    "$RAY" status --address="127.0.0.1:$GCS_PORT"
}

cmd_down() {
    trap - ERR
    if [[ "$(cat "$MARKER" 2>/dev/null)" != "$OWNER" ]]; then
        echo "no cluster running from $DIR (no $(basename "$MARKER") of this script there); nothing stopped or deleted"
        return 0
    fi
    record_sessions 2>/dev/null || true
    local sessions pids=()
    sessions="$(cat "$SESSIONS" 2>/dev/null || true)"
    if [[ -n "$sessions" ]]; then
        local sid
        for sid in $sessions; do
            # every process of the node's session: gcs, raylet, agents, workers, drivers of jobs
            while read -r pid; do [[ -n "$pid" ]] && pids+=("$pid"); done \
                < <(ps -e -o pid=,sid= | awk -v s="$sid" '$2 == s {print $1}')
        done
    fi
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        local waited=0
        while ((waited < 8)) && any_alive "${pids[@]}"; do sleep 1; waited=$((waited + 1)); done
        kill -KILL "${pids[@]}" 2>/dev/null || true
        echo "stopped ${#pids[@]} processes of the cluster in $DIR"
    else
        echo "no cluster running from $DIR"
    fi
    rm -rf "$DIR"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
