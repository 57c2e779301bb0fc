#!/usr/bin/env bash
# A local Ray head and an MLflow tracking server, both on 127.0.0.1: a one-machine "cluster" for sweeps.
#
#   cluster/local.sh start  [--dir DIR] [--num-cpus N] [--num-gpus N] [--ray-port P] [--dashboard-port P]
#                           [--mlflow-port P]
#   cluster/local.sh env    [--dir DIR]     print the environment to export again
#   cluster/local.sh status [--dir DIR]     is it running?
#   cluster/local.sh stop   [--dir DIR]     stop both (only the processes this script started)
#
# DIR (default $CAPENEXT_LOCAL_DIR, else ~/.capenext/local: outside the code, so that `ray job submit
# --working-dir .` never uploads it) holds the state: the MLflow store (mlflow.db) and its artifacts
# (mlartifacts/), the Ray auth token, logs, pid files and env.sh. Ray runs `ray start --head --block` in its
# own process group with its own --temp-dir (so a `ray.init()` elsewhere on this machine never joins it by
# accident) and token authentication (Ray >= 2.52); `stop` ends that process and its group, never other Ray
# instances (`ray stop` would end every Ray process of this user). The MLflow server owns the SQLite store:
# every trial of a sweep writes through it, never to the file. Ports default to Ray's and MLflow's usual
# ones (6379, 8265, 5000) when free, else to free ones. PYTHON (default: python3 on PATH) must have ray and
# mlflow installed, e.g. PYTHON=.venv/bin/python cluster/local.sh start.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

cmd="${1:-}"
case "$cmd" in
  start|env|status|stop) shift ;;
  -h|--help|help) usage; exit 0 ;;
  *) die "unknown command '$cmd'; commands: start, env, status, stop" ;;
esac
DIR="${CAPENEXT_LOCAL_DIR:-$HOME/.capenext/local}"
NUM_CPUS="" NUM_GPUS="" RAY_PORT="" DASH_PORT="" MLFLOW_PORT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --ray-port) RAY_PORT="$2"; shift 2 ;;
    --dashboard-port) DASH_PORT="$2"; shift 2 ;;
    --mlflow-port) MLFLOW_PORT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' for '$cmd'; options: --dir --num-cpus --num-gpus --ray-port --dashboard-port --mlflow-port" ;;
  esac
done

PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$cmd" == start ]]; then mkdir -p "$DIR"; fi
[[ -d "$DIR" ]] || die "nothing started in $DIR (no such directory); start with: cluster/local.sh start --dir $DIR"
DIR="$(cd "$DIR" && pwd)"
STATE="$DIR/state"
TOKEN="$DIR/ray_auth_token"

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
pid_of() { [[ -f "$STATE/$1.pid" ]] && cat "$STATE/$1.pid" || true; }

# one free port per argument: the preferred one when nobody listens there, else one the kernel picks; all
# are bound at once before any is released, so no two are the same
ports() {
  "$PYTHON" - "$@" <<'EOF'
import socket, sys
held = []
for want in map(int, sys.argv[1:]):
    for candidate in ([want] if want else []) + [0]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", candidate))
        except OSError:
            s.close()
            continue
        held.append(s)
        break
print(" ".join(str(s.getsockname()[1]) for s in held))
for s in held:
    s.close()
EOF
}

# wait until an HTTP endpoint answers 200 (bearer token optional); exit 1 on timeout or if $3 died
wait_http() {
  "$PYTHON" - "$1" "$2" "$3" "$4" <<'EOF'
import os, sys, time, urllib.request
url, token_file, pid, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
headers = {"Authorization": "Bearer " + open(token_file).read().strip()} if token_file else {}
deadline = time.time() + timeout
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

# is anything left of the process group a process we started leads (setsid: group id = its pid)?
group_alive() { [[ -n "${1:-}" ]] && kill -0 -- "-$1" 2>/dev/null; }

# SIGTERM to a process we started (Ray: to `ray start --block`, which stops every process it started;
# MLflow: to its group), wait up to $2 seconds for its whole group to end, then SIGKILL what is left of it
stop_one() {
  local name="$1" grace="$2" pid
  pid="$(pid_of "$name")"
  if ! group_alive "$pid"; then rm -f "$STATE/$name.pid"; return 0; fi
  if [[ "$name" == mlflow ]]; then kill -TERM -- "-$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
  for _ in $(seq $((grace * 5))); do group_alive "$pid" || break; sleep 0.2; done
  if group_alive "$pid"; then
    kill -KILL -- "-$pid" 2>/dev/null || true
    for _ in $(seq 25); do group_alive "$pid" || break; sleep 0.2; done
  fi
  rm -f "$STATE/$name.pid"
  echo "stopped $name (pid $pid)"
}

print_env() {
  [[ -f "$DIR/env.sh" ]] || die "nothing started in $DIR (run: cluster/local.sh start --dir $DIR)"
  cat "$DIR/env.sh"
}

case "$cmd" in
  start)
    mkdir -p "$STATE" "$DIR/logs" "$DIR/mlartifacts"
    for name in ray mlflow; do
      pid="$(pid_of $name)"
      if alive "$pid"; then die "$name already running from $DIR (pid $pid); stop it first: cluster/local.sh stop --dir $DIR"; fi
    done
    (cd "$REPO" && "$PYTHON" -c "import ray, mlflow, jobs.tracking") 2>/dev/null \
      || die "$PYTHON cannot import ray, mlflow and jobs.tracking; set PYTHON=/path/to/venv/bin/python"
    RAY_BIN="$(dirname "$(command -v "$PYTHON")")/ray"
    [[ -x "$RAY_BIN" ]] || RAY_BIN="$(command -v ray)" || die "no 'ray' executable beside $PYTHON or on PATH"
    [[ -f "$TOKEN" ]] || { (umask 077; "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" > "$TOKEN"); }
    chmod 600 "$TOKEN"  # only this user reads the token, whoever made the file
    # the three named ports, then five for Ray's agents and servers (the options below, in that order)
    read -r RAY_PORT DASH_PORT MLFLOW_PORT AGENT_PORTS < <(ports "${RAY_PORT:-6379}" "${DASH_PORT:-8265}" \
                                                              "${MLFLOW_PORT:-5000}" 0 0 0 0 0)
    read -ra AGENT_PORTS <<< "$AGENT_PORTS"
    RAY_TMP="$(mktemp -d /tmp/cnray.XXXXXX)"  # short: Ray's socket paths must stay under 107 characters
    echo "$RAY_TMP" > "$STATE/ray_tmp"
    ray_args=(start --head --block --port "$RAY_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT"
              --temp-dir "$RAY_TMP" --disable-usage-stats)
    i=0
    for opt in ray-client-server-port dashboard-agent-listen-port dashboard-agent-grpc-port runtime-env-agent-port \
               metrics-export-port; do
      ray_args+=("--$opt" "${AGENT_PORTS[$i]}"); i=$((i + 1))
    done
    [[ -n "$NUM_CPUS" ]] && ray_args+=(--num-cpus "$NUM_CPUS")
    [[ -n "$NUM_GPUS" ]] && ray_args+=(--num-gpus "$NUM_GPUS")

    echo "starting Ray head (ports $RAY_PORT, dashboard $DASH_PORT; temp dir $RAY_TMP) and MLflow server (port $MLFLOW_PORT)"
    # the head's environment is what a job submitted to it starts with: its runs go to this MLflow server
    MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT" \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
      setsid "$RAY_BIN" "${ray_args[@]}" \
      > "$DIR/logs/ray.log" 2>&1 < /dev/null &
    echo $! > "$STATE/ray.pid"
    # the project's one MLflow launcher (jobs.tracking): the store, artifacts beside it, 127.0.0.1
    (cd "$REPO" && exec setsid "$PYTHON" -m jobs.tracking server --db "$DIR/mlflow.db" --host 127.0.0.1 \
      --port "$MLFLOW_PORT" --workers 2 > "$DIR/logs/mlflow.log" 2>&1 < /dev/null) &
    echo $! > "$STATE/mlflow.pid"

    if ! wait_http "http://127.0.0.1:$DASH_PORT/api/version" "$TOKEN" "$(pid_of ray)" 180; then
      tail -n 5 "$DIR/logs/ray.log" >&2; stop_one ray 30 >/dev/null; stop_one mlflow 20 >/dev/null
      die "the Ray head did not come up (log: $DIR/logs/ray.log)"
    fi
    if ! wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "" "$(pid_of mlflow)" 180; then
      tail -n 5 "$DIR/logs/mlflow.log" >&2; stop_one ray 30 >/dev/null; stop_one mlflow 20 >/dev/null
      die "the MLflow server did not come up (log: $DIR/logs/mlflow.log)"
    fi
    {
      printf '%-60s # %s\n' "export RAY_ADDRESS=127.0.0.1:$RAY_PORT" "ray.init() in scripts and jobs.train"
      printf '%-60s # %s\n' "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT" "ray job submit / logs / status / stop"
      printf '%-60s # %s\n' "export RAY_AUTH_MODE=token" "the head requires Ray's auth token"
      printf '%-60s # %s\n' "export RAY_AUTH_TOKEN_PATH=$TOKEN" "(a file only this user can read)"
      printf '%-60s # %s\n' "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT" "every run writes through the server"
    } > "$DIR/env.sh"
    echo "Ray head:      127.0.0.1:$RAY_PORT   dashboard http://127.0.0.1:$DASH_PORT   (pid $(pid_of ray), logs $RAY_TMP)"
    echo "MLflow server: http://127.0.0.1:$MLFLOW_PORT   store sqlite:///$DIR/mlflow.db   artifacts $DIR/mlartifacts   (pid $(pid_of mlflow))"
    echo "export the environment (or: source $DIR/env.sh):"
    cat "$DIR/env.sh"
    echo "stop both with: cluster/local.sh stop --dir $DIR"
    ;;
  env)
    print_env
    ;;
  status)
    code=0
    for name in ray mlflow; do
      pid="$(pid_of $name)"
      if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; code=1; fi
    done
    exit $code
    ;;
  stop)
    [[ -d "$STATE" ]] || die "nothing started in $DIR"
    stop_one mlflow 20
    stop_one ray 30
    if [[ -f "$STATE/ray_tmp" ]]; then
      tmp="$(cat "$STATE/ray_tmp")"
      [[ "$tmp" == /tmp/cnray.* ]] && rm -rf "$tmp"
      rm -f "$STATE/ray_tmp"
    fi
    rm -f "$DIR/env.sh"
    echo "stopped; the MLflow store stays in $DIR (mlflow ui --backend-store-uri sqlite:///$DIR/mlflow.db)"
    ;;
esac
