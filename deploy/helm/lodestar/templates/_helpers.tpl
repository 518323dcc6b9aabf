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
{{- $redisUrl := printf "%s://%s:%s/%v" (ternary "rediss" "redis" $v.redis.tls.enabled) (include "lodestar.redisHost" $root) (include "lodestar.redisPort" $root) $v.redis.db -}}
{{- $ks := $v.kafka.security -}}
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
  "LODESTAR_KAFKA__SECURITY_PROTOCOL" $ks.protocol
  "LODESTAR_SNAPSHOT_SIGNING__KEY_ID" $v.secrets.hmacKeyId
-}}
{{- $chartSecrets := dict -}}
{{- if include "lodestar.kafkaSasl" $root }}
{{- $_ := set $base "LODESTAR_KAFKA__SASL_MECHANISM" $ks.saslMechanism }}
{{- $_ := set $base "LODESTAR_KAFKA__SASL_USERNAME" (required "kafka.security.saslUsername is required with a SASL_* protocol" $ks.saslUsername) }}
{{- $_ := set $chartSecrets "LODESTAR_KAFKA__SASL_PASSWORD" (dict "key" $v.secrets.kafkaPasswordKey) }}
{{- end }}
{{- if include "lodestar.kafkaTls" $root }}
{{- $_ := set $base "LODESTAR_KAFKA__SSL_CHECK_HOSTNAME" $ks.checkHostname }}
{{- end }}
{{- if include "lodestar.kafkaCa" $root }}{{ $_ := set $base "LODESTAR_KAFKA__SSL_CAFILE" (printf "%s/ca.crt" (include "lodestar.kafkaCaDir" $root)) }}{{ end }}
{{- if $v.redis.tls.enabled }}
{{- $_ := set $base "LODESTAR_REDIS__SSL_CHECK_HOSTNAME" $v.redis.tls.checkHostname }}
{{- end }}
{{- if include "lodestar.redisCa" $root }}{{ $_ := set $base "LODESTAR_REDIS__SSL_CAFILE" (printf "%s/ca.crt" (include "lodestar.redisCaDir" $root)) }}{{ end }}
{{- if $v.redis.auth.enabled }}
{{- if $v.redis.auth.username }}{{ $_ := set $base "LODESTAR_REDIS__USERNAME" $v.redis.auth.username }}{{ end }}
{{- $_ := set $chartSecrets "LODESTAR_REDIS__PASSWORD" (dict "key" $v.secrets.redisPasswordKey) }}
{{- end }}
{{- if $v.secrets.acceptedHmacKeysKey }}
{{- $_ := set $chartSecrets "LODESTAR_SNAPSHOT_SIGNING__ACCEPTED_KEYS" (dict "key" $v.secrets.acceptedHmacKeysKey) }}
{{- end }}
{{- $plain := merge (deepCopy (default (dict) .env)) (deepCopy $v.env) (default (dict) .settings) $base -}}
{{- $secretRefs := merge (deepCopy (default (dict) .secretEnv)) (deepCopy $v.secretEnv) (default (dict) .secrets) $chartSecrets -}}
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


{{/* How the services reach Kafka, from kafka.security.protocol: "true" or "" (a template returns text). */}}
{{- define "lodestar.kafkaSasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.security.protocol }}true{{ end -}}
{{- end -}}

{{- define "lodestar.kafkaTls" -}}
{{- if has .Values.kafka.security.protocol (list "SSL" "SASL_SSL") }}true{{ end -}}
{{- end -}}

{{/* Whether a CA bundle is mounted from a Secret: Kafka's with SSL/SASL_SSL and caSecret, Redis's with TLS and
caSecret; and where (lodestar.env points ssl_cafile at <dir>/ca.crt). */}}
{{- define "lodestar.kafkaCa" -}}
{{- if and (include "lodestar.kafkaTls" .) .Values.kafka.security.caSecret }}true{{ end -}}
{{- end -}}

{{- define "lodestar.redisCa" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.caSecret }}true{{ end -}}
{{- end -}}

{{- define "lodestar.kafkaCaDir" -}}/etc/lodestar/kafka-tls{{- end -}}
{{- define "lodestar.redisCaDir" -}}/etc/lodestar/redis-tls{{- end -}}

{{/* The CA bundles as volumes of a pod, and the mounts of each of its Lodestar containers. */}}
{{- define "lodestar.tlsVolumes" -}}
{{- if include "lodestar.kafkaCa" . }}
- name: kafka-tls
  secret: {secretName: {{ .Values.kafka.security.caSecret }}, items: [{key: ca.crt, path: ca.crt}]}
{{- end }}
{{- if include "lodestar.redisCa" . }}
- name: redis-tls
  secret: {secretName: {{ .Values.redis.tls.caSecret }}, items: [{key: ca.crt, path: ca.crt}]}
{{- end }}
{{- end -}}

{{- define "lodestar.tlsMounts" -}}
{{- if include "lodestar.kafkaCa" . }}
- {name: kafka-tls, mountPath: {{ include "lodestar.kafkaCaDir" . }}, readOnly: true}
{{- end }}
{{- if include "lodestar.redisCa" . }}
- {name: redis-tls, mountPath: {{ include "lodestar.redisCaDir" . }}, readOnly: true}
{{- end }}
{{- end -}}
