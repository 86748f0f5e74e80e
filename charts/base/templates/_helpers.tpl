{{/* Labels every resource of this chart carries. */}}
{{- define "base.labels" -}}
app.kubernetes.io/name: ambient-base
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Schemas shared by the CRDs. Field names and meanings follow istio/api
(security/v1beta1/*.proto, type/v1beta1/selector.proto); the text is ours. Objects list their
properties: with the API server's strict field validation (kubectl's default) an unknown field is
refused, as it is by the offline checks in tests/charts.
*/}}

{{- define "base.schema.selector" -}}
type: object
description: Workloads (by pod labels) the policy applies to, in the policy's namespace. Empty or absent selects every workload of the namespace.
properties:
  matchLabels:
    type: object
    maxProperties: 4096
    additionalProperties:
      type: string
      maxLength: 63
      x-kubernetes-validations:
        - rule: '!self.contains("*")'
          message: wildcard not allowed in label value match
    x-kubernetes-validations:
      - rule: 'self.all(key, !key.contains("*"))'
        message: wildcard not allowed in label key match
      - rule: 'self.all(key, key.size() != 0)'
        message: key must not be empty
{{- end }}

{{- define "base.schema.targetRef" -}}
type: object
description: A resource the policy attaches to (a Gateway for a waypoint, a Service, a ServiceEntry), in the policy's namespace.
required: [kind, name]
properties:
  group:
    type: string
    maxLength: 253
    pattern: '^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'
  kind:
    type: string
    minLength: 1
    maxLength: 63
    pattern: '^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$'
  name:
    type: string
    minLength: 1
    maxLength: 253
  namespace:
    type: string
    x-kubernetes-validations:
      - rule: 'self.size() == 0'
        message: cross namespace referencing is not currently supported
{{- end }}

{{- define "base.schema.targetRefs" -}}
type: array
maxItems: 16
items:
  {{- include "base.schema.targetRef" . | nindent 2 }}
{{- end }}

{{- define "base.schema.stringList" -}}
type: array
items:
  type: string
{{- end }}

{{- define "base.schema.status" -}}
type: object
x-kubernetes-preserve-unknown-fields: true
properties:
  conditions:
    type: array
    items:
      type: object
      properties:
        type: {type: string}
        status: {type: string}
        reason: {type: string}
        message: {type: string}
        lastProbeTime: {type: string, format: date-time}
        lastTransitionTime: {type: string, format: date-time}
        observedGeneration:
          x-kubernetes-int-or-string: true
          anyOf: [{type: integer}, {type: string}]
  observedGeneration:
    x-kubernetes-int-or-string: true
    anyOf: [{type: integer}, {type: string}]
  validationMessages:
    type: array
    items:
      type: object
      properties:
        documentationUrl: {type: string}
        level:
          type: string
          enum: [UNKNOWN, ERROR, WARNING, INFO]
        type:
          type: object
          properties:
            code: {type: string}
            name: {type: string}
{{- end }}

{{- define "base.schema.authorizationPolicy" -}}
openAPIV3Schema:
  type: object
  description: Access control for workloads in the mesh (https://istio.io/latest/docs/reference/config/security/authorization-policy/).
  properties:
    spec:
      type: object
      x-kubernetes-validations:
        - rule: '(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1'
          message: only one of targetRefs or selector can be set
        - rule: '(has(self.action) && self.action == "CUSTOM") == has(self.provider)'
          message: provider must be set exactly when action is CUSTOM
      properties:
        selector:
          {{- include "base.schema.selector" . | nindent 10 }}
        targetRef:
          {{- include "base.schema.targetRef" . | nindent 10 }}
        targetRefs:
          {{- include "base.schema.targetRefs" . | nindent 10 }}
        action:
          type: string
          description: ALLOW (default), DENY, AUDIT or CUSTOM (delegated to the extension provider).
          enum: [ALLOW, DENY, AUDIT, CUSTOM]
        provider:
          type: object
          description: The extension provider of a CUSTOM action.
          required: [name]
          properties:
            name:
              type: string
              minLength: 1
        rules:
          type: array
          maxItems: 512
          description: A request matches the policy when it matches any rule; no rules matches nothing (ALLOW) or nothing is denied (DENY).
          items:
            type: object
            properties:
              from:
                type: array
                maxItems: 512
                items:
                  type: object
                  properties:
                    source:
                      type: object
                      x-kubernetes-validations:
                        - rule: '(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) && !has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true'
                          message: Cannot set serviceAccounts with namespaces or principals
                      properties:
                        principals: {{- include "base.schema.stringList" . | nindent 26 }}
                        notPrincipals: {{- include "base.schema.stringList" . | nindent 26 }}
                        requestPrincipals: {{- include "base.schema.stringList" . | nindent 26 }}
                        notRequestPrincipals: {{- include "base.schema.stringList" . | nindent 26 }}
                        namespaces: {{- include "base.schema.stringList" . | nindent 26 }}
                        notNamespaces: {{- include "base.schema.stringList" . | nindent 26 }}
                        serviceAccounts:
                          type: array
                          maxItems: 16
                          items: {type: string, maxLength: 320}
                        notServiceAccounts:
                          type: array
                          maxItems: 16
                          items: {type: string, maxLength: 320}
                        trustDomains: {{- include "base.schema.stringList" . | nindent 26 }}
                        notTrustDomains: {{- include "base.schema.stringList" . | nindent 26 }}
                        ipBlocks: {{- include "base.schema.stringList" . | nindent 26 }}
                        notIpBlocks: {{- include "base.schema.stringList" . | nindent 26 }}
                        remoteIpBlocks: {{- include "base.schema.stringList" . | nindent 26 }}
                        notRemoteIpBlocks: {{- include "base.schema.stringList" . | nindent 26 }}
              to:
                type: array
                maxItems: 512
                items:
                  type: object
                  properties:
                    operation:
                      type: object
                      properties:
                        hosts: {{- include "base.schema.stringList" . | nindent 26 }}
                        notHosts: {{- include "base.schema.stringList" . | nindent 26 }}
                        ports: {{- include "base.schema.stringList" . | nindent 26 }}
                        notPorts: {{- include "base.schema.stringList" . | nindent 26 }}
                        methods: {{- include "base.schema.stringList" . | nindent 26 }}
                        notMethods: {{- include "base.schema.stringList" . | nindent 26 }}
                        paths: {{- include "base.schema.stringList" . | nindent 26 }}
                        notPaths: {{- include "base.schema.stringList" . | nindent 26 }}
              when:
                type: array
                items:
                  type: object
                  required: [key]
                  properties:
                    key:
                      type: string
                      minLength: 1
                    values: {{- include "base.schema.stringList" . | nindent 22 }}
                    notValues: {{- include "base.schema.stringList" . | nindent 22 }}
    status:
      {{- include "base.schema.status" . | nindent 6 }}
{{- end }}

{{- define "base.schema.mtls" -}}
type: object
properties:
  mode:
    type: string
    description: UNSET inherits from the parent scope; DISABLE, PERMISSIVE (plaintext or mTLS) or STRICT (mTLS only).
    enum: [UNSET, DISABLE, PERMISSIVE, STRICT]
{{- end }}

{{- define "base.schema.peerAuthentication" -}}
openAPIV3Schema:
  type: object
  description: Which traffic a workload accepts, plaintext or mutual TLS (https://istio.io/latest/docs/reference/config/security/peer_authentication/).
  properties:
    spec:
      type: object
      x-kubernetes-validations:
        - rule: 'has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? self.selector.matchLabels : {}).size() > 0) : true'
          message: portLevelMtls requires selector
      properties:
        selector:
          {{- include "base.schema.selector" . | nindent 10 }}
        mtls:
          {{- include "base.schema.mtls" . | nindent 10 }}
        portLevelMtls:
          type: object
          minProperties: 1
          description: Per target port of the workload (keys are port numbers).
          additionalProperties:
            {{- include "base.schema.mtls" . | nindent 12 }}
          x-kubernetes-validations:
            - rule: 'self.all(key, 0 < int(key) && int(key) <= 65535)'
              message: port must be between 1-65535
    status:
      {{- include "base.schema.status" . | nindent 6 }}
{{- end }}

{{- define "base.schema.requestAuthentication" -}}
openAPIV3Schema:
  type: object
  description: Which JWTs a workload accepts (https://istio.io/latest/docs/reference/config/security/request_authentication/).
  properties:
    spec:
      type: object
      x-kubernetes-validations:
        - rule: '(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1'
          message: only one of targetRefs or selector can be set
      properties:
        selector:
          {{- include "base.schema.selector" . | nindent 10 }}
        targetRef:
          {{- include "base.schema.targetRef" . | nindent 10 }}
        targetRefs:
          {{- include "base.schema.targetRefs" . | nindent 10 }}
        jwtRules:
          type: array
          maxItems: 4096
          items:
            type: object
            required: [issuer]
            x-kubernetes-validations:
              - rule: '(has(self.jwksUri) ? 1 : 0) + (has(self.jwks_uri) ? 1 : 0) + (has(self.jwks) ? 1 : 0) <= 1'
                message: only one of jwks or jwksUri can be set
            properties:
              issuer:
                type: string
                minLength: 1
              audiences:
                type: array
                items: {type: string, minLength: 1}
              jwksUri:
                type: string
                minLength: 1
                maxLength: 2048
                pattern: '^[hH][tT][tT][pP][sS]?://'
              jwks_uri:
                type: string
                minLength: 1
                maxLength: 2048
                pattern: '^[hH][tT][tT][pP][sS]?://'
              jwks:
                type: string
              fromHeaders:
                type: array
                items:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string, minLength: 1}
                    prefix: {type: string}
              fromParams:
                type: array
                items: {type: string, minLength: 1}
              fromCookies:
                type: array
                items: {type: string, minLength: 1}
              outputPayloadToHeader:
                type: string
              forwardOriginalToken:
                type: boolean
              outputClaimToHeaders:
                type: array
                items:
                  type: object
                  required: [header, claim]
                  properties:
                    header:
                      type: string
                      minLength: 1
                      pattern: '^[-_A-Za-z0-9]+$'
                    claim:
                      type: string
                      minLength: 1
              spaceDelimitedClaims:
                type: array
                maxItems: 64
                items: {type: string, minLength: 1}
              timeout:
                type: string
                description: How long to wait for the JWKS fetch, a duration such as 5s or 1.5s.
                pattern: '^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$'
    status:
      {{- include "base.schema.status" . | nindent 6 }}
{{- end }}
