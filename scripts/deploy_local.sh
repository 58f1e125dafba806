#!/usr/bin/env bash
# A real Flower deployment without Docker, step by step: a SuperLink with TLS and a state
# database, N SuperNodes (each with its own partition, and optionally its own data directory
# or its own site folder), `flwr run` submitted to it over TLS, the run's status checked, and
# every process stopped at the end, also on failure or Ctrl-C. The apps run in process
# isolation: a SuperExec (flower-superexec) of our own beside the SuperLink starts the
# ServerApp, one beside each SuperNode its ClientApps, and each must prove a secret shared
# with its SuperLink or SuperNode (executor authentication, --superexec-auth-secret-file)
# before it is given a task. With -a, SuperNode authentication: each SuperNode gets an EC
# key pair, and the SuperLink admits only the public keys registered with `flwr supernode register`;
# each node's ClientApp also signs its secure-aggregation keys with that key and accepts only
# peers' keys signed by a registered one (keys/trusted.pub; see docs/secure_aggregation.md).
#
#   bash scripts/deploy_local.sh [-r ROLE] [-n NODES] [-i NODE] [-w WORKDIR] [-l ADDRESS] [-p PORT]
#                                [-d DATA_DIR | -s SITES_DIR] [-x NODE_CONFIG] [-a] [OVERRIDE ...]
#   bash scripts/deploy_local.sh -n 3 -a num_clients=3 dataset=fashion_mnist
#
# -d: every SuperNode's dataset.root (the whole data set); -s: SuperNode i reads only its site
# folder SITES_DIR/site-i (node config data="local", as fcil-export-sites writes them).
# -x adds to every SuperNode's node config, e.g. -x warm-worker=false (a fresh ClientApp
# process answers each message, without the node's warm worker; see docs/deployment.md).
#
# ROLE `all` (the default) runs everything on 127.0.0.1 with free ports and makes the
# certificates and secrets. On several hosts the operator makes them (docker/certs.sh DIR
# IP:ADDRESS, docker/secrets.sh) and gives each host's WORKDIR only its own files; then
#   -r server -w WORKDIR -l ADDRESS -p PORT [OVERRIDE ...]   on the server host: the SuperLink on
#      ADDRESS:PORT and its SuperExec, the run, its status (needs certs/ca.crt, certs/server.pem,
#      certs/server.key, secrets/superlink; with -a it registers every keys/supernode-*.pub);
#   -r site -w WORKDIR -l ADDRESS -p PORT -n NODES [-i NODE]  on a site host: SuperNode NODE
#      (default: all NODES) and its SuperExec, dialling ADDRESS:PORT, until stopped (needs
#      certs/ca.crt, secrets/supernode-NODE; with -a keys/supernode-NODE and keys/trusted.pub).
#
# WORKDIR (default for `all`: a new folder under /tmp) receives certs/, secrets/ (one executor
# secret per SuperLink or SuperNode, mode 600), keys/ (-a), the SuperLink's state.db, app/ (the
# copy of the app that flwr run packs), one log per process (superlink, serverapp: its SuperExec
# and the ServerApp, supernode-i, clientapp-i: node i's SuperExec and ClientApps), pids, ports,
# and results/ (unless an override sets output_dir). num_clients must equal NODES.
# Exit code: 0 when the run finished completed; -r site runs until stopped, and exits 1 as soon
# as one of its SuperNodes or SuperExecs exits on its own.
set -euo pipefail
APP=$(cd "$(dirname "$0")/.." && pwd)
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; }
fail() { echo "deploy_local.sh: $*" >&2; exit 2; }
role=all nodes=3 only="" work="" address="" port="" data_dir="" sites_dir="" auth="" node_extra=""
while getopts "r:n:i:w:l:p:d:s:x:ah" opt; do
  case $opt in
    r) role=$OPTARG ;;
    n) nodes=$OPTARG ;;
    i) only=$OPTARG ;;
    w) work=$OPTARG ;;
    l) address=$OPTARG ;;
    p) port=$OPTARG ;;
    d) data_dir=$(realpath -m "$OPTARG") ;;
    s) sites_dir=$(realpath -m "$OPTARG") ;;
    a) auth=1 ;;
    x) node_extra=" $OPTARG" ;;
    *) usage; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
case $role in all | server | site) ;; *) fail "-r $role is not a role; valid choices: all, server, site" ;; esac
[[ $nodes =~ ^[1-9][0-9]*$ ]] || fail "-n $nodes is not a positive number of SuperNodes"
[ -z "$only" ] || [[ $only =~ ^[0-9]+$ && $only -lt $nodes ]] || fail "-i $only is not a SuperNode of 0..$((nodes - 1))"
[ -z "$data_dir" ] || [ -z "$sites_dir" ] || fail "-d and -s exclude each other: a node reads the whole data set or its own site folder"
if [ "$role" = all ]; then
  [ -z "$address$port$only" ] || fail "-l, -p and -i are for -r server and -r site; -r all runs on 127.0.0.1 with free ports"
  address=127.0.0.1
else
  [ -n "$work" ] && [ -n "$address" ] && [ -n "$port" ] || fail "-r $role needs -w WORKDIR, -l ADDRESS and -p PORT"
  [ "$role" = site ] || [ -z "$only$data_dir$sites_dir$node_extra" ] || fail "-i, -d, -s and -x are for the SuperNodes (-r all or -r site)"
  [ "$role" = server ] || [ $# -eq 0 ] || fail "-r site takes no overrides (the run's come from -r server): $*"
fi
[ -x "$APP/.venv/bin/flwr" ] || fail "no $APP/.venv; run bash scripts/setup.sh first"
first=${only:-0} last=${only:-$((nodes - 1))}
if [ -n "$sites_dir" ] && [ "$role" != server ]; then
  for ((i = first; i <= last; i++)); do
    [ -d "$sites_dir/site-$i" ] || fail "-s $sites_dir has no site-$i, SuperNode $i's folder (fcil-export-sites --out $sites_dir ...)"
  done
fi
work=$(realpath -m "${work:-$(mktemp -d /tmp/fcil-deploy-XXXXXX)}")
needs=()  # what the operator must have given this host
case $role in
  server) needs=(certs/ca.crt certs/server.pem certs/server.key secrets/superlink) ;;
  site)
    needs=(certs/ca.crt)
    for ((i = first; i <= last; i++)); do needs+=("secrets/supernode-$i" ${auth:+"keys/supernode-$i"}); done
    [ -z "$auth" ] || needs+=(keys/trusted.pub) ;;
esac
for file in "${needs[@]}"; do [ -e "$work/$file" ] || fail "-r $role needs $work/$file (see docs/deployment.md, 'On several hosts')"; done
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

credentials() {
  echo "== 1. certificates (a private CA and the SuperLink's certificate) and executor secrets"
  [ -e "$work/certs/ca.crt" ] || bash "$APP/docker/certs.sh" "$work/certs"
  bash "$APP/docker/secrets.sh" "$work/secrets" superlink $(seq -f 'supernode-%.0f' 0 $((nodes - 1))) > /dev/null
}

superlink() {
  echo "== 2. SuperLink on $address: TLS, state in $work/state.db; its SuperExec for the ServerApp"
  port=${port:-$(free_port)}
  echo "superlink-port $port" >> "$work/ports"
  start superlink flower-superlink \
    --ssl-ca-certfile "$work/certs/ca.crt" --ssl-certfile "$work/certs/server.pem" --ssl-keyfile "$work/certs/server.key" \
    --database "$work/state.db" --host "$address" --port "$port" --isolation process \
    --superexec-auth-secret-file "$work/secrets/superlink" \
    --disable-runtime-dependency-installation ${auth:+--enable-supernode-auth}
  local link_pid=$! up=""
  for _ in $(seq 120); do
    "$PY" -c "import httpx, sys; httpx.get('https://$address:$port/health', verify='$work/certs/ca.crt', timeout=1).raise_for_status()" \
      2>/dev/null && { up=1; break; }
    kill -0 "$link_pid" 2>/dev/null || break
    sleep 0.5
  done
  [ -n "$up" ] || { cat "$work/superlink.log" >&2; echo "deploy_local.sh: the SuperLink did not answer on $address:$port" >&2; exit 1; }
  # The ServerApp's executor, over TLS like every other dialer of the SuperLink; it exits
  # when the SuperLink does (--parent-pid), as the one a SuperLink starts itself would.
  start serverapp flower-superexec --root-certificates "$work/certs/ca.crt" --runtime-api-address "$address:$port" \
    --superexec-auth-secret-file "$work/secrets/superlink" --parent-pid "$link_pid"

  # flwr's connection to this SuperLink (to register keys and to submit the run).
  mkdir -p "$FLWR_HOME"
  cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deployment"

[superlink.deployment]
address = "$address:$port"
root-certificates = "$work/certs/ca.crt"
TOML
}

node_keys() {  # with -a in role all: a key pair per SuperNode
  mkdir -p "$work/keys"
  for ((i = 0; i < nodes; i++)); do
    [ -e "$work/keys/supernode-$i" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$work/keys/supernode-$i"
  done
  cat "$work"/keys/supernode-*.pub > "$work/keys/trusted.pub"
}

register_keys() {
  echo "== 3. SuperNode authentication: the SuperNodes' public keys registered"
  local key
  for key in "$work"/keys/supernode-*.pub; do
    [ -e "$key" ] || { echo "deploy_local.sh: -a but no $work/keys/supernode-*.pub to register" >&2; exit 1; }
    (cd "$work" && flwr supernode register "$key" deployment --format json) > "$work/register-$(basename "$key" .pub | sed 's/^supernode-//').json"
  done
}

supernodes() {
  echo "== 4. SuperNodes $first..$last over TLS to $address:$port, each with its partition${data_dir:+ and data dir $data_dir}${sites_dir:+ and its site folder in $sites_dir} and its SuperExec"
  local node_ports=() node_pids=() data
  for ((i = first; i <= last; i++)); do
    node_ports[i]=$(free_port)
    echo "supernode-$i-port ${node_ports[i]}" >> "$work/ports"
    data=${data_dir:+ data-dir=\"$data_dir\"}${sites_dir:+ data=\"local\" data-dir=\"$sites_dir/site-$i\"}
    start "supernode-$i" flower-supernode \
      --root-certificates "$work/certs/ca.crt" --superlink "$address:$port" --port "${node_ports[i]}" \
      --node-config "partition-id=$i num-partitions=$nodes$data$node_extra" \
      --isolation process --superexec-auth-secret-file "$work/secrets/supernode-$i" \
      ${auth:+--auth-supernode-private-key "$work/keys/supernode-$i"}
    node_pids[i]=$!
  done
  # Each node's ClientApp executor, once its node's app API (plain HTTP on 127.0.0.1, as Flower's
  # own subprocess isolation uses it) listens; it exits with its node (--parent-pid), and so
  # does the node's warm worker, which watches the executor (client_app/worker.py).
  for ((i = first; i <= last; i++)); do
    for _ in $(seq 120); do
      (: < "/dev/tcp/127.0.0.1/${node_ports[i]}") 2>/dev/null && break
      kill -0 "${node_pids[i]}" 2>/dev/null || { cat "$work/supernode-$i.log" >&2; exit 1; }
      sleep 0.5
    done
    start "clientapp-$i" env ${auth:+FEDCIL_SECAGG_IDENTITY_KEY="$work/keys/supernode-$i" FEDCIL_SECAGG_TRUSTED_KEYS="$work/keys/trusted.pub"} \
      flower-superexec --insecure --runtime-api-address "127.0.0.1:${node_ports[i]}" \
      --superexec-auth-secret-file "$work/secrets/supernode-$i" --parent-pid "${node_pids[i]}"
  done
}

submit() {
  echo "== 5. flwr run over TLS"
  local overrides=("$@") run_id status
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
}

case $role in
  all)
    credentials
    superlink
    if [ -n "$auth" ]; then node_keys; register_keys; fi
    supernodes
    submit "$@" ;;
  server)
    superlink
    [ -z "$auth" ] || register_keys
    submit "$@" ;;
  site)
    supernodes
    echo "deploy_local.sh: SuperNodes $first..$last serving; stop with Ctrl-C or SIGTERM"
    # Ctrl-C or SIGTERM ends the wait through the trap (exit 130); a process that ends on its own
    # (a SuperNode refused by the SuperLink, a crash) ends the site role with an error.
    wait -n || true
    echo "deploy_local.sh: a SuperNode or its SuperExec exited on its own; see $work/supernode-*.log and clientapp-*.log" >&2
    exit 1 ;;
esac
