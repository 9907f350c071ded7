# syntax=docker/dockerfile:1
# kcg-worker image: consumer engine: one worker process of a Kinesis consumer group.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t ghcr.io/kcg-dev/kcg-worker:0.1.0 .
#
# Stages: chef (cargo-chef) -> planner (dependency recipe) -> builder (dependencies cached in
# their own layer, rebuilt only when Cargo.toml/Cargo.lock change; then the workspace)
# -> runtime (distroless, non-root, no shell).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
# cmake: aws-lc-sys (rustls' crypto provider) may build its C code with it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The cached dependency layer.
RUN cargo chef cook --release --recipe-path recipe.json -p kcg-worker
COPY . .
RUN cargo build --release --locked -p kcg-worker --bin kcg-worker \
 && cp target/release/kcg-worker /usr/local/bin/kcg-worker

# glibc + libgcc + CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="kcg-worker" \
      org.opencontainers.image.description="kcg consumer engine: one worker process of a Kinesis consumer group" \
      org.opencontainers.image.source="https://github.com/kcg-dev/kcg" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /usr/local/bin/kcg-worker /usr/local/bin/kcg-worker
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kcg-worker"]
