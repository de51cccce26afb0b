{{- define "stageserve.name" -}}
{{- default .Release.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "stageserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "stageserve.labels" -}}
app.kubernetes.io/name: stageserve
app.kubernetes.io/instance: {{ include "stageserve.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "stageserve.operatorName" -}}
{{- printf "%s-operator" (include "stageserve.name" .) -}}
{{- end -}}
