"""The HTTP API: routes, auth and scopes, the error envelope, request/response schemas."""
