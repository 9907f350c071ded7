#!/usr/bin/env bash
# Check the Helm chart charts/kcg-operator, offline:
#   1. helm lint --strict (default values and each example values file);
#   2. helm template with default values and with each examples/values-*.yaml, piped through
#      kubernetes-validate --strict against Kubernetes 1.33 (custom resources such as the
#      ServiceMonitor are skipped by the tool: they are checked for presence instead); no
#      render holds a ServiceAccount besides the operator's own (the operator alone makes the
#      worker ServiceAccounts);
#   3. bad values files are rejected by values.schema.json (helm must fail);
#   4. example KinesisConsumerGroups (examples/*.yaml) validate against the CRD schema, strictly,
#      and example KEDA ScaledObjects against KEDA's CRD (vendored in tests/vendor/keda/);
#   5. the chart's CRD copy (files/, rendered by templates/crd.yaml so that `helm upgrade`
#      upgrades it) equals the generated crds/kinesisconsumergroups.kcg.dev.yaml byte for byte
#      (`scripts/check-chart.sh --sync-crd` copies it over) and passes kubernetes-validate; the
#      rendered CRD is that file plus the chart's labels and the keep annotation; crds.enabled
#      and crds.keep switch them off; the chart has no crds/ folder;
#   6. podMonitor.enabled renders a PodMonitor selecting the worker pods' `metrics` port.
#
# Tools come from scripts/tools.sh (installed into .tools/ on first use).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHART=charts/kcg-operator
CRD_NAME=kinesisconsumergroups.kcg.dev.yaml
K8S_VERSION="${KCG_K8S_VALIDATE_VERSION:-1.33.0}"

if [[ "${1:-}" == "--sync-crd" ]]; then
  cp "crds/$CRD_NAME" "$CHART/files/$CRD_NAME"
  echo "copied crds/$CRD_NAME -> $CHART/files/$CRD_NAME"
  exit 0
fi

eval "$(scripts/tools.sh)"
: "${HELM:?}" "${KUBERNETES_VALIDATE:?}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

failures=0
pass() { printf '  ok    %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*" >&2; failures=$((failures + 1)); }

RELEASE=kcg-operator
NS=kcg-system

echo "== helm lint --strict"
if out="$("$HELM" lint --strict "$CHART" 2>&1)"; then pass "lint (default values)"; else fail "lint (default values)"; echo "$out" >&2; fi
for f in examples/values-*.yaml; do
  [[ -e "$f" ]] || continue
  if out="$("$HELM" lint --strict "$CHART" -f "$f" 2>&1)"; then pass "lint -f $f"; else fail "lint -f $f"; echo "$out" >&2; fi
done

echo "== helm template | kubernetes-validate --strict -k $K8S_VERSION"
render_and_validate() {
  local label="$1" out="$WORK/rendered-$RANDOM.yaml"
  shift
  if ! "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" "$@" >"$out" 2>"$out.err"; then
    fail "template ($label)"; cat "$out.err" >&2; return 1
  fi
  if v="$("$KUBERNETES_VALIDATE" --strict -k "$K8S_VERSION" --quiet "$out" 2>&1)"; then
    pass "template + validate ($label): $(grep -c '^kind:' "$out") objects"
  else
    fail "kubernetes-validate ($label)"; echo "$v" >&2; return 1
  fi
  # Worker ServiceAccounts are the operator's alone: a chart-rendered one would make a later
  # `helm install` fail on the account the operator created ("invalid ownership metadata").
  if [[ "$(grep -c '^kind: ServiceAccount$' "$out")" -le 1 ]] \
      && ! grep -q '^    app.kubernetes.io/component: worker$' "$out"; then
    pass "$label: no ServiceAccount besides the operator's"
  else
    fail "$label: the chart renders a ServiceAccount besides the operator's (worker ServiceAccounts are the operator's to make)"
  fi
  RENDERED="$out"
}

RENDERED=""
if render_and_validate "default values"; then
  grep -q '^kind: ClusterRole$' "$RENDERED" && pass "default install is cluster-wide (ClusterRole)" \
    || fail "default install should render a ClusterRole"
  grep -q -- '- --namespace=' "$RENDERED" && fail "default install must not pass --namespace" || true
fi

for f in examples/values-*.yaml; do
  [[ -e "$f" ]] || continue
  render_and_validate "$f" -f "$f" || continue
  # Facts each example must keep; kubernetes-validate skips custom resources, so check them here.
  case "$f" in
    */values-eks-irsa.yaml)
      grep -q '^    eks.amazonaws.com/role-arn: arn:aws:iam::[0-9]*:role/kcg-operator$' "$RENDERED" \
        && grep -q -- '--worker-service-account-annotations={\\"eks.amazonaws.com/role-arn\\":\\"arn:aws:iam::[0-9]*:role/kcg-worker' "$RENDERED" \
        && pass "$f: IRSA role ARNs on the operator ServiceAccount and in --worker-service-account-annotations" \
        || fail "$f: expected eks.amazonaws.com/role-arn on the operator ServiceAccount and in --worker-service-account-annotations"
      grep -q '^kind: PodDisruptionBudget$' "$RENDERED" && pass "$f: PodDisruptionBudget" || fail "$f: PodDisruptionBudget missing"
      if grep -q '^kind: ServiceMonitor$' "$RENDERED" && grep -q 'path: /metrics' "$RENDERED"; then
        pass "$f: ServiceMonitor scraping /metrics"
      else
        fail "$f: ServiceMonitor missing"
      fi
      grep -q '^  replicas: 2$' "$RENDERED" && pass "$f: 2 replicas" || fail "$f: expected replicas: 2"
      ;;
  esac
done

# A namespaced install must not grant anything cluster-wide.
cat >"$WORK/namespaced.yaml" <<'EOF'
watchNamespaces: [team-a, team-b]
EOF
if render_and_validate "watchNamespaces: [team-a, team-b]" -f "$WORK/namespaced.yaml"; then
  if grep -qE '^kind: Cluster(Role|RoleBinding)$' "$RENDERED"; then
    fail "namespaced install rendered a ClusterRole/ClusterRoleBinding"
  else
    pass "namespaced install: no ClusterRole"
  fi
  [[ "$(grep -c '^kind: Role$' "$RENDERED")" -eq 3 ]] && pass "namespaced install: Roles in team-a, team-b + leader-election Role" \
    || fail "namespaced install: expected 3 Roles (2 watched namespaces + leases)"
  grep -q -- '- --namespace=team-a$' "$RENDERED" && grep -q -- '- --namespace=team-b$' "$RENDERED" \
    && pass "namespaced install: --namespace per watched namespace" || fail "namespaced install: --namespace args missing"
fi

echo "== values.schema.json rejects bad values"
bad_case() {
  local label="$1" content="$2" expect="$3" f="$WORK/bad-$RANDOM.yaml"
  printf '%s\n' "$content" >"$f"
  if out="$("$HELM" template "$RELEASE" "$CHART" -f "$f" 2>&1)"; then
    fail "bad values accepted ($label): $content"
  elif grep -q -- "$expect" <<<"$out"; then
    pass "rejected: $label"
  else
    fail "bad values ($label) failed for another reason than the schema:"; echo "$out" | head -5 >&2
  fi
}
bad_case 'replicaCount: "two"'           'replicaCount: "two"'                  "/replicaCount"
bad_case 'unknown top-level key'         'replicas: 2'                          "additional properties 'replicas' not allowed"
bad_case 'typo in a nested key'          'serviceMonitor: {enable: true}'        "additional properties 'enable' not allowed"
bad_case 'logFormat not json|text'       'logFormat: xml'                       "/logFormat"
bad_case 'invalid namespace name'        'watchNamespaces: [Team_A]'            "/watchNamespaces/0"
bad_case 'removed workerServiceAccount.extraNamespaces' 'workerServiceAccount: {create: true, name: "", annotations: {}, extraNamespaces: [team-a]}' "additional properties 'extraNamespaces' not allowed"
bad_case 'typo in crds'                  'crds: {enable: true}'                 "additional properties 'enable' not allowed"
bad_case 'podMonitor.interval not a duration' 'podMonitor: {enabled: true, interval: soon}' "/podMonitor/interval"
bad_case 'IRSA annotation not a string'  'serviceAccount: {create: true, name: "", annotations: {eks.amazonaws.com/role-arn: 5}}' "/serviceAccount/annotations"
# helm lint applies the schema too: a typo must fail lint as well.
printf 'replicas: 2\n' >"$WORK/lint-bad.yaml"
if "$HELM" lint --strict "$CHART" -f "$WORK/lint-bad.yaml" >/dev/null 2>&1; then
  fail "helm lint accepted an unknown values key"
else
  pass "helm lint rejects an unknown values key"
fi

echo "== examples: built-in kinds (e.g. the HPA) with kubernetes-validate --strict"
manifests=()
for f in examples/*.yaml; do [[ -e "$f" && "$f" != examples/values-* ]] && manifests+=("$f"); done
if ((${#manifests[@]})); then
  if v="$("$KUBERNETES_VALIDATE" --strict -k "$K8S_VERSION" --quiet --no-warn "${manifests[@]}" 2>&1)"; then
    pass "kubernetes-validate: ${#manifests[@]} example file(s)"
  else
    fail "kubernetes-validate on examples"; echo "$v" >&2
  fi
fi

echo "== examples vs the CRD's OpenAPI schema (strict: unknown fields are errors)"
# kubernetes-validate skips custom resources, so validate example KinesisConsumerGroups against
# the CRD's openAPIV3Schema here (CEL rules are checked by the Rust tests with kube's validator).
if [[ -f "crds/$CRD_NAME" ]]; then
  KV_PY="$(dirname "$KUBERNETES_VALIDATE")/python"
  if out="$("$KV_PY" - "crds/$CRD_NAME,tests/vendor/keda/keda.sh_scaledobjects.yaml" examples/*.yaml <<'PY' 2>&1
import copy, sys, yaml, jsonschema

crd_paths, files = sys.argv[1].split(","), sys.argv[2:]
schemas, kinds = {}, set()
for crd_path in crd_paths:
    crd = next(d for d in yaml.safe_load_all(open(crd_path)) if d)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    kinds.add(kind)
    for v in crd["spec"]["versions"]:
        if v.get("served"):
            schemas[(f'{group}/{v["name"]}', kind)] = v["schema"]["openAPIV3Schema"]

def strict(node):
    """Turn a structural schema into a JSON schema that rejects unknown fields, like the API
    server's strict field validation does (kubectl --validate=strict)."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: strict(v) for k, v in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    # An object without additionalProperties only admits its listed properties (none, if it
    # lists none) unless it preserves unknown fields; embedded resources keep their own rules.
    if node.get("type") in ("object", ["object", "null"]) and "additionalProperties" not in node \
            and not preserve and not node.get("x-kubernetes-embedded-resource"):
        node["additionalProperties"] = False
    for k in [k for k in node if k.startswith("x-kubernetes-")]:
        node.pop(k)
    return node

failed, checked = 0, 0
for path in files:
    if "/values-" in path:
        continue  # Helm values files, checked above
    for doc in yaml.safe_load_all(open(path)):
        if not isinstance(doc, dict) or doc.get("kind") not in kinds:
            continue
        kind = doc["kind"]
        checked += 1
        name = f'{path}: {kind}/{doc.get("metadata", {}).get("name")}'
        schema = schemas.get((doc.get("apiVersion"), kind))
        if schema is None:
            print(f"FAIL {name}: apiVersion {doc.get('apiVersion')} is not served by the CRD"); failed += 1; continue
        schema = strict(copy.deepcopy(schema))
        props = schema.setdefault("properties", {})
        props.update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            failed += 1
            for e in errors:
                print(f"FAIL {name}: at /{'/'.join(map(str, e.absolute_path))}: {e.message}")
        else:
            print(f"ok   {name}")
print(f"{checked} example resource(s) checked")
sys.exit(1 if failed or checked == 0 else 0)
PY
)"; then
    sed 's/^/  /' <<<"$out"
    pass "example KinesisConsumerGroups match the CRD schema, and ScaledObjects KEDA's"
  else
    sed 's/^/  /' <<<"$out" >&2
    fail "examples vs CRD schema (an example is invalid, or there is none)"
  fi
fi

echo "== CRD"
KV_PY="$(dirname "$KUBERNETES_VALIDATE")/python"
if [[ ! -f "crds/$CRD_NAME" ]]; then
  fail "crds/$CRD_NAME does not exist (generate it first)"
elif [[ ! -f "$CHART/files/$CRD_NAME" ]]; then
  fail "$CHART/files/$CRD_NAME is missing (run scripts/check-chart.sh --sync-crd)"
elif cmp -s "crds/$CRD_NAME" "$CHART/files/$CRD_NAME"; then
  pass "$CHART/files/$CRD_NAME equals crds/$CRD_NAME"
  if v="$("$KUBERNETES_VALIDATE" --strict -k "$K8S_VERSION" --quiet "crds/$CRD_NAME" 2>&1)"; then
    pass "CRD passes kubernetes-validate"
  else
    fail "CRD does not validate"; echo "$v" >&2
  fi
else
  fail "$CHART/files/$CRD_NAME differs from crds/$CRD_NAME (run scripts/check-chart.sh --sync-crd):"
  diff -u "crds/$CRD_NAME" "$CHART/files/$CRD_NAME" | head -20 >&2 || true
fi
# Helm would install a crds/ folder besides the template, and the two would clash.
[[ ! -e "$CHART/crds" ]] && pass "no $CHART/crds folder (the CRD is templates/crd.yaml)" \
  || fail "$CHART/crds exists: the CRD must only come from templates/crd.yaml"
# The rendered CRD: the generated one, plus the chart's labels and (crds.keep) the keep policy.
crd_render() { "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" -s templates/crd.yaml "$@" 2>&1; }
if out="$(crd_render | "$KV_PY" -c '
import sys, yaml
rendered = [d for d in yaml.safe_load_all(sys.stdin) if d]
want = yaml.safe_load(open(sys.argv[1]))
assert len(rendered) == 1, f"{len(rendered)} objects rendered"
got = rendered[0]
meta = got["metadata"]
assert meta.get("annotations", {}).get("helm.sh/resource-policy") == "keep", "no keep annotation"
assert meta.get("labels", {}).get("app.kubernetes.io/managed-by") == "Helm", "no chart labels"
meta.pop("labels"); meta.pop("annotations")
assert got == want, "the rendered CRD differs from the generated one"
' "crds/$CRD_NAME" 2>&1)"; then
  pass "templates/crd.yaml renders crds/$CRD_NAME, with the chart labels and helm.sh/resource-policy: keep"
else
  fail "templates/crd.yaml: $out"
fi
if out="$(crd_render --set crds.keep=false)" && ! grep -q 'resource-policy' <<<"$out" && grep -q '^kind: CustomResourceDefinition$' <<<"$out"; then
  pass "crds.keep=false: the CRD without the keep policy"
else
  fail "crds.keep=false should render the CRD without helm.sh/resource-policy"
fi
if ! "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" --set crds.enabled=false | grep -q '^kind: CustomResourceDefinition$'; then
  pass "crds.enabled=false: no CRD"
else
  fail "crds.enabled=false still renders the CRD"
fi

echo "== PodMonitor for the worker pods"
if out="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NS" --set podMonitor.enabled=true -s templates/podmonitor.yaml 2>&1)" \
    && grep -q '^kind: PodMonitor$' <<<"$out" && grep -q 'app.kubernetes.io/name: kcg-worker$' <<<"$out" \
    && grep -q -- '- port: metrics$' <<<"$out" && grep -q 'any: true$' <<<"$out"; then
  pass "podMonitor.enabled: a PodMonitor on port metrics of app.kubernetes.io/name=kcg-worker pods, all namespaces"
else
  fail "podMonitor.enabled: expected a PodMonitor selecting kcg-worker pods on port metrics"; echo "$out" >&2
fi
if out="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NS" --set podMonitor.enabled=true --set 'watchNamespaces={team-a}' -s templates/podmonitor.yaml 2>&1)" \
    && grep -A2 'matchNames:' <<<"$out" | grep -q -- '- team-a$'; then
  pass "podMonitor with watchNamespaces: only the watched namespaces"
else
  fail "podMonitor with watchNamespaces should select only those namespaces"; echo "$out" >&2
fi
"$HELM" template "$RELEASE" "$CHART" --namespace "$NS" | grep -q '^kind: PodMonitor$' \
  && fail "a PodMonitor is rendered by default" || pass "no PodMonitor by default"

if ((failures)); then
  echo "check-chart: $failures check(s) FAILED" >&2
  exit 1
fi
echo "check-chart: all checks passed"
