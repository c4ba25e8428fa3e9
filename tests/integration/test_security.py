"""TLS, mTLS and bearer tokens on real services over real sockets (issue: secure by configuration).

A private CA made in the test issues the server certificate (localhost, 127.0.0.1), a client
certificate for the services and one for the test client; tokens live in files."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blockpilot.client import BlockPilotClient
from blockpilot.errors import UnavailableError
from blockpilot.serving.certs import issue, make_ca, write_private
from blockpilot.serving.security import ClientSecurity, TokenInterceptor
from blockpilot.serving.stack import health_status
from blockpilot.v1 import policy_pb2, policy_pb2_grpc
from service_stack import Redis, Service

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure")
    ca_files, ca = make_ca()
    other_files, other = make_ca("another CA")
    files = {"ca": write_private(folder / "ca.pem", ca_files.cert_pem),
             "other_ca": write_private(folder / "other-ca.pem", other_files.cert_pem)}
    for name, issued in (("server", issue(ca, "blockpilot", ["localhost", "127.0.0.1"])),
                         ("client", issue(ca, "blockpilot-client", client=True)),
                         ("rogue", issue(other, "rogue-client", client=True))):
        files[f"{name}_cert"] = write_private(folder / f"{name}.pem", issued.cert_pem)
        files[f"{name}_key"] = write_private(folder / f"{name}-key.pem", issued.key_pem)
    files["token"] = write_private(folder / "token", b"data-token-1\n")
    files["admin_token"] = write_private(folder / "admin-token", b"# rotated monthly\nadmin-token-1\n")
    files["wrong_token"] = write_private(folder / "wrong-token", b"nope\n")
    files["folder"] = folder
    return files


def tls_flags(m) -> dict:
    return {"tls_cert": m["server_cert"], "tls_key": m["server_key"], "tls_client_ca": m["ca"],
            "token_file": m["token"], "admin_token_file": m["admin_token"]}


def client(m, token: str | None = "token", cert: str | None = "client", ca: str = "ca") -> ClientSecurity:
    return ClientSecurity(str(m[ca]), str(m[f"{cert}_cert"]) if cert else "", str(m[f"{cert}_key"]) if cert else "",
                          str(m[token]) if token else "")


@pytest.fixture(scope="module")
def policy(material):
    folder = material["folder"]
    (folder / "policies").mkdir()
    service = Service("policy", folder, redis_url="memory", repository=folder / "policies", default_policy="default",
                      **tls_flags(material)).start()
    try:
        deadline = time.monotonic() + 60
        while health_status(service.address, "blockpilot.v1.Policy", 0.5, security=client(material, token=None)) != "SERVING":
            assert time.monotonic() < deadline and service.process.poll() is None, service.log()[-2000:]
            time.sleep(0.2)
        yield service
    finally:
        service.stop()


def describe(address: str, security: ClientSecurity, rpc: str = "DescribePolicy"):
    with security.channel(address) as channel:
        stub = policy_pb2_grpc.PolicyStub(channel)
        request = policy_pb2.DescribePolicyRequest() if rpc == "DescribePolicy" else policy_pb2.ReloadRequest()
        return getattr(stub, rpc)(request, timeout=10, metadata=security.metadata())


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_tokens_and_roles(policy, material):
    address = policy.address
    assert describe(address, client(material)).policy_versions
    assert code_of(lambda: describe(address, client(material, token=None))) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: describe(address, client(material, token="wrong_token"))) == grpc.StatusCode.UNAUTHENTICATED
    # Reload is an admin RPC: the data token is known but not enough.
    assert code_of(lambda: describe(address, client(material), "Reload")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: describe(address, client(material, token=None), "Reload")) == grpc.StatusCode.UNAUTHENTICATED
    describe(address, client(material, token="admin_token"), "Reload")
    assert describe(address, client(material, token="admin_token")).policy_versions  # admin may call the data plane
    # Health checking needs no token (probes).
    with client(material, token=None).channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_and_client_certificates_are_required(policy, material):
    address = policy.address
    with grpc.insecure_channel(address) as channel:  # plaintext to a TLS port
        assert code_of(lambda: policy_pb2_grpc.PolicyStub(channel).DescribePolicy(policy_pb2.DescribePolicyRequest(),
                                                                                  timeout=5)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: describe(address, client(material, cert=None))) == grpc.StatusCode.UNAVAILABLE  # no client cert
    assert code_of(lambda: describe(address, client(material, cert="rogue"))) == grpc.StatusCode.UNAVAILABLE  # other CA's
    assert code_of(lambda: describe(address, client(material, ca="other_ca"))) == grpc.StatusCode.UNAVAILABLE  # server untrusted


def test_tokens_and_certificates_rotate_without_a_restart(policy, material):
    address = policy.address
    new_token = write_private(material["folder"] / "new-token", b"data-token-2\n")
    assert code_of(lambda: describe(address, ClientSecurity(str(material["ca"]), str(material["client_cert"]),
                                                            str(material["client_key"]), str(new_token)))) \
        == grpc.StatusCode.UNAUTHENTICATED
    write_private(material["token"], b"data-token-1\ndata-token-2\n")  # both valid while clients move
    time.sleep(1.2)
    assert describe(address, ClientSecurity(str(material["ca"]), str(material["client_cert"]), str(material["client_key"]),
                                            str(new_token))).policy_versions
    assert describe(address, client(material)).policy_versions
    # A new server certificate from another CA: new connections present it.
    _, other = make_ca("rotated CA")
    rotated_ca = write_private(material["folder"] / "rotated-ca.pem", other[0].public_bytes(__import__(
        "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.PEM))
    fresh = issue(other, "blockpilot", ["localhost", "127.0.0.1"])
    old_cert, old_key = material["server_cert"].read_bytes(), material["server_key"].read_bytes()
    try:
        write_private(material["server_key"], fresh.key_pem)
        write_private(material["server_cert"], fresh.cert_pem)
        rotated = ClientSecurity(str(rotated_ca), str(material["client_cert"]), str(material["client_key"]), str(material["token"]))
        assert describe(address, rotated).policy_versions
        assert code_of(lambda: describe(address, client(material))) == grpc.StatusCode.UNAVAILABLE  # the old CA no longer fits
    finally:
        write_private(material["server_key"], old_key)
        write_private(material["server_cert"], old_cert)


def test_role_rules_without_an_admin_file():
    from blockpilot.serving.security import TokenFile

    class Tokens(TokenFile):
        def __init__(self, *tokens):
            self.tokens = tokens

        def accepts(self, token):
            return token in self.tokens

    data_only = TokenInterceptor(Tokens("d"), None)
    assert data_only.decision("/blockpilot.v1.Policy/Reload", [("authorization", "Bearer d")]) is None
    admin_only = TokenInterceptor(None, Tokens("a"))
    assert admin_only.decision("/blockpilot.v1.Verifier/Generate", []) is None  # the data plane stays open
    assert admin_only.decision("/blockpilot.v1.Policy/Reload", [])[0] == grpc.StatusCode.UNAUTHENTICATED
    both = TokenInterceptor(Tokens("d"), Tokens("a"))
    assert both.decision("/grpc.health.v1.Health/Check", []) is None
    assert both.decision("/blockpilot.v1.Verifier/Generate", [("authorization", "Basic d")])[0] == grpc.StatusCode.UNAUTHENTICATED


def test_the_stack_over_mtls_with_tokens_equals_the_plain_stack(material, tiny_llama_dir, tmp_path):
    """Verifier -> drafter / policy over mTLS with the services' token, the client over TLS with
    its token: the same tokens as a plain stack."""
    redis = Redis(tmp_path).start()
    (tmp_path / "policies").mkdir()
    internal = {"client_tls_ca": material["ca"], "client_tls_cert": material["client_cert"],
                "client_tls_key": material["client_key"], "client_token_file": material["token"]}
    secured = [Service("policy", tmp_path, redis_url=redis.url, repository=tmp_path / "policies", default_policy="default",
                       **tls_flags(material)),
               Service("drafter", tmp_path, target=tiny_llama_dir, drafter="random", random_block_size=4, **tls_flags(material))]
    verifier = Service("verifier", tmp_path, target=tiny_llama_dir, drafter_address=secured[1].address,
                       policy_address=secured[0].address, redis_url=redis.url, load_aware_drafts=False,
                       # client-facing: TLS and tokens, no client certificates
                       **{k: v for k, v in tls_flags(material).items() if k != "tls_client_ca"}, **internal)
    plain = [Service("policy", tmp_path, redis_url=redis.url, repository=tmp_path / "policies", default_policy="default"),
             Service("drafter", tmp_path, target=tiny_llama_dir, drafter="random", random_block_size=4)]
    plain_verifier = Service("verifier", tmp_path, target=tiny_llama_dir, drafter_address=plain[1].address,
                             policy_address=plain[0].address, redis_url=redis.url, load_aware_drafts=False)
    services = [*secured, verifier, *plain, plain_verifier]
    try:
        for service in services:
            service.start()
        probe = client(material, token=None)
        for service in services:
            deadline = time.monotonic() + 180
            security = probe if service in (*secured, verifier) else None
            while health_status(service.address, f"blockpilot.v1.{service.name.capitalize()}", 0.5, security=security) != "SERVING":
                assert time.monotonic() < deadline and service.process.poll() is None, service.log()[-3000:]
                time.sleep(0.3)
        request = dict(token_ids=[5, 6, 7, 8, 9, 10, 5, 6, 7], max_new_tokens=24, block_size="auto")
        with BlockPilotClient(verifier.address, security=client(material, cert=None), retries=0) as secure_client:
            secure = secure_client.generate(**request)
        with BlockPilotClient(plain_verifier.address, retries=0) as plain_client:
            reference = plain_client.generate(**request)
        assert secure.token_ids == reference.token_ids
        assert secure.fallback_reason == "" and secure.drafter == reference.drafter != ""  # drafter and policy reached
        with BlockPilotClient(verifier.address, security=client(material, token=None, cert=None), retries=0) as anonymous:
            with pytest.raises(Exception) as caught:
                anonymous.generate(**request)
        assert "UNAUTHENTICATED" in str(caught.value)
        with BlockPilotClient(verifier.address, retries=0) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.generate(**request)
        # A session answers only the token that opened it; to another it is unknown (ids cannot be probed).
        other_token = write_private(tmp_path / "other-token", b"data-token-2\n")
        write_private(material["token"], b"data-token-1\ndata-token-2\n")
        time.sleep(1.2)
        with BlockPilotClient(verifier.address, security=client(material, cert=None), retries=0) as owner:
            opened = owner.generate(**request, new_session=True)
            assert owner.generate(**request, session_id=opened.session_id).token_ids
        other = ClientSecurity(str(material["ca"]), token_file=str(other_token))
        with BlockPilotClient(verifier.address, security=other, retries=0) as stranger:
            with pytest.raises(Exception, match="unknown or expired session"):
                stranger.generate(**request, session_id=opened.session_id)
    finally:
        for service in services:
            service.stop()
        redis.stop()
