{{/* Names, labels, the image, connection endpoints and the environment every Lodestar container gets. */}}

{{- define "lodestar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lodestar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "lodestar.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "lodestar.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "dispatcher") */}}
{{- define "lodestar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lodestar.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "lodestar.labels" -}}
{{ include "lodestar.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: lodestar
{{- end -}}

{{/* The label of every pod that talks to Kafka and Redis as a Lodestar client (NetworkPolicies select it). */}}
{{- define "lodestar.clientLabel" -}}
lodestar.io/client: {{ .Release.Name | quote }}
{{- end -}}

{{- define "lodestar.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "lodestar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lodestar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lodestar.secretName" -}}
{{- default (include "lodestar.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "lodestar.kafkaBootstrap" -}}
{{- if .Values.kafka.deploy -}}
{{- printf "%s-kafka.%s.svc:9092" (include "lodestar.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "kafka.bootstrapServers is required when kafka.deploy is false" .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{- define "lodestar.kafkaPort" -}}
{{- if .Values.kafka.deploy }}9092{{ else }}{{ .Values.kafka.port }}{{ end -}}
{{- end -}}

{{- define "lodestar.redisHost" -}}
{{- if .Values.redis.deploy -}}
{{- printf "%s-redis.%s.svc" (include "lodestar.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.host is required when redis.deploy is false" .Values.redis.host -}}
{{- end -}}
{{- end -}}

{{- define "lodestar.redisPort" -}}
{{- if .Values.redis.deploy }}6379{{ else }}{{ .Values.redis.port }}{{ end -}}
{{- end -}}

{{- define "lodestar.requestsTopic" -}}
{{- printf "%srequests" .Values.kafka.topicPrefix -}}
{{- end -}}

{{/*
The environment of a Lodestar container: (dict "root" $ "settings" (dict NAME value) "secrets" (dict NAME
{key}) "env" component.env "secretEnv" component.secretEnv "podName" bool). Settings the chart derives from
values come first; the release-wide `env`/`secretEnv` override them, and the component's override those.
References (the pod name, Secrets) are listed before the plain values, so `$(NAME)` in a value expands.
*/}}
{{- define "lodestar.env" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $redisUrl := printf "redis://%s:%s/%v" (include "lodestar.redisHost" $root) (include "lodestar.redisPort" $root) $v.redis.db -}}
{{- if $v.redis.auth.enabled -}}
{{- $redisUrl = printf "redis://:$(REDIS_PASSWORD)@%s:%s/%v" (include "lodestar.redisHost" $root) (include "lodestar.redisPort" $root) $v.redis.db -}}
{{- end -}}
{{- $replication := $v.kafka.replicationFactor -}}
{{- if $v.kafka.deploy }}{{ $replication = 1 }}{{ end -}}
{{- $base := dict
  "LODESTAR_KAFKA__BOOTSTRAP_SERVERS" (include "lodestar.kafkaBootstrap" $root)
  "LODESTAR_KAFKA__TOPIC_PREFIX" $v.kafka.topicPrefix
  "LODESTAR_KAFKA__REQUEST_PARTITIONS" $v.kafka.requestPartitions
  "LODESTAR_KAFKA__WORKER_PARTITIONS" $v.kafka.workerPartitions
  "LODESTAR_KAFKA__RESULTS_PARTITIONS" $v.kafka.resultsPartitions
  "LODESTAR_KAFKA__TELEMETRY_PARTITIONS" $v.kafka.telemetryPartitions
  "LODESTAR_KAFKA__REPLICATION_FACTOR" $replication
  "LODESTAR_REDIS__URL" $redisUrl
  "LODESTAR_REDIS__KEY_PREFIX" $v.redis.keyPrefix
  "LODESTAR_TELEMETRY__EXPORTER" $v.telemetry.exporter
  "LODESTAR_TELEMETRY__OTLP_ENDPOINT" $v.telemetry.otlpEndpoint
  "LODESTAR_TELEMETRY__LOG_LEVEL" $v.telemetry.logLevel
  "LODESTAR_TELEMETRY__METRICS_HOST" "0.0.0.0"
  "HOME" "/tmp"
-}}
{{- $plain := merge (deepCopy (default (dict) .env)) (deepCopy $v.env) (default (dict) .settings) $base -}}
{{- $secretRefs := merge (deepCopy (default (dict) .secretEnv)) (deepCopy $v.secretEnv) (default (dict) .secrets) -}}
{{- range $name, $_ := $secretRefs }}
{{- if hasKey $plain $name }}
{{- fail (printf "%s is set both as a plain value and from a Secret" $name) }}
{{- end }}
{{- end }}
{{- if .podName }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- if $v.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "lodestar.secretName" $root }}
      key: {{ $v.secrets.redisPasswordKey }}
{{- end }}
{{- range $name, $ref := $secretRefs }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ default (include "lodestar.secretName" $root) $ref.name }}
      key: {{ required (printf "secretEnv %s needs a key" $name) $ref.key }}
{{- end }}
{{- range $name, $value := $plain }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Liveness and readiness probes of a Lodestar service container (lodestar/health.py). */}}
{{- define "lodestar.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
{{- end -}}

{{/* The writable scratch space of a container whose root filesystem is read-only. */}}
{{- define "lodestar.tmpVolume" -}}
- name: tmp
  emptyDir: {sizeLimit: 256Mi}
{{- end -}}

{{- define "lodestar.podSecurity" -}}
automountServiceAccountToken: false
serviceAccountName: {{ include "lodestar.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
