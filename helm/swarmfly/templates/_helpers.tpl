{{/*
Names, labels and the pieces every swarmfly pod shares. Helpers that take a component are
called with (dict "context" $ "component" "scheduler"); the others with the root context.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "swarmfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: <release>-<chart>, or the release name alone when it
already contains the chart's name. */}}
{{- define "swarmfly.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "swarmfly.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's resources, e.g. <release>-swarmfly-scheduler. */}}
{{- define "swarmfly.componentName" -}}
{{- printf "%s-%s" (include "swarmfly.fullname" .context) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "swarmfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every component of this release (the ServiceMonitor selects on them). */}}
{{- define "swarmfly.instanceLabels" -}}
app.kubernetes.io/name: {{ include "swarmfly.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels that pick one component's pods: its workload's selector and its Service's. */}}
{{- define "swarmfly.selectorLabels" -}}
{{ include "swarmfly.instanceLabels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of one component's objects and pods: the selector labels plus the rest. */}}
{{- define "swarmfly.labels" -}}
{{ include "swarmfly.selectorLabels" . }}
app.kubernetes.io/part-of: swarmfly
app.kubernetes.io/version: {{ .context.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
helm.sh/chart: {{ include "swarmfly.chart" .context }}
{{- end }}

{{/* The one image of every container. */}}
{{- define "swarmfly.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* NATS URL(s): nats.url, else the client Service of the bundled NATS chart (which names
it <release>-nats, or <release> when the release name contains "nats"). */}}
{{- define "swarmfly.natsUrl" -}}
{{- if .Values.nats.url }}
{{- .Values.nats.url }}
{{- else if .Values.nats.enabled }}
{{- $service := ternary .Release.Name (printf "%s-nats" .Release.Name) (contains "nats" .Release.Name) | trunc 63 | trimSuffix "-" }}
{{- printf "nats://%s.%s.svc:4222" $service .Release.Namespace }}
{{- else }}
{{- fail "NATS: set nats.url to an existing cluster, or nats.enabled=true to install one" }}
{{- end }}
{{- end }}

{{/* Where the natsClient Secret is mounted. */}}
{{- define "swarmfly.natsSecretDir" -}}
/etc/swarmfly/nats
{{- end }}

{{/* Pod annotations: a change to the shared configuration rolls every pod; then the
global podAnnotations and the component's (.annotations), which win. Called with
(dict "context" $ "annotations" .Values.<component>.podAnnotations). */}}
{{- define "swarmfly.podAnnotations" -}}
checksum/config: {{ include (print .context.Template.BasePath "/configmap.yaml") .context | sha256sum }}
{{- with merge (dict) (.annotations | default dict) (.context.Values.podAnnotations | default dict) }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A pod's affinity: the component's (.affinity) when set; else schedulers and storage
instances prefer nodes without another of their kind, so one node lost takes one of them.
Peers (a DaemonSet) get none. */}}
{{- define "swarmfly.affinity" -}}
{{- if .affinity }}
affinity:
  {{- toYaml .affinity | nindent 2 }}
{{- else if ne .component "peer" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "swarmfly.selectorLabels" . | nindent 14 }}
{{- end }}
{{- end }}

{{/* Pod security: the image's unprivileged user, the runtime's default seccomp profile. */}}
{{- define "swarmfly.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container security: no privilege, no capability, a read-only root file system. */}}
{{- define "swarmfly.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Environment every swarmfly container shares, after the ConfigMap: NATS secrets. */}}
{{- define "swarmfly.env" -}}
{{- if and .Values.natsClient.secretName .Values.natsClient.userKey }}
- name: SWARMFLY_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ .Values.natsClient.secretName }}
      key: {{ .Values.natsClient.userKey }}
{{- end }}
{{- if and .Values.natsClient.secretName .Values.natsClient.passwordKey }}
- name: SWARMFLY_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.natsClient.secretName }}
      key: {{ .Values.natsClient.passwordKey }}
{{- end }}
{{- if and .Values.natsClient.secretName .Values.natsClient.tokenKey }}
- name: SWARMFLY_NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.natsClient.secretName }}
      key: {{ .Values.natsClient.tokenKey }}
{{- end }}
{{- end }}

{{/* Volumes every swarmfly pod has: a writable /tmp, and the natsClient Secret if any. */}}
{{- define "swarmfly.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.natsClient.secretName }}
- name: nats-secret
  secret:
    secretName: {{ .Values.natsClient.secretName }}
{{- end }}
{{- end }}

{{/* Mounts of the volumes above. */}}
{{- define "swarmfly.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.natsClient.secretName }}
- name: nats-secret
  mountPath: {{ include "swarmfly.natsSecretDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Probes of a container whose HTTP port (pieces or dashboard, and /healthz) is named http.
The startup probe, while it has not passed, holds the other two off. */}}
{{- define "swarmfly.probes" -}}
{{- if .Values.probes.startup.enabled }}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
{{- end }}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /healthz
    port: http
  initialDelaySeconds: {{ .Values.probes.readiness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end }}

{{/* SWARMFLY_PROXY_REGISTRIES: the servers of peer.proxy.registries, default first. */}}
{{- define "swarmfly.proxyRegistries" -}}
{{- $servers := list }}
{{- range .Values.peer.proxy.registries }}
{{- $servers = append $servers .server }}
{{- end }}
{{- join "," $servers }}
{{- end }}

{{/* The Secret with the nats-server authorization (templates/nats-auth-secret.yaml). Named
from the release alone: the bundled NATS chart mounts it by the same expression (values.yaml,
nats.podTemplate.patch), and cannot see this chart's name overrides. */}}
{{- define "swarmfly.natsAuthSecret" -}}
{{- printf "%s-nats-auth" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret with one role's NKey seed (key seed.nk), created by the operator:
<natsAuth.secretPrefix, default "<release>-nats">-<role>. */}}
{{- define "swarmfly.identitySecret" -}}
{{- printf "%s-%s" (default (printf "%s-nats" .context.Release.Name) .context.Values.natsAuth.secretPrefix) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* auth.conf of nats-server: with natsAuth.enabled, an authorization block with one NKey
user per role (natsAuth.publicKeys) and the role's permissions for natsClient.prefix, at
role level (every host of a role shares its identity). files/nats-permissions.json holds
swarmfly.credentials.permissions(role, prefix) with the prefix as @PREFIX@ and the lease
bucket's name (the prefix with every character outside [A-Za-z0-9_-] as "_") as @BUCKET@;
tests/deploy/test_helm.py checks it against that function. The client role is optional. */}}
{{/* With natsAuth.callout.enabled: the service account of a component, whose bound token
names it to the schedulers' auth callout (swarmfly/callout.py). */}}
{{- define "swarmfly.serviceAccount" -}}
{{- include "swarmfly.componentName" . }}
{{- end }}

{{/* The pod's service account. No swarmfly pod talks to the API server, so none mounts an
API token, except the schedulers under the callout: they read the JWKS with theirs. Storage
and peers under the callout get only their bound token for NATS (calloutVolume), which a
projected volume gives whatever automountServiceAccountToken says. The other callout
helpers render nothing unless natsAuth.enabled and natsAuth.callout.enabled. */}}
{{- define "swarmfly.podServiceAccount" -}}
{{- if and .context.Values.natsAuth.enabled .context.Values.natsAuth.callout.enabled }}
serviceAccountName: {{ include "swarmfly.serviceAccount" . }}
automountServiceAccountToken: {{ eq .component "scheduler" }}
{{- else }}
automountServiceAccountToken: false
{{- end }}
{{- end }}

{{/* The callout's environment of a component. The schedulers answer nats-server's auth
callout: they check a token against the API server's JWKS (read with their own service
account's token; ClusterRole system:service-account-issuer-discovery) and sign the user with
issuer.nk. A peer presents its bound token and becomes the host named for its node, a
storage the host named for its pod; each subscribes only to its own inbox. */}}
{{- define "swarmfly.calloutEnv" -}}
{{- if and .context.Values.natsAuth.enabled .context.Values.natsAuth.callout.enabled }}
{{- $v := .context.Values.natsAuth.callout }}
{{- $ns := .context.Release.Namespace }}
{{- if eq .component "scheduler" }}
- name: SWARMFLY_CALLOUT_ISSUER_SEED
  value: /etc/swarmfly/callout/issuer.nk
- name: SWARMFLY_CALLOUT_JWKS
  value: {{ $v.jwks | quote }}
- name: SWARMFLY_CALLOUT_JWKS_CA
  value: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
- name: SWARMFLY_CALLOUT_JWKS_TOKEN_FILE
  value: /var/run/secrets/kubernetes.io/serviceaccount/token
- name: SWARMFLY_CALLOUT_TOKEN_ISSUER
  value: {{ $v.tokenIssuer | quote }}
- name: SWARMFLY_CALLOUT_AUDIENCE
  value: {{ $v.audience | quote }}
- name: SWARMFLY_CALLOUT_PEER
  value: {{ printf "system:serviceaccount:%s:%s" $ns (include "swarmfly.serviceAccount" (dict "context" .context "component" "peer")) | quote }}
- name: SWARMFLY_CALLOUT_STORAGE
  value: {{ printf "system:serviceaccount:%s:%s" $ns (include "swarmfly.serviceAccount" (dict "context" .context "component" "storage")) | quote }}
{{- else }}
- name: SWARMFLY_NATS_TOKEN_FILE
  value: /var/run/secrets/swarmfly/token
- name: SWARMFLY_NATS_INBOX_PREFIX
  value: {{ printf "_INBOX_%s_{host_id}" .component | quote }}
- name: {{ ternary "SWARMFLY_PEER_HOST_ID" "SWARMFLY_STORAGE_HOST_ID" (eq .component "peer") }}
  valueFrom:
    fieldRef:
      fieldPath: {{ ternary "spec.nodeName" "metadata.name" (eq .component "peer") }}
{{- end }}
{{- end }}
{{- end }}

{{/* The callout's volume of a component: the issuer's seed for the schedulers; for storage
and peers the bound token (audience natsAuth.callout.audience), which the kubelet renews. */}}
{{- define "swarmfly.calloutVolume" -}}
{{- if and .context.Values.natsAuth.enabled .context.Values.natsAuth.callout.enabled }}
{{- if eq .component "scheduler" }}
- name: nats-callout
  secret:
    secretName: {{ include "swarmfly.identitySecret" (dict "context" .context "component" "callout") }}
    defaultMode: 0440
    items:
      - key: issuer.nk
        path: issuer.nk
{{- else }}
- name: nats-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ .context.Values.natsAuth.callout.audience | quote }}
          expirationSeconds: {{ .context.Values.natsAuth.callout.tokenExpirationSeconds }}
          path: token
{{- end }}
{{- end }}
{{- end }}

{{/* Where the callout's volume is mounted. */}}
{{- define "swarmfly.calloutMount" -}}
{{- if and .context.Values.natsAuth.enabled .context.Values.natsAuth.callout.enabled }}
- name: {{ ternary "nats-callout" "nats-token" (eq .component "scheduler") }}
  mountPath: {{ ternary "/etc/swarmfly/callout" "/var/run/secrets/swarmfly" (eq .component "scheduler") }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "swarmfly.natsAuthConf" -}}
{{- if .Values.natsAuth.enabled }}
{{- with .Values.natsClient }}
{{- if and .secretName (or .credsKey .nkeySeedKey .userKey .tokenKey) }}
{{- fail "natsAuth.enabled gives each component its own NKey: leave natsClient credsKey, nkeySeedKey, userKey and tokenKey empty (TLS keys may stay)" }}
{{- end }}
{{- end }}
{{- $prefix := .Values.natsClient.prefix }}
{{- $bucket := regexReplaceAll "[^A-Za-z0-9_-]" $prefix "_" }}
{{- $permissions := .Files.Get "files/nats-permissions.json" | replace "@PREFIX@" $prefix | replace "@BUCKET@" $bucket | fromJson }}
{{- $users := list }}
{{- range $role := list "scheduler" "storage" "peer" "client" }}
{{- $key := get $.Values.natsAuth.publicKeys $role | default "" | trim }}
{{- if hasPrefix "S" $key }}
{{- fail (printf "natsAuth.publicKeys.%s is a seed (S...): give its public key (U...), and keep the seed in its Secret only" $role) }}
{{- end }}
{{- $viaCallout := and $.Values.natsAuth.callout.enabled (has $role (list "storage" "peer")) }}
{{- if $viaCallout }}
{{- $key = "" }}
{{- else if and (not $key) (ne $role "client") }}
{{- fail (printf "natsAuth.enabled needs natsAuth.publicKeys.%s (helm/swarmfly/README.md, \"NATS permissions\")" $role) }}
{{- end }}
{{- if and $key (not (regexMatch "^U[A-Z2-7]{55}$" $key)) }}
{{- fail (printf "natsAuth.publicKeys.%s is not an NKey user public key (U followed by 55 base32 characters)" $role) }}
{{- end }}
{{- if $key }}
{{- $users = append $users (dict "nkey" $key "permissions" (get $permissions $role)) }}
{{- end }}
{{- end }}
{{- $block := dict "users" $users }}
{{- if .Values.natsAuth.callout.enabled }}
{{- $issuer := .Values.natsAuth.callout.issuerPublicKey | default "" | trim }}
{{- if not (regexMatch "^A[A-Z2-7]{55}$" $issuer) }}
{{- fail "natsAuth.callout.enabled needs natsAuth.callout.issuerPublicKey, an account public key (A followed by 55 base32 characters)" }}
{{- end }}
{{- $bypass := list }}
{{- range $users }}
{{- $bypass = append $bypass .nkey }}
{{- end }}
{{- $_ := set $block "auth_callout" (dict "issuer" $issuer "auth_users" $bypass) }}
{{- end }}
# swarmfly: one NKey user per role, with its role's permissions (prefix {{ $prefix }}); with
# natsAuth.callout, storage and peers come in through the schedulers' auth callout.
authorization: {{ $block | toJson }}
{{- else }}
# swarmfly: natsAuth.enabled is false. No authorization: every client that reaches NATS may
# publish and subscribe anything, origin credentials included (helm/swarmfly/README.md).
{{- end }}
{{- end }}
