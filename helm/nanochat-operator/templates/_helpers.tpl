{{/* Names and labels shared by the templates. */}}

{{- define "nanochat.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Objects outside the release namespace (cluster-scoped, or Roles in a watched namespace) carry
   that namespace in their name: releases of one name in two namespaces would otherwise share them.
   ":" appears in no namespace or release name, so no two releases map to one name. */}}
{{- define "nanochat.globalName" -}}
{{- printf "%s:%s" .Release.Namespace (include "nanochat.fullname" .) -}}
{{- end -}}

{{/* The metrics Service: a DNS label (63 characters), and the `job` label of the operator's series
   (the PrometheusRule's NanochatOperatorDown). */}}
{{- define "nanochat.metricsService" -}}
{{- printf "%s-metrics" (include "nanochat.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* The operator image: by digest when one is given (immutable), else by tag. */}}
{{- define "nanochat.image" -}}
{{- with .Values.image.digest -}}
{{- printf "%s@%s" $.Values.image.repository . -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "nanochat.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nanochat.labels" -}}
{{ include "nanochat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nanochat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nanochat.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rules on namespaced objects: exactly the calls the operator makes. */}}
{{- define "nanochat.namespacedRules" -}}
# The runs: kopf watches them (patch: it removes the finalizer that earlier versions added).
- apiGroups: ["nanochat.io"]
  resources: ["trainingruns", "evalruns"]
  verbs: ["list", "watch", "patch"]
# The children's owner references set blockOwnerDeletion: under OwnerReferencesPermissionEnforcement
# (OpenShift's default) that needs `update` on the owner's finalizers subresource.
- apiGroups: ["nanochat.io"]
  resources: ["trainingruns/finalizers", "evalruns/finalizers"]
  verbs: ["update"]
# Status is written through the status subresource.
- apiGroups: ["nanochat.io"]
  resources: ["trainingruns/status", "evalruns/status"]
  verbs: ["patch"]
# The Jobs it makes: watched (by its label), created, and suspended/resumed (patch). Deletion is
# the garbage collector's, through owner references. get, for every kind it creates: whose the
# object a create finds in place is (an earlier attempt's, or a deleted run's not yet collected).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "get"]
# Pods of those Jobs: watched by label to compute the status (no logs are read).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Trainer config, headless Service, and the PVC for spec.storage.size.
- apiGroups: [""]
  resources: ["configmaps", "services", "persistentvolumeclaims"]
  verbs: ["create", "get"]
# The PodGroup of a run with spec.gang (scheduler-plugins' coscheduling, Volcano); get: whose one
# already there is (a deleted run's of the same name, not yet collected).
- apiGroups: ["scheduling.x-k8s.io", "scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["create", "get"]
# The network policy of each eval pod (only what it scores is reachable).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "get"]
# Events on the runs (phase changes, refusals); listed for a Job's FailedCreate (why its pods
# cannot be made: Pod Security, quota, a webhook).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- if .Values.peering.enabled }}
# kopf peering (namespaced mode).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}
