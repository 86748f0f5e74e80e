"""waypoint: the L7 proxy for a namespace or service account.

Will hold: HBONE termination, HTTP/1.1 / HTTP/2 / gRPC parsing, L7 AuthorizationPolicy,
RequestAuthentication (JWT), CUSTOM ext_authz, and HBONE re-origination.
"""
