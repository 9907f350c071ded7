#!/usr/bin/env bash
# Runs kcg's benchmarks and prints one table (see bench/README.md).
#
#   bench/run.sh                         every benchmark
#   bench/run.sh --only planner,status   some (planner handoff status e2e rebalance)
#   bench/run.sh --help                  all options
#
# Starts (or reuses) the emulators with scripts/emulators.sh. Kinesis traffic goes to
# ministack (fast GetRecords; kinesis-local's PutRecords slows as a shard fills, which would
# measure the emulator, not kcg), the state store to DynamoDB Local. Override the Kinesis
# endpoint with KCG_BENCH_KINESIS_URL (and name it with KCG_BENCH_KINESIS_EMULATOR).
# Exits non-zero when a stated goal is missed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need_emulators=1
only=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    -h | --help) need_emulators=0 ;;
    --only) only+=",${args[$((i + 1))]:-}" ;;
    --only=*) only+=",${args[$i]#--only=}" ;;
  esac
done
# The pure-function benchmarks alone need no emulator.
if [[ -n "$only" && "$only" != *e2e* && "$only" != *rebalance* ]]; then
  need_emulators=0
fi

if ((need_emulators)); then
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

exec cargo run --release --locked -p kcg-bench --bin kcg-bench -- "$@"
