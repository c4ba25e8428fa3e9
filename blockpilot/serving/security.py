"""Transport security and access control of the services: TLS (mTLS between services) and bearer
tokens with two roles. Everything is off unless configured, as on the local stack.

Terms:
- data token: may call the data plane (Generate, Draft, Decide, Report, the Describe calls);
- admin token: may also call admin RPCs (policy Reload; ADMIN_METHODS);
- open methods: health checking and reflection, reachable without a token (probes, grpcurl).
A missing or unknown token is UNAUTHENTICATED; a data token on an admin RPC is PERMISSION_DENIED.

Token files hold one token per line (several, so tokens can be rotated: add the new one, move the
clients, remove the old one); blank lines and lines starting with '#' are ignored. Servers keep
only SHA-256 digests and compare digests in constant time. Token files and certificates are read
again when they change on disk (checked at most once a second for tokens, at each TLS handshake
for certificates), so rotating either needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc

from blockpilot.errors import InvalidArgumentError

log = logging.getLogger(__name__)

ADMIN_METHODS = frozenset({"/blockpilot.v1.Policy/Reload"})
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
DATA, ADMIN = "data", "admin"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise InvalidArgumentError(f"cannot read the {what} {path!r}: {err.strerror or err}") from None


def read_tokens(path: str) -> list[str]:
    """The tokens of a token file (see the module docstring)."""
    lines = _read(path, "token file").decode("utf-8", errors="replace").splitlines()
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise InvalidArgumentError(f"the token file {path!r} holds no token")
    return tokens


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenFile:
    """The digests of a token file's tokens, read again when the file changes."""

    RECHECK_S = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._digests: tuple[bytes, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        stat = os.stat(Path(self.path).expanduser())
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._digests = tuple(digest(t) for t in read_tokens(self.path))
            if self._stamp is not None:
                log.info("token file %s changed: %d token(s) now valid", self.path, len(self._digests))
            self._stamp = stamp

    def accepts(self, token: str) -> bool:
        now = time.monotonic()
        if now - self._checked > self.RECHECK_S:
            with self._lock:
                self._checked = now
                try:
                    self._load()
                except (OSError, InvalidArgumentError) as err:  # keep the last good set; say why
                    log.warning("token file %s unreadable, keeping its last tokens: %s", self.path, err)
        presented = digest(token)
        matched = False
        for known in self._digests:  # no early exit: the time does not tell which token matched
            matched |= hmac.compare_digest(presented, known)
        return matched


@dataclass(frozen=True)
class ServerSecurity:
    """What a service's server requires (fields as in the service configs; '' = off).

    tls_cert / tls_key: PEM server certificate chain and key (TLS on); tls_client_ca: PEM CA whose
    client certificates are required (mTLS); token_file / admin_token_file: see the module
    docstring (an admin token file alone guards only the admin RPCs)."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    token_file: str = ""
    admin_token_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgumentError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgumentError("tls_client_ca (client certificates) needs TLS: give tls_cert and tls_key too")

    @classmethod
    def of(cls, config) -> "ServerSecurity":
        return cls(**{name: getattr(config, name, "") for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file",
                                                                   "admin_token_file")})

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` (TLS when configured, certificates re-read when they change)."""
        if not self.tls:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self._credentials())

    def _credentials(self) -> grpc.ServerCredentials:
        files = [self.tls_cert, self.tls_key] + ([self.tls_client_ca] if self.tls_client_ca else [])

        def stamp() -> tuple:
            return tuple(os.stat(Path(f).expanduser()).st_mtime_ns for f in files)

        def config() -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))],
                root_certificates=_read(self.tls_client_ca, "client CA") if self.tls_client_ca else None)

        current = {"stamp": stamp()}
        initial = config()

        def fetch() -> grpc.ServerCertificateConfiguration | None:  # at each handshake: new files, new config
            try:
                now = stamp()
                if now == current["stamp"]:
                    return None
                fresh = config()
            except (OSError, InvalidArgumentError) as err:
                log.warning("TLS files unreadable, keeping the loaded certificate: %s", err)
                return None
            current["stamp"] = now
            log.info("TLS certificate files changed: new handshakes use them")
            return fresh

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=bool(self.tls_client_ca))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not (self.token_file or self.admin_token_file):
            return []
        return [TokenInterceptor(TokenFile(self.token_file) if self.token_file else None,
                                 TokenFile(self.admin_token_file) if self.admin_token_file else None)]


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def caller_id(metadata) -> str:
    """Who calls, for ownership (sessions): a digest of its bearer token, "" without one. The
    token itself is never stored."""
    token = bearer_token(metadata)
    return digest(token).hex()[:32] if token else ""


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` against the method's role (see the module docstring)."""

    def __init__(self, data: TokenFile | None, admin: TokenFile | None) -> None:
        self.data = data
        self.admin = admin

    def role_needed(self, method: str) -> str | None:
        if method.startswith(OPEN_SERVICES):
            return None
        if method in ADMIN_METHODS:
            return ADMIN if self.admin is not None else (DATA if self.data is not None else None)
        return DATA if self.data is not None else None

    def decision(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None (allowed) or the status that refuses the call."""
        role = self.role_needed(method)
        if role is None:
            return None
        token = bearer_token(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "this server requires 'authorization: Bearer <token>'"
        is_admin = self.admin is not None and self.admin.accepts(token)
        if role == ADMIN:
            if is_admin:
                return None
            if self.data is not None and self.data.accepts(token):
                return grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin token"
            return grpc.StatusCode.UNAUTHENTICATED, "the token is not valid here"
        if is_admin or self.data.accepts(token):
            return None
        return grpc.StatusCode.UNAUTHENTICATED, "the token is not valid here"

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        refused = self.decision(details.method, details.invocation_metadata)
        if refused is None or handler is None:
            return handler
        return _refusing(handler, *refused)


def handler_like(handler: grpc.RpcMethodHandler, behavior, request_deserializer=None) -> grpc.RpcMethodHandler:
    """A method handler of the same kind (streaming or not, both ways) and serializer as
    `handler`, running `behavior` (and parsing with `request_deserializer`, default handler's)."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        behavior, request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends every call with `code` (an async
    generator where the handler's behavior is one: gRPC's aio server, and the tracing
    interceptor around it, iterate a streaming reply)."""
    import inspect

    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if inspect.isasyncgenfunction(behavior):
        async def refuse(_request, context):
            await context.abort(code, message)
            yield  # never reached: makes this an async generator like the handler it stands for
    else:
        async def refuse(_request, context):
            await context.abort(code, message)

    return handler_like(handler, refuse)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a service ('' = off): tls_ca, the PEM CA it trusts (TLS on; 'system'
    = the system's roots); tls_cert / tls_key, its own certificate (mTLS); token_file, the bearer
    token it sends (the file's first token; re-read when the file changes)."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgumentError("a client certificate and its key go together: give both or neither")
        if self.tls_cert and not self.tls_ca:
            raise InvalidArgumentError("a client certificate needs TLS: give the CA to trust too")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.token_file:
            return ()
        return (("authorization", f"Bearer {read_tokens(self.token_file)[0]}"),)

    def credentials(self) -> grpc.ChannelCredentials:
        roots = None if self.tls_ca == "system" else _read(self.tls_ca, "TLS CA")
        key = _read(self.tls_key, "TLS client key") if self.tls_key else None
        chain = _read(self.tls_cert, "TLS client certificate") if self.tls_cert else None
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)

    def channel(self, address: str, options: Sequence = ()) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(address, self.credentials(), options=list(options))
        return grpc.insecure_channel(address, options=list(options))

    def aio_channel(self, address: str, options: Sequence = ()) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(address, self.credentials(), options=list(options))
        return grpc.aio.insecure_channel(address, options=list(options))
