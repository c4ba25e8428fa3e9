"""`blockpilot ab set / status / stop` against the Redis of a secured stack: a real redis-server
whose default user is off and whose only user is the one `up --secure` creates (same ACL rule),
found through the run dir the way `ab` finds a running stack, with no URL built by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from redis_required import no_redis

from blockpilot.cli import main
from blockpilot.serving import stack
from service_stack import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def secured_redis(tmp_path, monkeypatch):
    """A run dir as `up --secure` leaves it (secure material, stack.json naming its Redis and
    user) around an own redis-server with that ACL user."""
    if shutil.which("redis-server") is None:
        no_redis("redis-server is not installed")
    import redis

    run = tmp_path / "run"
    monkeypatch.setenv("BLOCKPILOT_RUN_DIR", str(run))
    monkeypatch.delenv("BLOCKPILOT_POLICY_REDIS_URL", raising=False)
    secure = stack.secure_material(run / "secure")
    password = secure["redis_password"].read_text().strip()
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser {stack.REDIS_USER} on >{password} {stack.REDIS_ACL_RULE}\n")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path), "--aclfile", str(acl)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        user = redis.Redis(port=port, username=stack.REDIS_USER, password=password, socket_timeout=2, decode_responses=True)
        deadline = time.monotonic() + 10
        while not stack.redis_answers(stack.with_redis_user(url, stack.REDIS_USER, password)):
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        # What `up --secure` records when it started this Redis (blockpilot/serving/stack.py up()).
        (run / "stack.json").write_text(json.dumps({"run_dir": str(run), "services": {}, "secure": True,
                                                    "redis": {"url": url, "pid": process.pid, "user": stack.REDIS_USER}}))
        yield {"url": url, "port": port, "password": password, "user": user}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_ab_set_status_stop_use_the_secured_stacks_redis_user(secured_redis, capsys):
    import redis

    with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is off: only the ACL user gets in
        redis.Redis(port=secured_redis["port"], socket_timeout=2).ping()
    assert main(["ab", "set", "exp1", "--arm", "control=default:50", "--arm", "treat=fixed-4:50"]) == 0
    assert "experiment exp1: control=default (50.0%), treat=fixed-4 (50.0%); control control" in capsys.readouterr().out
    assert secured_redis["user"].exists("bp:exp:{exp1}:config")  # written through the blockpilot user
    assert main(["ab", "status", "exp1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["experiments"]
    assert [e["name"] for e in shown] == ["exp1"] and shown[0]["active"]
    assert [(a["arm"], a["policy"]) for a in shown[0]["arms"]] == [("control", "default"), ("treat", "fixed-4")]
    assert main(["ab", "stop", "exp1"]) == 0
    assert "experiment exp1 stopped" in capsys.readouterr().out
    assert main(["ab", "status", "exp1", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["experiments"][0]["active"]


def test_ab_says_which_login_a_secured_redis_refused(secured_redis, capsys):
    url, password = secured_redis["url"], secured_redis["password"]
    assert main(["ab", "status", "--redis-url", url]) == 1  # no user: the default user is off
    error = capsys.readouterr().err
    assert f"Redis {url} (--redis-url) refused the login" in error and "user blockpilot" in error
    assert "redis-password" in error and len(error.strip().splitlines()) == 1
    wrong = stack.with_redis_user(url, stack.REDIS_USER, "not-" + password)
    assert main(["ab", "status", "--redis-url", wrong]) == 1
    error = capsys.readouterr().err
    assert "refused the login: invalid username-password pair" in error
    assert "not-" + password not in error and "blockpilot:***@" in error  # the password is never printed
    # The environment variable overrides the local stack, like --redis-url.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLOCKPILOT_POLICY_REDIS_URL", url)
        assert main(["ab", "status"]) == 1
    assert "($BLOCKPILOT_POLICY_REDIS_URL) refused the login" in capsys.readouterr().err
