#!/usr/bin/env bash
# Runs kcg's benchmarks and prints one table (see bench/README.md).
#
#   bench/run.sh                         every benchmark
#   bench/run.sh --only planner,status   some (planner handoff status e2e rebalance sink failover operator)
#   bench/run.sh --only cost             the coordination cost (not part of the default run)
#   bench/run.sh --only scale            thousands of shards (not part of the default run)
#   bench/run.sh --help                  all options
#
# Starts (or reuses) the emulators with scripts/emulators.sh. Kinesis traffic goes to
# ministack (fast GetRecords; kinesis-local's PutRecords slows as a shard fills, which would
# measure the emulator, not kcg), the state store to DynamoDB Local. Override the Kinesis
# endpoint with KCG_BENCH_KINESIS_URL (and name it with KCG_BENCH_KINESIS_EMULATOR).
# The scale benchmark reads from kinesis-local instead (the emulator with correct shard
# listings, see scripts/emulators.sh), started with its shard limit raised to
# KCG_KINESIS_SHARD_LIMIT (default here 6000; an already running kinesis-local keeps the
# limit it was started with).
# Exits non-zero when a stated goal is missed or a selected benchmark produced no result.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need_emulators=1
want_peer=1
only=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    -h | --help) need_emulators=0 ;;
    --only) only+=",${args[$((i + 1))]:-}" ;;
    --only=*) only+=",${args[$i]#--only=}" ;;
    --no-peer) want_peer=0 ;;
  esac
done
# The pure-function benchmarks alone need no emulator.
if [[ -n "$only" && "$only" != *e2e* && "$only" != *rebalance* && "$only" != *sink* && "$only" != *failover* && "$only" != *operator* && "$only" != *cost* && "$only" != *scale* ]]; then
  need_emulators=0
fi
[[ -n "$only" && "$only" != *e2e* ]] && want_peer=0
((need_emulators)) || want_peer=0

# The side-by-side peer (npm lifion-kinesis 1.3.3) for the e2e benchmark, installed next to
# the emulators (gitignored). Without node/npm or the registry the peer is skipped, not failed.
install_peer() {
  local dir="${KCG_BENCH_PEER_DIR:-$ROOT/.emulators/bench-peer}"
  local pkg="$dir/node_modules/lifion-kinesis/package.json"
  if [[ ! -f "$pkg" ]] || ! grep -q '"version": "1.3.3"' "$pkg"; then
    if ! command -v npm >/dev/null 2>&1; then
      echo "[bench] npm not found: skipping the lifion-kinesis side-by-side" >&2
      return 0
    fi
    echo "[bench] installing npm lifion-kinesis@1.3.3 into $dir" >&2
    mkdir -p "$dir"
    [[ -f "$dir/package.json" ]] || printf '{ "name": "kcg-bench-peer", "private": true }\n' >"$dir/package.json"
    if ! (cd "$dir" && npm install --save-exact --no-audit --no-fund --loglevel=error lifion-kinesis@1.3.3 >&2); then
      echo "[bench] npm install failed: skipping the lifion-kinesis side-by-side" >&2
      return 0
    fi
  fi
  export KCG_BENCH_PEER_DIR="$dir"
}

if ((need_emulators)) && [[ "$only" == *scale* ]]; then
  export KCG_KINESIS_SHARD_LIMIT="${KCG_KINESIS_SHARD_LIMIT:-6000}"
  scripts/emulators.sh start dynamodb kinesis
  eval "$(scripts/emulators.sh env)"
  export KCG_BENCH_KINESIS_EMULATOR="kinesis-local (SHARD_LIMIT $KCG_KINESIS_SHARD_LIMIT if started here)"
elif ((need_emulators)); then
  # dynamodb: the state store; sts: ministack, which also serves Kinesis on its gateway.
  scripts/emulators.sh start dynamodb sts
  eval "$(scripts/emulators.sh env)"
  if [[ -n "${KCG_BENCH_KINESIS_URL:-}" ]]; then
    export AWS_ENDPOINT_URL_KINESIS="$KCG_BENCH_KINESIS_URL"
    export KCG_BENCH_KINESIS_EMULATOR="${KCG_BENCH_KINESIS_EMULATOR:-custom}"
  else
    export AWS_ENDPOINT_URL_KINESIS="$AWS_ENDPOINT_URL_STS"
    export KCG_BENCH_KINESIS_EMULATOR="ministack 1.5.33"
  fi
fi
((want_peer)) && install_peer

# The sink and failover benchmarks run the real worker binary (target/release/kcg-worker).
if [[ -z "$only" || "$only" == *sink* || "$only" == *failover* ]]; then
  cargo build --release --locked -p kcg-worker --bin kcg-worker
fi

# The operator benchmark runs the real operator binary (target/release/kcg-operator).
if [[ -z "$only" || "$only" == *operator* ]]; then
  cargo build --release --locked -p kcg-operator --bin kcg-operator
fi

exec cargo run --release --locked -p kcg-bench --bin kcg-bench -- "$@"
