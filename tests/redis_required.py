"""What a test does when it cannot get a Redis server: skip on a developer's machine, fail under
CI (CI set), so a green CI always ran the Redis-backed tests (the Lua fencing scripts, the TTLs,
the stack's own redis-server) against a real Redis."""

from __future__ import annotations

import os

import pytest


def no_redis(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI runs every Redis-backed test (.ci/run starts or installs a Redis server)", pytrace=False)
    pytest.skip(reason)
