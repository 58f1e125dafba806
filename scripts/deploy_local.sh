#!/usr/bin/env bash
# A real Flower deployment on this machine, step by step, without Docker: a SuperLink with
# TLS and a state database, N SuperNodes (each with its own partition, and optionally its
# own data directory), `flwr run` submitted to it over TLS, the run's status checked, and
# every process stopped at the end, also on failure or Ctrl-C. The apps run in process
# isolation: a SuperExec (flower-superexec) of our own beside the SuperLink starts the
# ServerApp, one beside each SuperNode its ClientApps, and each must prove a secret shared
# with its SuperLink or SuperNode (executor authentication, --superexec-auth-secret-file)
# before it is given a task. With -a, SuperNode authentication: each SuperNode gets an EC
# key pair, and the SuperLink admits only the public keys registered with `flwr supernode register`;
# each node's ClientApp also signs its secure-aggregation keys with that key and accepts only
# peers' keys signed by a registered one (keys/trusted.pub; see docs/secure_aggregation.md).
#
#   bash scripts/deploy_local.sh [-n NODES] [-w WORKDIR] [-d DATA_DIR] [-x NODE_CONFIG] [-a] [OVERRIDE ...]
#   bash scripts/deploy_local.sh -n 3 -a num_clients=3 dataset=fashion_mnist
#
# -x adds to every SuperNode's node config, e.g. -x warm-worker=false (a fresh ClientApp
# process answers each message, without the node's warm worker; see docs/deployment.md).
#
# WORKDIR (default: a new folder under /tmp) receives certs/, secrets/ (one executor secret
# per SuperLink or SuperNode, mode 600), keys/ (-a), the SuperLink's state.db, app/ (the copy
# of the app that flwr run packs), one log per process (superlink, serverapp: its SuperExec
# and the ServerApp, supernode-i, clientapp-i: node i's SuperExec and ClientApps), pids,
# ports, and results/ (unless an override sets output_dir). num_clients must equal NODES.
# On real machines run the same commands on each host, with the SuperLink's address in
# place of 127.0.0.1 and that address in the certificate (docker/certs.sh DIR IP:...), and
# give each host only its own secret. Exit code: 0 when the run finished completed.
set -euo pipefail
APP=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2; }
nodes=3 work="" data_dir="" auth="" node_extra=""
while getopts "n:w:d:x:ah" opt; do
  case $opt in
    n) nodes=$OPTARG ;;
    w) work=$OPTARG ;;
    d) data_dir=$(realpath -m "$OPTARG") ;;
    a) auth=1 ;;
    x) node_extra=" $OPTARG" ;;
    *) usage; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if ! [[ $nodes =~ ^[1-9][0-9]*$ ]]; then
  echo "deploy_local.sh: -n $nodes is not a positive number of SuperNodes" >&2; exit 2
fi
[ -x "$APP/.venv/bin/flwr" ] || { echo "deploy_local.sh: no $APP/.venv; run bash scripts/setup.sh first" >&2; exit 2; }
work=$(realpath -m "${work:-$(mktemp -d /tmp/fcil-deploy-XXXXXX)}")
mkdir -p "$work"
PY="$APP/.venv/bin/python"
# The SuperExecs look for new tasks every 0.25 s (Flower's default: 1 s).
export PATH="$APP/.venv/bin:$PATH" FLWR_HOME="$work/flwr-home" FLWR_TELEMETRY_ENABLED=0 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.25}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Every process started here, and their descendants (the ServerApp, the ClientApps), are
# stopped by pid on exit.
pids=()
descendants() { local child; for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done; }
stop_all() {
  local all=() pid
  for pid in "${pids[@]}"; do all+=("$pid" $(descendants "$pid")); done
  [ ${#all[@]} -eq 0 ] && return
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=0; for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break; sleep 0.2
  done
  kill -KILL "${all[@]}" 2>/dev/null || true
  echo "deploy_local.sh: stopped ${#all[@]} processes"
}
trap stop_all EXIT
trap 'exit 130' INT TERM
start() {  # start NAME COMMAND...: run in the background, log to WORKDIR/NAME.log
  local name=$1; shift
  "$@" > "$work/$name.log" 2>&1 &
  pids+=($!); echo "$name $!" >> "$work/pids"
}

echo "== 1. certificates (a private CA and the SuperLink's certificate) and executor secrets"
[ -e "$work/certs/ca.crt" ] || bash "$APP/docker/certs.sh" "$work/certs"
bash "$APP/docker/secrets.sh" "$work/secrets" superlink $(seq -f 'supernode-%.0f' 0 $((nodes - 1))) > /dev/null

echo "== 2. SuperLink: TLS, state in $work/state.db; its SuperExec for the ServerApp"
port=$(free_port)
echo "superlink-port $port" >> "$work/ports"
start superlink flower-superlink \
  --ssl-ca-certfile "$work/certs/ca.crt" --ssl-certfile "$work/certs/server.pem" --ssl-keyfile "$work/certs/server.key" \
  --database "$work/state.db" --host 127.0.0.1 --port "$port" --isolation process \
  --superexec-auth-secret-file "$work/secrets/superlink" \
  --disable-runtime-dependency-installation ${auth:+--enable-supernode-auth}
link_pid=$!
for _ in $(seq 120); do
  "$PY" -c "import httpx, sys; httpx.get('https://127.0.0.1:$port/health', verify='$work/certs/ca.crt', timeout=1).raise_for_status()" \
    2>/dev/null && break
  kill -0 "$link_pid" 2>/dev/null || { cat "$work/superlink.log" >&2; exit 1; }
  sleep 0.5
done
# The ServerApp's executor, over TLS like every other dialer of the SuperLink; it exits
# when the SuperLink does (--parent-pid), as the one a SuperLink starts itself would.
start serverapp flower-superexec --root-certificates "$work/certs/ca.crt" --runtime-api-address "127.0.0.1:$port" \
  --superexec-auth-secret-file "$work/secrets/superlink" --parent-pid "$link_pid"

# flwr's connection to this SuperLink (to register keys and to submit the run).
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deployment"

[superlink.deployment]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
EOF

if [ -n "$auth" ]; then
  echo "== 3. SuperNode authentication: a key pair per SuperNode, public keys registered"
  mkdir -p "$work/keys"
  for ((i = 0; i < nodes; i++)); do
    key="$work/keys/supernode-$i"
    [ -e "$key" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$key"
    (cd "$work" && flwr supernode register "$key.pub" deployment --format json) > "$work/register-$i.json"
  done
  cat "$work"/keys/supernode-*.pub > "$work/keys/trusted.pub"
fi

echo "== 4. $nodes SuperNodes over TLS, each with its partition${data_dir:+ and data dir $data_dir} and its SuperExec"
node_ports=() node_pids=()
for ((i = 0; i < nodes; i++)); do
  node_ports[i]=$(free_port)
  echo "supernode-$i-port ${node_ports[i]}" >> "$work/ports"
  start "supernode-$i" flower-supernode \
    --root-certificates "$work/certs/ca.crt" --superlink "127.0.0.1:$port" --port "${node_ports[i]}" \
    --node-config "partition-id=$i num-partitions=$nodes${data_dir:+ data-dir=\"$data_dir\"}$node_extra" \
    --isolation process --superexec-auth-secret-file "$work/secrets/supernode-$i" \
    ${auth:+--auth-supernode-private-key "$work/keys/supernode-$i"}
  node_pids[i]=$!
done
# Each node's ClientApp executor, once its node's app API (plain HTTP on 127.0.0.1, as Flower's
# own subprocess isolation uses it) listens; it exits with its node (--parent-pid), and so
# does the node's warm worker, which watches the executor (client_app/worker.py).
for ((i = 0; i < nodes; i++)); do
  for _ in $(seq 120); do
    (: < "/dev/tcp/127.0.0.1/${node_ports[i]}") 2>/dev/null && break
    kill -0 "${node_pids[i]}" 2>/dev/null || { cat "$work/supernode-$i.log" >&2; exit 1; }
    sleep 0.5
  done
  start "clientapp-$i" env ${auth:+FEDCIL_SECAGG_IDENTITY_KEY="$work/keys/supernode-$i" FEDCIL_SECAGG_TRUSTED_KEYS="$work/keys/trusted.pub"} \
    flower-superexec --insecure --runtime-api-address "127.0.0.1:${node_ports[i]}" \
    --superexec-auth-secret-file "$work/secrets/supernode-$i" --parent-pid "${node_pids[i]}"
done

echo "== 5. flwr run over TLS"
overrides=("$@")
printf '%s\n' "${overrides[@]}" | grep -q '^output_dir=' || overrides+=("output_dir=$work/results")
"$PY" -c 'import shlex, sys, tomli_w; print(tomli_w.dumps({"config-name": "config", "overrides": shlex.join(sys.argv[1:])}))' \
  "${overrides[@]}" > "$work/run-config.toml"
# flwr builds the FAB from a copy of the app's files (fcil-run does the same): walking a .venv takes it seconds.
rm -rf "$work/app" && "$PY" -c 'import sys; from pathlib import Path; from fedcil.cli.run import stage_app; stage_app(Path(sys.argv[1]), Path(sys.argv[2]))' "$APP" "$work/app"
(cd "$work" && flwr run "$work/app" deployment --stream --run-config "$work/run-config.toml") 2>&1 | tee "$work/flwr-run.log"
run_id=$(grep -oE 'Successfully started run [0-9]+' "$work/flwr-run.log" | grep -oE '[0-9]+$' || true)
[ -n "$run_id" ] || { echo "deploy_local.sh: flwr run did not start a run" >&2; exit 1; }

echo "== 6. the run's final status"
status=$(cd "$work" && flwr list --run-id "$run_id" --format json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $run_id: $status"
[ "$status" = "finished:completed" ] || exit 1
echo "deploy_local.sh: results in $(printf '%s\n' "${overrides[@]}" | sed -n 's/^output_dir=//p' | tail -1)"
