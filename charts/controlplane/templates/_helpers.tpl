{{- define "controlplane.labels" -}}
app: controlplane
app.kubernetes.io/name: controlplane
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{- define "controlplane.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub | default .Values.global.hub }}/{{ .Values.image }}:{{ .Values.tag | default .Values.global.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* The names the components are built around (controlplane/server.py, controlplane/ca.py). */}}
{{- define "controlplane.checkNamespace" -}}
{{- if ne .Release.Namespace "istio-system" -}}
{{- fail (printf "install the controlplane chart into istio-system, not %q: its serving certificate is for controlplane.istio-system.svc and its CA trusts only the istio-system/ztunnel node account" .Release.Namespace) -}}
{{- end -}}
{{- end }}

{{/* The CA Secret's data: {ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem} as base64. */}}
{{- define "controlplane.generatedCaData" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace "istio-ca-secret" -}}
{{- if and $existing (index $existing "data") -}}
{{- toYaml $existing.data -}}
{{- else -}}
{{- $ca := genCA .Values.ca.commonName (int .Values.ca.validityDays) -}}
ca-cert.pem: {{ $ca.Cert | b64enc }}
ca-key.pem: {{ $ca.Key | b64enc }}
root-cert.pem: {{ $ca.Cert | b64enc }}
cert-chain.pem: {{ $ca.Cert | b64enc }}
{{- end -}}
{{- end }}

{{- define "controlplane.caSecretName" -}}
{{- if eq .Values.ca.source "generate" -}}istio-ca-secret{{- else -}}{{ .Values.ca.secretName }}{{- end -}}
{{- end }}
