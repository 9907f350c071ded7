#!/usr/bin/env bash
# Builds the workspace's binaries (kcg-worker, kcg-operator, kcg-produce, ...) into target/debug
# for the demo and the tests that spawn real processes.
#
# `--tests` is deliberate: it makes cargo resolve features the way `cargo test`/nextest do (with
# dev-dependencies, e.g. tokio's test-util through tower-test). A plain `cargo build -p ...
# --bins` resolves them differently and so rebuilds tokio, the AWS SDK and kube a second time:
# minutes on 2 cores and another GB of target/. After a test build this is a no-op.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${CARGO:-cargo}" build --locked --workspace --bins --tests "$@"
