{{/*
Names and labels. Helpers that concern one component take a dict:
  (dict "ctx" $ "component" "api")
*/}}

{{- define "echo-at-time.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "echo-at-time.fullname" -}}
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

{{/* "<fullname>-<component>", within 63 characters. */}}
{{- define "echo-at-time.componentName" -}}
{{- printf "%s-%s" (include "echo-at-time.fullname" .ctx | trunc 52 | trimSuffix "-") .component }}
{{- end }}

{{- define "echo-at-time.selectorLabels" -}}
app.kubernetes.io/name: {{ include "echo-at-time.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "echo-at-time.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "echo-at-time.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: echo-at-time
{{- end }}

{{- define "echo-at-time.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "echo-at-time.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret with keys redis-url, api-token (optional), zk-auth (optional). */}}
{{- define "echo-at-time.secretName" -}}
{{- default (include "echo-at-time.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "echo-at-time.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
A number as an environment value. Helm reads YAML numbers as float64, and a
float64 of 1000000 would print as "1e+06", which an integer setting refuses:
whole numbers are printed as integers, others as they are.
*/}}
{{- define "echo-at-time.num" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ . | int64 }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
Environment of a component's container: the Redis URL from the Secret, the
API token for the API only, ZooKeeper credentials for the schedulers only, the
webhook secret for the workers only,
the health server for schedulers and workers, and the tunables.
*/}}
{{- define "echo-at-time.env" -}}
{{- $v := .ctx.Values -}}
- name: EAT_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "echo-at-time.secretName" .ctx }}
      key: redis-url
{{- if eq .component "api" }}
- name: EAT_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "echo-at-time.secretName" .ctx }}
      key: api-token
      optional: true
{{- end }}
{{- if eq .component "scheduler" }}
- name: EAT_ZK_AUTH
  valueFrom:
    secretKeyRef:
      name: {{ include "echo-at-time.secretName" .ctx }}
      key: zk-auth
      optional: true
{{- end }}
{{- if eq .component "worker" }}
- name: EAT_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "echo-at-time.secretName" .ctx }}
      key: webhook-secret
      optional: true
{{- end }}
{{- if ne .component "api" }}
- name: EAT_HEALTH_HOST
  value: "0.0.0.0"
- name: EAT_HEALTH_PORT
  value: {{ include "echo-at-time.num" $v.healthPort | quote }}
{{- end }}
{{- if $v.redis.tls.caSecret }}
- name: EAT_REDIS_CA_FILE
  value: {{ printf "/etc/echo-at-time/redis-ca/%s" $v.redis.tls.caKey | quote }}
{{- end }}
- name: EAT_ZK_HOSTS
  value: {{ $v.zookeeper.hosts | quote }}
- name: EAT_PREFIX
  value: {{ $v.prefix | quote }}
- name: EAT_ZK_SESSION_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.zkSessionTimeout | quote }}
- name: EAT_VISIBILITY_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.visibilityTimeout | quote }}
- name: EAT_MAX_DELIVERIES
  value: {{ include "echo-at-time.num" $v.config.maxDeliveries | quote }}
- name: EAT_HANDLER_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.handlerTimeout | quote }}
- name: EAT_MAX_MESSAGE_BYTES
  value: {{ include "echo-at-time.num" $v.config.maxMessageBytes | quote }}
- name: EAT_RETENTION
  value: {{ include "echo-at-time.num" $v.config.retention | quote }}
- name: EAT_RETRY_BASE
  value: {{ include "echo-at-time.num" $v.config.retryBase | quote }}
- name: EAT_RETRY_MAX
  value: {{ include "echo-at-time.num" $v.config.retryMax | quote }}
- name: EAT_PROMOTE_BATCH
  value: {{ include "echo-at-time.num" $v.config.promoteBatch | quote }}
- name: EAT_READ_COUNT
  value: {{ include "echo-at-time.num" $v.config.readCount | quote }}
- name: EAT_DEAD_MAXLEN
  value: {{ include "echo-at-time.num" $v.config.deadMaxlen | quote }}
- name: EAT_LOG_FORMAT
  value: {{ $v.config.logFormat | quote }}
- name: EAT_LOG_LEVEL
  value: {{ $v.config.logLevel | quote }}
- name: EAT_LEGACY_HTTP
  value: {{ $v.config.legacyHttp | quote }}
- name: EAT_LEGACY_BRIDGE
  value: {{ $v.config.legacyBridge | quote }}
- name: EAT_LEGACY_QUEUE
  value: {{ $v.config.legacyQueue | quote }}
- name: EAT_LEGACY_DELAYED
  value: {{ $v.config.legacyDelayed | quote }}
- name: EAT_LEGACY_IN_FLIGHT
  value: {{ $v.config.legacyInFlight | quote }}
- name: EAT_REDIS_CLUSTER
  value: {{ $v.redis.cluster | default "auto" | quote }}
- name: EAT_PARTITIONS
  value: {{ include "echo-at-time.num" $v.config.partitions | quote }}
- name: EAT_WAIT_REPLICAS
  value: {{ include "echo-at-time.num" $v.config.waitReplicas | quote }}
- name: EAT_WAIT_TIMEOUT_MS
  value: {{ include "echo-at-time.num" $v.config.waitTimeoutMs | quote }}
- name: EAT_ALLOW_EVICTION
  value: {{ $v.config.allowEviction | quote }}
- name: EAT_MEMORY_POLICY_INTERVAL
  value: {{ include "echo-at-time.num" $v.config.memoryPolicyInterval | quote }}
- name: EAT_HTTP_MAX_HEADER_BYTES
  value: {{ include "echo-at-time.num" $v.config.httpMaxHeaderBytes | quote }}
- name: EAT_HTTP_HEADER_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.httpHeaderTimeout | quote }}
- name: EAT_HTTP_BODY_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.httpBodyTimeout | quote }}
- name: EAT_HTTP_SEND_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.httpSendTimeout | quote }}
- name: EAT_HTTP_IDLE_TIMEOUT
  value: {{ include "echo-at-time.num" $v.config.httpIdleTimeout | quote }}
- name: EAT_HTTP_MAX_BUFFERED_BYTES
  value: {{ include "echo-at-time.num" $v.config.httpMaxBufferedBytes | quote }}
- name: EAT_HTTP_MAX_CONNECTIONS
  value: {{ include "echo-at-time.num" $v.config.httpMaxConnections | quote }}
- name: EAT_WEBHOOK_URL
  value: {{ $v.webhook.url | quote }}
- name: EAT_WEBHOOK_ALLOW
  value: {{ $v.webhook.allow | quote }}
- name: EAT_WEBHOOK_TIMEOUT
  value: {{ include "echo-at-time.num" $v.webhook.timeout | quote }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level settings shared by every component: service account, pod security
context, grace period, spreading over nodes, scheduling, volumes.
*/}}
{{- define "echo-at-time.podSpec" -}}
{{- $v := .ctx.Values -}}
serviceAccountName: {{ include "echo-at-time.serviceAccountName" .ctx }}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ include "echo-at-time.num" $v.terminationGracePeriodSeconds }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ include "echo-at-time.num" $v.securityContext.runAsUser }}
  runAsGroup: {{ include "echo-at-time.num" $v.securityContext.runAsGroup }}
  fsGroup: {{ include "echo-at-time.num" $v.securityContext.fsGroup }}
  seccompProfile:
    type: RuntimeDefault
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "echo-at-time.selectorLabels" . | nindent 8 }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  # The root filesystem is read-only; /tmp is the one writable place.
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
  {{- if $v.redis.tls.caSecret }}
  - name: redis-ca
    secret:
      secretName: {{ $v.redis.tls.caSecret }}
  {{- end }}
{{- end }}

{{/* Container settings shared by every component: image, security context, mounts. */}}
{{- define "echo-at-time.container" -}}
image: {{ include "echo-at-time.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ include "echo-at-time.num" .Values.securityContext.runAsUser }}
  runAsGroup: {{ include "echo-at-time.num" .Values.securityContext.runAsGroup }}
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- if .Values.redis.tls.caSecret }}
  - name: redis-ca
    mountPath: /etc/echo-at-time/redis-ca
    readOnly: true
  {{- end }}
{{- end }}

{{/* Pod annotations: a checksum of the chart's Secret rolls the pods when it changes. */}}
{{- define "echo-at-time.podAnnotations" -}}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A worker drains for up to the visibility timeout: the grace period must outlast it. */}}
{{- define "echo-at-time.checkGracePeriod" -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (float64 .Values.config.visibilityTimeout) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than config.visibilityTimeout (%v): a worker drains for up to the visibility timeout on SIGTERM" .Values.terminationGracePeriodSeconds .Values.config.visibilityTimeout) }}
{{- end }}
{{- end }}

{{/*
PromQL label matchers for this release's series: prometheusRule.selector, else those
the chart's ServiceMonitor makes (its job label is the name of the Service scraped).
*/}}
{{- define "echo-at-time.metricSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q,job=~%q" .Release.Namespace (printf "%s-(api|scheduler-metrics|worker-metrics)" (include "echo-at-time.fullname" . | trunc 52 | trimSuffix "-")) }}
{{- end }}
{{- end }}

{{/*
A partition's stream, as app/store/keys.py spells it: "{<prefix>}:stream" with one
partition, "{<prefix>:<p>}:stream" with several.
*/}}
{{- define "echo-at-time.stream" -}}
{{- if eq (int .partitions) 1 -}}
{{ printf "{%s}:stream" .prefix }}
{{- else -}}
{{ printf "{%s:%d}:stream" .prefix (int .partition) }}
{{- end -}}
{{- end }}

{{/*
The KEDA formula adding every partition's trigger: "p0 + p1 + ...".
*/}}
{{- define "echo-at-time.partitionSum" -}}
{{- $names := list -}}
{{- range $p := until (int .) -}}
{{- $names = append $names (printf "p%d" $p) -}}
{{- end -}}
{{ join " + " $names }}
{{- end }}
