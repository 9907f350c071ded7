{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "kcg-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release-chart, unless the release name already contains the chart name.
*/}}
{{- define "kcg-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kcg-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels shared by everything the chart creates (no component).
*/}}
{{- define "kcg-operator.baseLabels" -}}
helm.sh/chart: {{ include "kcg-operator.chart" . }}
app.kubernetes.io/name: {{ include "kcg-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kcg
{{- end }}

{{/*
Labels of the operator's own objects.
*/}}
{{- define "kcg-operator.labels" -}}
{{ include "kcg-operator.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kcg-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kcg-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Operator ServiceAccount name.
*/}}
{{- define "kcg-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kcg-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Default worker ServiceAccount name (passed as --worker-service-account). The chart renders no
worker ServiceAccount: with workerServiceAccount.create the operator creates it in each
namespace with a group that uses it; otherwise the user provides it.
*/}}
{{- define "kcg-operator.workerServiceAccountName" -}}
{{- if .Values.workerServiceAccount.create }}
{{- default (printf "%s-worker" (include "kcg-operator.fullname" .) | trunc 63 | trimSuffix "-") .Values.workerServiceAccount.name }}
{{- else }}
{{- default "default" .Values.workerServiceAccount.name }}
{{- end }}
{{- end }}

{{- define "kcg-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kcg-operator.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) }}
{{- end }}

{{/*
RBAC rules the reconciler needs wherever groups live. Least privilege: no secrets, no pods.
*/}}
{{- define "kcg-operator.rules" -}}
# The groups: watched, finalized, and their status written back.
- apiGroups: ["kcg.dev"]
  resources: ["kinesisconsumergroups"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["kcg.dev"]
  resources: ["kinesisconsumergroups/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["kcg.dev"]
  resources: ["kinesisconsumergroups/finalizers"]
  verbs: ["update"]
# Each group becomes a worker Deployment and a ConfigMap holding the rendered worker config.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# The workers' PodDisruptionBudget: watched as an owned object (read once before the watch
# has seen it), server-side applied only on a difference (a PATCH
# that creates it is authorized as create too), deleted when the spec no longer wants one.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- if .Values.workerServiceAccount.create }}
# The workers' default ServiceAccount, which only the operator makes: server-side applied in
# a group's namespace where it is missing, and again when an account the operator made has
# stale annotations (never deleted; an account it did not make is only read). get and patch
# are limited to its name; create cannot be (the object does not exist yet), and an apply
# that creates the object is authorized as create too.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  resourceNames: [{{ include "kcg-operator.workerServiceAccountName" . | quote }}]
  verbs: ["get", "patch"]
{{- end }}
# Events on the groups (kube-rs' Recorder uses events.k8s.io/v1).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
