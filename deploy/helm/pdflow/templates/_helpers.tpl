{{/* The release's full name, at most 40 characters so that every name built on it fits 63. */}}
{{- define "pdflow.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdflow.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selects every pod of the release (the NetworkPolicy's peers). */}}
{{- define "pdflow.releaseSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pdflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pdflow.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* The in-cluster name of the head's internal Service: Ray and the admin API, ready or not. */}}
{{- define "pdflow.headInternal" -}}
{{ include "pdflow.fullname" . }}-head-internal.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* The pool workload's name; the head's config names the same (kubernetes.*_workload). */}}
{{- define "pdflow.poolName" -}}
{{ include "pdflow.fullname" .root }}-{{ .role }}
{{- end -}}

{{/* The ClusterConfig the pods run with: the user's config, then what the chart owns. */}}
{{- define "pdflow.clusterConfig" -}}
{{- $owned := dict
  "frontdoor" (dict "host" "0.0.0.0" "http_port" .Values.head.service.httpPort "grpc_port" .Values.head.service.grpcPort)
  "controller" (dict "admin_host" "0.0.0.0" "admin_port" .Values.head.adminPort)
  "worker" (dict "start_timeout_s" .Values.pools.startupSeconds)
  "kubernetes" (dict
    "pools" "kubernetes"
    "namespace" .Release.Namespace
    "workload_kind" .Values.pools.kind
    "prefill_workload" (include "pdflow.poolName" (dict "root" . "role" "prefill"))
    "decode_workload" (include "pdflow.poolName" (dict "root" . "role" "decode")))
-}}
{{- if .Values.head.tlsSecret -}}
{{- $_ := set $owned.frontdoor "tls_cert_file" "/etc/pdflow-tls/tls.crt" -}}
{{- $_ := set $owned.frontdoor "tls_key_file" "/etc/pdflow-tls/tls.key" -}}
{{- end -}}
{{- if .Values.model.volume -}}
{{- $_ := set $owned "model" (dict "path" (printf "%s/%s" .Values.model.mountPath .Values.model.subPath | trimSuffix "/")) -}}
{{- else if not .Values.model.embedded -}}
{{- fail "model.volume is empty: mount the model directory (e.g. --set model.volume.persistentVolumeClaim.claimName=models), or set model.embedded=true with the demo image, which carries SmolLM2" -}}
{{- end -}}
{{- if lt (int .Values.pools.terminationGracePeriodSeconds) (add (int .Values.pools.drainTimeoutSeconds) 60 | int) -}}
{{- fail (printf "pools.terminationGracePeriodSeconds (%v) must be at least pools.drainTimeoutSeconds (%v) + 60: the preStop drain, then the worker's own stop" .Values.pools.terminationGracePeriodSeconds .Values.pools.drainTimeoutSeconds) -}}
{{- end -}}
{{- $config := mergeOverwrite (deepCopy .Values.config) $owned -}}
{{- toYaml $config -}}
{{- end -}}

{{- define "pdflow.mounts" -}}
- name: config
  mountPath: /etc/pdflow
  readOnly: true
- name: auth
  mountPath: /etc/pdflow-auth
  readOnly: true
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pdflow.volumes" -}}
- name: config
  configMap:
    name: {{ include "pdflow.fullname" . }}-config
{{- if .Values.model.volume }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "pdflow.authSecretName" -}}
{{ .Values.auth.existingSecret | default (printf "%s-auth" (include "pdflow.fullname" .)) }}
{{- end -}}

{{/* The credentials a pod needs, by role (protocol/auth.py): the head serves the APIs and the admin API; a
pool pod serves a KV side channel and calls the admin API from its preStop hook; both run Ray. Files, from
the auth Secret: `pdflow.authEnv` names them, `pdflow.authVolume` mounts only the role's own. */}}
{{- define "pdflow.authKeys" -}}
{{- if eq .role "head" -}}
api-keys metrics-token admin-token ray-token
{{- else -}}
cluster-secret admin-token ray-token
{{- end -}}
{{- end -}}

{{- define "pdflow.authEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
{{- range $key := splitList " " (include "pdflow.authKeys" .) }}
- name: {{ if eq $key "ray-token" }}RAY_AUTH_TOKEN_PATH{{ else }}PDFLOW_{{ $key | upper | replace "-" "_" }}_FILE{{ end }}
  value: /etc/pdflow-auth/{{ $key }}
{{- end }}
{{- end -}}

{{- define "pdflow.authVolume" -}}
- name: auth
  secret:
    secretName: {{ include "pdflow.authSecretName" .root }}
    items:
      {{- range $key := splitList " " (include "pdflow.authKeys" .) }}
      - {key: {{ $key }}, path: {{ $key }}}
      {{- end }}
{{- end -}}

{{/* Every pdflow container's environment. Ray's own processes inherit it (`ray start` runs first). */}}
{{- define "pdflow.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: PDFLOW__KV__SIDE_CHANNEL_HOST  # the KV side channel listens on the pod's own address
  value: $(POD_IP)
- name: VLLM_NIXL_SIDE_CHANNEL_HOST  # the same for vLLM's NixlConnector (kv.connector: nixl)
  value: $(POD_IP)
- name: PDFLOW_ADMIN
  value: {{ include "pdflow.headInternal" . }}:{{ .Values.head.adminPort }}
- {name: HF_HUB_OFFLINE, value: "1"}
- {name: RAY_USAGE_STATS_ENABLED, value: "0"}
- {name: RAY_DEDUP_LOGS, value: "0"}
- {name: NIXL_LOG_LEVEL, value: WARN}
- {name: VLLM_LOGGING_LEVEL, value: WARNING}
- {name: TOKENIZERS_PARALLELISM, value: "false"}
{{- end -}}
