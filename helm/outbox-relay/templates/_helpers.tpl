{{- define "outbox-relay.fullname" -}}
{{- printf "%s-%s" .Release.Name "outbox-relay" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "outbox-relay.labels" -}}
app.kubernetes.io/name: outbox-relay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "outbox-relay.env" -}}
- name: OUTBOX_RELAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.secretName }}
      key: {{ .Values.database.secretKey }}
- name: OUTBOX_RELAY_WORKERS
  value: {{ .Values.config.workers | quote }}
- name: OUTBOX_RELAY_OVERFLOW
  value: {{ .Values.config.overflow | quote }}
- name: OUTBOX_RELAY_SLOT
  value: {{ .Values.config.slot | quote }}
- name: OUTBOX_RELAY_PUBLICATION
  value: {{ .Values.config.publication | quote }}
- name: OUTBOX_RELAY_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: OUTBOX_RELAY_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: OUTBOX_RELAY_HTTP_ADDR
  value: {{ printf ":%v" .Values.metrics.port | quote }}
{{- with .Values.config.allowNetworks }}
- name: OUTBOX_RELAY_ALLOW_NETWORKS
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.preset }}
- name: OUTBOX_RELAY_PRESET
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The relay container. An application chart adds it to its pod's containers:
  containers:
    - name: app
      ...
    {{- include "outbox-relay.sidecar" (dict "Values" .Values.outboxRelay "Release" .Release "Chart" (dict "AppVersion" "0.1.0")) | nindent 4 }}
*/}}
{{- define "outbox-relay.sidecar" -}}
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
    initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    initialDelaySeconds: {{ .Values.probes.readiness.initialDelaySeconds }}
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end -}}

{{/* The migrate init container, for the application's initContainers. */}}
{{- define "outbox-relay.migrate" -}}
{{- if .Values.migrate.enabled }}
- name: outbox-relay-migrate
  image: {{ include "outbox-relay.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["migrate"]
  env:
    {{- include "outbox-relay.env" . | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}
{{- end -}}
