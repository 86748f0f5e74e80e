{{- define "ztunnel.labels" -}}
app: ztunnel
app.kubernetes.io/name: ztunnel
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{- define "ztunnel.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub | default .Values.global.hub }}/{{ .Values.image }}:{{ .Values.tag | default .Values.global.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "ztunnel.checkNamespace" -}}
{{- if ne .Release.Namespace "istio-system" -}}
{{- fail (printf "install the ztunnel chart into istio-system, not %q: the control plane's CA trusts only the istio-system/ztunnel node account" .Release.Namespace) -}}
{{- end -}}
{{- end }}
