{{/*
Standard name helpers. Kubernetes names and label values stop at 63 characters, so every
helper truncates there and trims a trailing "-".
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "trackb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified app name: fullnameOverride, else "<release>-<chart>", but just
"<release>" when the release name already contains the chart name.
*/}}
{{- define "trackb.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label ("+" is not allowed in label values). */}}
{{- define "trackb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object: the recommended app.kubernetes.io set. */}}
{{- define "trackb.labels" -}}
helm.sh/chart: {{ include "trackb.chart" . }}
{{ include "trackb.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trackb
{{- end }}

{{/* Selector labels: stable across upgrades, so never the version. */}}
{{- define "trackb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trackb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* A component's name: "<fullname>-<component>", truncated. Call with (list . "component"). */}}
{{- define "trackb.componentName" -}}
{{- $component := index . 1 }}
{{- $prefix := include "trackb.fullname" (index . 0) | trunc (int (sub 62 (len $component))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $component }}
{{- end }}

{{/* The launcher's ServiceAccount: kubernetes.service_account, shared with the Job builder. */}}
{{- define "trackb.serviceAccountName" -}}
{{- .Values.kubernetes.service_account }}
{{- end }}

{{/* The run id: launcher.runId, else the release name (so an upgrade resumes the run). */}}
{{- define "trackb.runId" -}}
{{- default .Release.Name .Values.launcher.runId | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The dev MinIO's in-cluster S3 endpoint. */}}
{{- define "trackb.minioEndpoint" -}}
{{- printf "http://%s.%s.svc:9000" (include "trackb.componentName" (list . "minio")) .Release.Namespace }}
{{- end }}

{{/*
values.kubernetes as the launcher and the Job builder read it (pipeline.yaml's
`kubernetes:`), with what only the chart knows filled in: the release namespace (the
Role is granted there and nowhere else) and, with the dev MinIO, its endpoint, bucket
and the NetworkPolicies' way to it.
*/}}
{{- define "trackb.kubernetesSettings" -}}
{{- $k := deepCopy .Values.kubernetes }}
{{- $_ := set $k "namespace" .Release.Namespace }}
{{- if .Values.minio.enabled }}
{{- $_ := set $k.s3 "endpoint_url" (include "trackb.minioEndpoint" .) }}
{{- $_ := set $k.s3 "store" (printf "s3://%s" .Values.minio.bucket) }}
{{- $_ := set $k.network "store_namespace" .Release.Namespace }}
{{- $_ := set $k.network "store_pod_labels" (include "trackb.minioSelectorLabels" . | fromYaml) }}
{{- end }}
{{- toYaml $k }}
{{- end }}

{{- define "trackb.minioSelectorLabels" -}}
{{ include "trackb.selectorLabels" . }}
app.kubernetes.io/component: minio-dev-only
{{- end }}

{{/* The store root: pipeline.store if set, else the Kubernetes settings' (dev MinIO included). */}}
{{- define "trackb.store" -}}
{{- $k := include "trackb.kubernetesSettings" . | fromYaml }}
{{- default $k.s3.store .Values.pipeline.store }}
{{- end }}

{{/* An image reference as ImagesConfig.ref builds it: <registry>/<name>:<tag>. */}}
{{- define "trackb.image" -}}
{{- $images := index . 0 }}
{{- $name := index . 1 }}
{{- $base := $name }}
{{- if $images.registry }}
{{- $base = printf "%s/%s" (trimSuffix "/" $images.registry) $name }}
{{- end }}
{{- $tail := last (splitList "/" $name) }}
{{- if or (contains ":" $tail) (contains "@" $tail) }}
{{- $base }}
{{- else }}
{{- printf "%s:%s" $base $images.tag }}
{{- end }}
{{- end }}

{{/*
Requests and limits from a KubernetesConfig Resources entry (cpu_request, memory_limit,
ephemeral_storage, gpus), the same mapping the Job builder uses.
*/}}
{{- define "trackb.resources" -}}
requests:
  cpu: {{ .cpu_request | quote }}
  memory: {{ .memory_request | quote }}
  ephemeral-storage: {{ .ephemeral_storage | quote }}
  {{- if .gpus }}
  nvidia.com/gpu: {{ .gpus }}
  {{- end }}
limits:
  cpu: {{ .cpu_limit | quote }}
  memory: {{ .memory_limit | quote }}
  ephemeral-storage: {{ .ephemeral_storage | quote }}
  {{- if .gpus }}
  nvidia.com/gpu: {{ .gpus }}
  {{- end }}
{{- end }}

{{/*
Environment for reaching the store, from the resolved kubernetes.s3. Credentials come
only through secretKeyRef to the existing Secret kubernetes.s3.credentials_secret;
nothing secret is ever rendered into a value. Call with the resolved settings dict.
*/}}
{{- define "trackb.s3Env" -}}
{{- with .s3.endpoint_url }}
- name: TRACKB_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .s3.credentials_secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.s3.access_key_id_key }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.s3.secret_access_key_key }}
{{- end }}
{{- end }}

{{/*
checkov suppressions of a chart-rendered Job, each with its reason, exactly as the Job
builder writes them for the same pod (trackb_core/k8s/jobspec.py _checkov_skips; a test
compares the two). Call with (dict "k" <settings> "images" <list of refs>
"secretEnv" <bool> "token" <bool>); renders annotation lines, or nothing.
*/}}
{{- define "trackb.checkovSkips" -}}
{{- $reasons := list }}
{{- $pinned := true }}
{{- range .images }}{{- if not (contains "@sha256:" .) }}{{- $pinned = false }}{{- end }}{{- end }}
{{- if not $pinned }}
{{- $reasons = append $reasons "CKV_K8S_43=images are pinned by release tag from make images; set kubernetes.images.* to name@sha256:... to pin digests" }}
{{- end }}
{{- if ne .k.images.pull_policy "Always" }}
{{- $reasons = append $reasons "CKV_K8S_15=release tags are immutable; IfNotPresent also runs images loaded into kind nodes (kubernetes.images.pull_policy)" }}
{{- end }}
{{- if .secretEnv }}
{{- $reasons = append $reasons "CKV_K8S_35=boto3 and huggingface_hub read credentials from the environment; they come only from secretKeyRef, never the manifest" }}
{{- end }}
{{- if .token }}
{{- $reasons = append $reasons "CKV_K8S_38=the launcher creates and watches the run's Jobs through the API, with the least-privilege Role of k8s/rbac.yaml" }}
{{- end }}
{{- range $i, $reason := $reasons }}
checkov.io/skip{{ add1 $i }}: {{ $reason | quote }}
{{- end }}
{{- end }}
