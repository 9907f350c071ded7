#!/usr/bin/env bash
# THE test command: everything CI checks, on a fresh machine or a dev box.
#
#   scripts/test.sh                 all phases
#   scripts/test.sh -- <filter>     pass extra arguments to `cargo nextest run` (e.g. a test name)
#
# Phases:
#   1. emulators  scripts/emulators.sh start (installs DynamoDB Local, kinesis-local, ministack on
#                 first use; reuses emulators already listening) and exports AWS_ENDPOINT_URL_*.
#   2. format     cargo fmt --all --check.
#   3. build      compile every test binary of the workspace (--locked) and the binaries
#                 (scripts/build-bins.sh).
#   4. tests      cargo nextest run --workspace --profile ci (unit + integration tests).
#   5. doctests   cargo test --doc --workspace (nextest does not run doctests).
#   6. chart      scripts/check-chart.sh (helm lint/template, kubernetes-validate, schema, CRD).
#   7. e2e        the real-cluster suite (tests/e2e.rs, tests/kubelet_standin.rs): starts a local
#                 kube-apiserver + controller-manager with ../shared/kube/cluster.sh (override:
#                 KCG_KUBE_CLUSTER_SH), points KUBECONFIG at it, sets KCG_E2E=1, runs the two
#                 test binaries one test at a time with their output shown, and stops the
#                 cluster. Without cluster.sh the phase is skipped and says why.
#   8. demo       ./scripts/demo.sh --once, when that script exists.
#
# Why nextest: every test runs in its own process, so an integration test that spawns
# kcg-worker processes and panics cannot disturb its neighbours, and the ci profile
# (.config/nextest.toml) kills a test hung on an emulator after 10 minutes instead of stalling
# CI. Set KCG_TEST_RUNNER=cargo to use plain `cargo test` (e.g. where nextest is not installed;
# that is also the automatic fallback).
#
# Emulators this script started are stopped on exit; ones that were already running are left
# alone. Exits non-zero if any phase failed; later phases still run where they can, so one run
# shows every problem.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

EXTRA_ARGS=()
while (($#)); do
  case "$1" in
    --) shift; EXTRA_ARGS=("$@"); break ;;
    -h | --help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

RUNNER="${KCG_TEST_RUNNER:-}"
if [[ -z "$RUNNER" ]]; then
  if cargo nextest --version >/dev/null 2>&1; then RUNNER=nextest; else RUNNER=cargo; fi
fi

PHASES=()
RESULTS=()
TIMES=()
FAILED=0
T0=$(date +%s)

# run_phase NAME COMMAND...: runs it, records pass/fail and duration, never exits.
run_phase() {
  local name="$1" start rc
  shift
  printf '\n\033[1m==> %s\033[0m: %s\n' "$name" "$*"
  start=$(date +%s)
  set +e
  "$@"
  rc=$?
  set -e
  PHASES+=("$name")
  TIMES+=("$(($(date +%s) - start))")
  if ((rc == 0)); then RESULTS+=("ok"); else RESULTS+=("FAILED (exit $rc)"); FAILED=1; fi
  return "$rc"
}

skip_phase() {
  PHASES+=("$1"); TIMES+=("0"); RESULTS+=("skipped: $2")
}

summary() {
  local i
  printf '\n\033[1m==> summary\033[0m (runner: %s)\n' "$RUNNER"
  for i in "${!PHASES[@]}"; do
    printf '  %-10s %6ss  %s\n' "${PHASES[$i]}" "${TIMES[$i]}" "${RESULTS[$i]}"
  done
  printf '  %-10s %6ss\n' total "$(($(date +%s) - T0))"
  # Disk is the first thing a small CI machine runs out of: say how much the build took.
  printf '  disk: target/ %s, %s free\n' "$(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1)" \
    "$(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ')"
}

# --- emulators: remember which ones we start, so only those are stopped at exit -------------
RUN_DIR="${KCG_EMULATORS_DIR:-$ROOT/.emulators}/run"
BEFORE=()
for n in dynamodb kinesis sts; do [[ -f "$RUN_DIR/$n.pid" ]] && BEFORE+=("$n"); done
STARTED=()

KUBE_SH="${KCG_KUBE_CLUSTER_SH:-$ROOT/../shared/kube/cluster.sh}"
KUBE_DIR="$ROOT/.kube-local"
KUBE_STARTED=0

cleanup() {
  local rc=$?
  if ((KUBE_STARTED)); then
    "$KUBE_SH" stop "$KUBE_DIR" || true
  fi
  if ((${#STARTED[@]})); then
    echo "stopping emulators started by this run: ${STARTED[*]}" >&2
    scripts/emulators.sh stop "${STARTED[@]}" || true
  fi
  summary
  if ((FAILED)) && ((rc == 0)); then rc=1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! run_phase emulators scripts/emulators.sh start; then
  for n in dynamodb kinesis sts; do
    [[ -f "$RUN_DIR/$n.pid" && " ${BEFORE[*]} " != *" $n "* ]] && STARTED+=("$n")
  done
  echo "emulators could not be started; the integration tests need them. Stopping." >&2
  exit 1
fi
for n in dynamodb kinesis sts; do
  [[ -f "$RUN_DIR/$n.pid" && " ${BEFORE[*]} " != *" $n "* ]] && STARTED+=("$n")
done
eval "$(scripts/emulators.sh env)"
# helm and kubectl: the chart's RBAC test renders the chart, the e2e suite drives the cluster.
if TOOLS_ENV="$(scripts/tools.sh)"; then
  eval "$TOOLS_ENV"
  export HELM KUBECTL
else
  echo "scripts/tools.sh could not install helm/kubectl; the tests that need them will fail" >&2
fi
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
echo "AWS endpoints: dynamodb=$AWS_ENDPOINT_URL_DYNAMODB kinesis=$AWS_ENDPOINT_URL_KINESIS sts=$AWS_ENDPOINT_URL_STS sqs=$AWS_ENDPOINT_URL_SQS"

# --- Rust ---------------------------------------------------------------------------------
run_phase format cargo fmt --all --check || true

# The demo and tests/status_live.rs run the binaries that scripts/build-bins.sh builds, with the
# tests' feature resolution; after the test build that adds only the bench's binaries.
build_nextest() { cargo nextest run --workspace --locked --profile ci --no-run && scripts/build-bins.sh; }
build_cargo() { cargo test --workspace --locked --no-run && scripts/build-bins.sh; }

# The real-cluster suites run in their own phase (below), one test at a time.
E2E_FILTER='binary(e2e) | binary(kubelet_standin)'
BUILT=0
if [[ "$RUNNER" == nextest ]]; then
  if run_phase build build_nextest; then
    BUILT=1
    run_phase tests cargo nextest run --workspace --locked --profile ci -E "not ($E2E_FILTER)" "${EXTRA_ARGS[@]}" || true
  else
    skip_phase tests "build failed"
  fi
else
  if run_phase build build_cargo; then
    BUILT=1
    run_phase tests cargo test --workspace --locked --lib --bins --tests "${EXTRA_ARGS[@]}" -- --skip e2e_ --skip kubelet_standin_ || true
  else
    skip_phase tests "build failed"
  fi
fi
run_phase doctests cargo test --workspace --locked --doc || true

# --- Helm chart ------------------------------------------------------------------------------
run_phase chart scripts/check-chart.sh || true

# --- e2e on a real control plane -----------------------------------------------------------
# Same feature resolution as the test build (--workspace), so nothing is rebuilt here.
e2e() {
  "$KUBE_SH" start "$KUBE_DIR" >/dev/null || return 1
  KUBE_STARTED=1
  export KUBECONFIG="$KUBE_DIR/kubeconfig" KCG_E2E=1
  if [[ "$RUNNER" == nextest ]]; then
    cargo nextest run --workspace --locked --profile ci -E "$E2E_FILTER" --no-capture
  else
    cargo test --workspace --locked --test e2e --test kubelet_standin -- --nocapture --test-threads=1
  fi
  local rc=$?
  "$KUBE_SH" stop "$KUBE_DIR" >/dev/null 2>&1 || true
  KUBE_STARTED=0
  return "$rc"
}
if ((!BUILT)); then
  skip_phase e2e "build failed"
elif [[ ! -x "$KUBE_SH" ]]; then
  skip_phase e2e "no Kubernetes control plane here ($KUBE_SH not found); the e2e suite needs one"
  echo "e2e skipped: $KUBE_SH not found (a real kube-apiserver is needed for tests/e2e.rs)" >&2
else
  run_phase e2e e2e || true
fi

# --- demo ------------------------------------------------------------------------------------
if [[ -x scripts/demo.sh ]]; then
  run_phase demo ./scripts/demo.sh --once || true
elif [[ -f scripts/demo.sh ]]; then
  run_phase demo bash scripts/demo.sh --once || true
else
  skip_phase demo "scripts/demo.sh not present"
fi

exit "$FAILED"
