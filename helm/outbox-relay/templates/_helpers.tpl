{{/*
Public templates, for an application chart that depends on this one:

  initContainers:
    {{- include "outbox-relay.migrate" . | nindent 8 }}
  containers:
    - name: app
      ...
    {{- include "outbox-relay.sidecar" . | nindent 8 }}

Both take the application chart's root context and find this chart's scope
(its values, coalesced with the defaults, and its appVersion) in
.Subcharts "outbox-relay". They also take this chart's own root context, or
a subchart scope passed explicitly: (index .Subcharts "relay") when the
dependency has the alias "relay".
*/}}

{{/* The relay container, as one item of a containers list. */}}
{{- define "outbox-relay.sidecar" -}}
{{- $s := . -}}
{{- if and (kindIs "map" .) (hasKey . "Subcharts") (hasKey .Subcharts "outbox-relay") -}}
{{- $s = index .Subcharts "outbox-relay" -}}
{{- end -}}
{{- include "outbox-relay.container" $s -}}
{{- end -}}

{{/* The migrate init container (nothing when migrate.enabled is false). */}}
{{- define "outbox-relay.migrate" -}}
{{- $s := . -}}
{{- if and (kindIs "map" .) (hasKey . "Subcharts") (hasKey .Subcharts "outbox-relay") -}}
{{- $s = index .Subcharts "outbox-relay" -}}
{{- end -}}
{{- include "outbox-relay.initContainer" $s -}}
{{- end -}}

{{/* Everything below takes this chart's scope. */}}

{{- define "outbox-relay.fullname" -}}
{{- printf "%s-%s" .Release.Name "outbox-relay" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: outbox-relay
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "outbox-relay.labels" -}}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The database URL, always from an existing Secret. */}}
{{- define "outbox-relay.databaseEnv" -}}
- name: OUTBOX_RELAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.secretName: the Secret holding the database URL" .Values.database.secretName }}
      key: {{ required "database.secretKey: the key of the database URL in the Secret" .Values.database.secretKey }}
- name: OUTBOX_RELAY_SLOT
  value: {{ .Values.config.slot | quote }}
- name: OUTBOX_RELAY_PUBLICATION
  value: {{ .Values.config.publication | quote }}
{{- end -}}

{{- define "outbox-relay.env" -}}
{{ include "outbox-relay.databaseEnv" . }}
- name: OUTBOX_RELAY_HTTP_ADDR
  value: {{ printf ":%v" .Values.metrics.port | quote }}
- name: OUTBOX_RELAY_OVERFLOW
  value: {{ .Values.config.overflow | quote }}
- name: OUTBOX_RELAY_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: OUTBOX_RELAY_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
{{- with .Values.config.allowNetworks }}
- name: OUTBOX_RELAY_ALLOW_NETWORKS
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.workers }}
- name: OUTBOX_RELAY_WORKERS
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.preset }}
- name: OUTBOX_RELAY_PRESET
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.shutdownGrace }}
- name: OUTBOX_RELAY_SHUTDOWN_GRACE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.memoryLimit }}
{{- $bytes := . }}
{{- if kindIs "float64" $bytes }}{{ $bytes = int64 $bytes }}{{ end }}
{{- if not (regexMatch "^-?[0-9]+$" (toString $bytes)) }}
{{- fail (printf "config.memoryLimit must be a number of bytes, such as 362387865 (got %v)" .) }}
{{- end }}
- name: OUTBOX_RELAY_MEMORY_LIMIT
  value: {{ toString $bytes | quote }}
{{- end }}
{{- with .Values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "outbox-relay.container" -}}
{{- if not (has .Values.config.overflow (list "spill" "block")) }}
{{- fail (printf "config.overflow must be spill or block (got %q)" .Values.config.overflow) }}
{{- end }}
{{- if not (has .Values.config.logFormat (list "text" "json")) }}
{{- fail (printf "config.logFormat must be text or json (got %q)" .Values.config.logFormat) }}
{{- end -}}
- name: outbox-relay
  image: {{ include "outbox-relay.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run"]
  env:
    {{- include "outbox-relay.env" . | nindent 4 }}
  ports:
    - name: metrics
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end -}}

{{/*
migrate needs only the database URL, the slot and the publication; it is
idempotent and serialised by an advisory lock in schema.sql, so every
replica may run it.
*/}}
{{- define "outbox-relay.initContainer" -}}
{{- if .Values.migrate.enabled -}}
- name: outbox-relay-migrate
  image: {{ include "outbox-relay.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["migrate"]
  env:
    {{- include "outbox-relay.databaseEnv" . | nindent 4 }}
  resources:
    {{- toYaml (.Values.migrate.resources | default .Values.resources) | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}
{{- end -}}
