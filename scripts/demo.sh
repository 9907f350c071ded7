#!/usr/bin/env bash
# The kcg demo: a consumer group of several kcg-worker processes on local emulators.
#
#   ./scripts/demo.sh          interactive: live status until Ctrl-C
#   ./scripts/demo.sh --once   scripted run for CI: phases, then a delivery check, then exit
#
# It starts the emulators (DynamoDB Local, kinesis-local), renders the worker config from
# an example KinesisConsumerGroup with the operator's own code, creates a 4-shard stream,
# runs a producer and two workers, scales to three, kills one with SIGKILL, restarts it, and shows
# the status the operator would publish (`kcg-operator status`) at every step.
set -euo pipefail

ONCE=0
SPEC=examples/minimal-stdout.yaml
# A namespace of its own per run: the group id (namespace/name) keys its state-store rows.
NAMESPACE="demo-$(date +%H%M%S)"
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
STARTED=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Give the stream's shards back (the emulator caps the shards of an account).
  if [ -n "${STREAM:-}" ] && [[ " ${STARTED[*]} " != *" kinesis "* ]]; then
    "$BIN/kcg-produce" --stream "$STREAM" --delete >/dev/null 2>&1 || true
  fi
  if ((${#STARTED[@]})); then scripts/emulators.sh stop "${STARTED[@]}" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'echo; echo "interrupted: stopping everything the demo started"; exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting emulators (DynamoDB Local, kinesis-local)"
# Stop at the end only the emulators this run starts (the pid files are the script's record).
RUN_DIR="$ROOT/.emulators/run"
STARTED=()
BEFORE=()
for n in dynamodb kinesis; do [ -f "$RUN_DIR/$n.pid" ] && BEFORE+=("$n"); done
scripts/emulators.sh start dynamodb kinesis
for n in dynamodb kinesis; do
  if [ -f "$RUN_DIR/$n.pid" ] && [[ " ${BEFORE[*]} " != *" $n "* ]]; then STARTED+=("$n"); fi
done
eval "$(scripts/emulators.sh env)"

say "building kcg-worker, kcg-operator and the demo producer"
scripts/build-bins.sh --quiet
BIN="$ROOT/target/debug"

say "rendering the worker config from $SPEC (the operator's own code)"
"$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" > "$WORK/config.yaml"
cat "$WORK/config.yaml"
GROUP="$("$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" --field group)"
TABLE="$("$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" --field table)"
STREAM="$("$BIN/kcg-operator" render --spec "$SPEC" --namespace "$NAMESPACE" --field stream)"

say "creating the $SHARDS-shard stream '$STREAM' and starting a producer"
"$BIN/kcg-produce" --stream "$STREAM" --recreate --create-shards "$SHARDS" --count 0
"$BIN/kcg-produce" --stream "$STREAM" --rate 40 --keys 16 --summary "$WORK/produced.json" \
  >"$WORK/producer.log" 2>&1 &
PRODUCER=$!
PIDS+=("$PRODUCER")

declare -A WORKER_PID
start_worker() {
  local name="$1"
  POD_NAME="$name" "$BIN/kcg-worker" run --config "$WORK/config.yaml" --create-table \
    --listen "127.0.0.1:0" >>"$WORK/$name.out" 2>>"$WORK/$name.log" &
  WORKER_PID[$name]=$!
  PIDS+=("$!")
  echo "started worker $name (pid $!)"
}

# The group as the operator would see it; `scale N` edits its replicas like
# `kubectl scale kcg/NAME --replicas=N` would.
cp "$SPEC" "$WORK/group.yaml"
scale() { sed -i -E "s/^(  replicas:) *[0-9]+/\1 $1/" "$WORK/group.yaml"; }

status() {
  "$BIN/kcg-operator" status --table "$TABLE" --group "$GROUP" --spec "$WORK/group.yaml" "$@"
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
      clear 2>/dev/null || printf "\n\n"
      printf '\033[1m%s\033[0m   (Ctrl-C stops the demo)\n\n' "$title"
      status || true
      sleep 2
    done
  fi
}

say "starting two workers"
scale 2
start_worker "${GROUP#*/}-worker-0"
start_worker "${GROUP#*/}-worker-1"
watch_status 20 "phase 1: two workers share $SHARDS shards"

say "scaling up to 3 (what kubectl scale kcg/${GROUP#*/} --replicas=3 does): a third worker joins"
scale 3
start_worker "${GROUP#*/}-worker-2"
watch_status 20 "phase 2: three workers, ranges rebalanced"

victim="${GROUP#*/}-worker-0"
say "killing $victim with SIGKILL (no graceful release)"
kill -9 "${WORKER_PID[$victim]}"
watch_status 25 "phase 3: $victim died; its shards move to the others after the client timeout"

say "restarting $victim, as Kubernetes would: a new incarnation joins and takes its range back"
start_worker "$victim"
watch_status 20 "phase 4: $victim is back as a new client"

if [ "$ONCE" = 0 ]; then
  while true; do watch_status 3600 "steady state: Ctrl-C stops the demo"; done
fi

say "stopping the producer, letting the workers drain, then stopping them gracefully"
kill "$PRODUCER"; wait "$PRODUCER" 2>/dev/null || true
sleep 8
for name in "${!WORKER_PID[@]}"; do kill -TERM "${WORKER_PID[$name]}" 2>/dev/null || true; done
for name in "${!WORKER_PID[@]}"; do wait "${WORKER_PID[$name]}" 2>/dev/null || true; done

say "checking delivery: every produced record consumed (the example starts at TrimHorizon)"
python3 - "$WORK" <<'PY'
import base64, glob, json, sys
work = sys.argv[1]
produced = json.load(open(f"{work}/produced.json"))
seen = {}
for path in sorted(glob.glob(f"{work}/*-worker-*.out")):
    for line in open(path):
        body = json.loads(base64.b64decode(json.loads(line)["data"]))
        seen.setdefault(body["key"], []).append(body["n"])
total = sum(len(v) for v in seen.values())
missing = dups = 0
for key, count in sorted(produced.items()):
    ns = seen.get(key, [])
    lost = sorted(set(range(1, count + 1)) - set(ns))
    missing += len(lost)
    dups += len(ns) - len(set(ns))
    if lost:
        print(f"  {key}: {len(lost)} missing, first {lost[:10]}")
print(f"  produced {sum(produced.values())} records over {len(produced)} keys; consumed {total}; "
      f"missing: {missing}; duplicates: {dups} (a SIGKILL may redeliver the un-checkpointed tail)")
sys.exit(1 if missing else 0)
PY
say "demo finished"
