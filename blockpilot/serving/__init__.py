"""Shared code of the gRPC services: wire format, status mapping, session store, metrics, the
remote drafter and policy clients, and the service cores (`services/<name>/` only hold servers)."""
