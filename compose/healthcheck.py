"""Container health check: ask a gRPC server for its health over the standard `grpc.health.v1` protocol.

    python compose/healthcheck.py ADDRESS SERVICE [--timeout SECONDS] [--tls-ca CA [--tls-cert CERT --tls-key KEY]]

Exit status 0 when the server answers SERVING for SERVICE, 1 otherwise (NOT_SERVING while loading
models or draining, an unknown service name, no server, a timeout). One line on stdout says which,
so `docker inspect --format '{{json .State.Health}}'` shows why a container is unhealthy.

Used by compose/docker-compose.yml for the verifier, drafter and policy containers, and by the
Kubernetes manifests' exec probes where the services serve TLS (deploy/kubernetes/components/secure:
the kubelet's native gRPC probe speaks plaintext only). --tls-ca turns TLS on; --tls-cert/--tls-key
present a client certificate, for services that require one (mTLS). It only needs `grpcio` and
`grpcio-health-checking`, which the services themselves depend on.
"""

from __future__ import annotations

import argparse
import sys


def check(address: str, service: str, timeout: float, tls_ca: str = "", tls_cert: str = "",
          tls_key: str = "") -> tuple[bool, str]:
    """(healthy, one-line reason) for `service` at `address` (host:port); over TLS when tls_ca
    (PEM CA file) is given, presenting tls_cert / tls_key (PEM files) when given."""
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as err:
        return False, f"cannot check {service} at {address}: {err} (install grpcio and grpcio-health-checking)"

    if tls_ca:
        try:
            files = [open(path, "rb").read() if path else None for path in (tls_ca, tls_key, tls_cert)]
        except OSError as err:
            return False, f"cannot check {service} at {address}: {err}"
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(*files))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            name = code.name if code is not None else "ERROR"
            return False, f"{service} at {address}: {name}: {err.details() if hasattr(err, 'details') else err}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{service} at {address}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address", help="host:port of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("service", help="health service name, e.g. blockpilot.v1.Verifier ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    parser.add_argument("--tls-ca", default="", help="PEM CA that signed the server's certificate: check over TLS")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate to present (mTLS; with --tls-key)")
    parser.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_cert and not args.tls_ca):
        parser.error("--tls-cert and --tls-key go together, and need --tls-ca")
    healthy, reason = check(args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key)
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
