"""Make the secure component's material: the files its secretGenerator turns into Secrets.

    .venv/bin/python deploy/kubernetes/make-secrets.py [--namespace blockpilot] [--name HOST ...]
                                                       [--redis-url URL] [--out FOLDER] [--force]

Writes into deploy/kubernetes/components/secure/material/ (git-ignored; owner-only files), as
`blockpilot up --secure` does for the local stack (blockpilot/serving/stack.py, secure_material):

    ca.pem                  a private CA
    server.pem, server-key.pem  the certificate every service presents, for the names the services
                            are dialed by in the namespace (verifier, verifier.<ns>, verifier.<ns>.svc,
                            verifier.<ns>.svc.cluster.local, the same for drafter, policy and gateway,
                            the drafter pods' names under the headless drafter-pods Service), for
                            localhost / 127.0.0.1 (the exec probes dial the pod itself), and --name
    client.pem, client-key.pem  the certificate the services present to each other (mTLS)
    token, admin-token      a data-plane and an admin bearer token
    redis-password          the password of the Redis user `blockpilot`
    redis-url               the URL the verifier and the policy service use: the in-cluster Redis
                            with that user, or --redis-url (an external Redis; see README.md)

Existing material is kept (clients configured with it keep working) unless --force.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from blockpilot.serving.certs import issue, make_ca, write_private
from blockpilot.serving.stack import REDIS_USER, with_redis_user

HERE = Path(__file__).resolve().parent
MATERIAL = HERE / "components" / "secure" / "material"
SERVICES = ("verifier", "drafter", "policy", "gateway")
FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem", "token", "admin-token",
         "redis-password", "redis-url")
IN_CLUSTER_REDIS = "redis://redis:6379/0"


def server_names(namespace: str, extra: list[str]) -> list[str]:
    names = []
    for service in SERVICES:
        names += [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    # A drafter pod's own name under the headless Service (<pod ip, dashed>.drafter-pods...).
    names += [f"*.drafter-pods.{namespace}.svc", f"*.drafter-pods.{namespace}.svc.cluster.local"]
    return names + ["localhost", "127.0.0.1"] + extra


def make(out: Path, namespace: str, extra: list[str], redis_url: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    ca_files, ca = make_ca(f"BlockPilot {namespace} CA")
    server = issue(ca, "blockpilot", server_names(namespace, extra))
    client = issue(ca, "blockpilot-services", client=True)
    password = secrets.token_urlsafe(32)
    data = {"ca.pem": ca_files.cert_pem, "server.pem": server.cert_pem, "server-key.pem": server.key_pem,
            "client.pem": client.cert_pem, "client-key.pem": client.key_pem,
            "token": (secrets.token_urlsafe(32) + "\n").encode(), "admin-token": (secrets.token_urlsafe(32) + "\n").encode(),
            # No trailing newline: the Secret's keys become a password and a URL in environment variables.
            "redis-password": password.encode(),
            "redis-url": (redis_url or with_redis_user(IN_CLUSTER_REDIS, REDIS_USER, password)).encode()}
    return {name: write_private(out / name, content) for name, content in data.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--namespace", default="blockpilot", help="namespace the stack runs in (the overlays' namespace)")
    parser.add_argument("--name", action="append", default=[],
                        help="another name (or IP address) clients dial, e.g. the gateway's or verifier's external host")
    parser.add_argument("--redis-url", default="", help="URL of an external Redis, with its user and password "
                                                        "(default: the in-cluster Redis with a new password)")
    parser.add_argument("--out", type=Path, default=MATERIAL, help=f"folder to write (default: {MATERIAL})")
    parser.add_argument("--force", action="store_true", help="replace existing material")
    args = parser.parse_args(argv)
    if all((args.out / name).is_file() for name in FILES) and not args.force:
        print(f"{args.out}: material exists, kept (--force replaces it)")
        return 0
    for path in make(args.out, args.namespace, args.name, args.redis_url).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
