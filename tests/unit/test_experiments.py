"""A/B experiments: validation, sticky assignment and its weight distribution, weight changes and
rollbacks that act at once, shadow arms that are never applied, the statistics against scipy, the
Redis store (the shared server on 6379, under a key prefix of its own, cleaned up) and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from redis_required import no_redis
from scipy import stats

from blockpilot.errors import InvalidArgumentError, NotFoundError
from blockpilot.policy.experiments import Arm, Experiment, ExperimentStore, Moments, bucket, parse_arm, welch
from blockpilot.policy.repository import PolicyRepository
from blockpilot.serving.policy import LocalPolicy, PolicyFeatures
from policy_onnx import write_policy

REDIS_URL = "redis://127.0.0.1:6379/0"


def run(coro):
    return asyncio.run(coro)


def experiment(weights=(50, 50), shadows=(), name="exp", **kwargs):
    arms = (Arm("control", "fixed-2", weights[0]), Arm("treat", "fixed-4", weights[1]))
    return Experiment(name, arms, "control", tuple(Arm(n, p, 0.0, True) for n, p in shadows), **kwargs)


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("build, fragment", [
    (lambda: Experiment("default", (Arm("a", "fixed-2", 1),), "a"), "experiment name"),
    (lambda: Experiment("fixed-3", (Arm("a", "fixed-2", 1),), "a"), "experiment name"),
    (lambda: Experiment("has space", (Arm("a", "fixed-2", 1),), "a"), "experiment name"),
    (lambda: Experiment("e", (), "a"), "at least one arm"),
    (lambda: Experiment("e", (Arm("a", "fixed-2", 1), Arm("a", "fixed-3", 1)), "a"), "unique"),
    (lambda: Experiment("e", (Arm("a", "fixed-2", -1), Arm("b", "fixed-3", 1)), "a"), "weight must be a finite number >= 0"),
    (lambda: Experiment("e", (Arm("a", "fixed-2", math.nan),), "a"), "weight must be a finite number"),
    (lambda: Experiment("e", (Arm("a", "fixed-2", 0), Arm("b", "fixed-3", 0)), "a"), "sum to 0"),
    (lambda: Experiment("e", (Arm("a", "fixed-2", 1),), "b"), "control arm 'b'"),
    (lambda: Experiment("e", (Arm("a", "bad/name", 1),), "a"), "policy must be"),
    (lambda: Experiment("e", (Arm("a b", "fixed-2", 1),), "a b"), "arm name"),
    (lambda: parse_arm("control"), "NAME=POLICY:WEIGHT"),
    (lambda: parse_arm("control=default"), "NAME=POLICY:WEIGHT"),
    (lambda: parse_arm("control=default:x"), "weight must be a number"),
    (lambda: parse_arm("s", shadow=True), "NAME=POLICY"),
    (lambda: Experiment.from_json('{"name": "e"}'), "malformed"),
])
def test_invalid_experiments_are_refused_with_the_reason(build, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        build()


def test_parse_arm_and_json_round_trip():
    assert parse_arm("treat=my.policy-2:12.5") == Arm("treat", "my.policy-2", 12.5)
    assert parse_arm("s=fixed-8", shadow=True) == Arm("s", "fixed-8", 0.0, True)
    original = experiment(shadows=[("s", "fixed-8")])
    again = Experiment.from_json(original.to_json())
    assert again == original and again.shadows[0].shadow and again.policies() == ["fixed-2", "fixed-4", "fixed-8"]


# ---- assignment ---------------------------------------------------------------------------------

def test_assignment_is_sticky_across_replicas_and_follows_the_weights():
    exp = experiment(weights=(70, 30))
    replica = Experiment.from_json(exp.to_json())  # another policy replica reads the same config
    keys = [f"session-{i}" for i in range(20000)]
    arms = [exp.assign(k).name for k in keys]
    assert arms == [replica.assign(k).name for k in keys]
    assert arms == [exp.assign(k).name for k in keys]  # same answer every time
    share = Counter(arms)["control"] / len(keys)
    assert abs(share - 0.7) < 0.02  # binomial sd 0.0032
    other_salt = Experiment.from_json(exp.to_json().replace(exp.salt, "another-salt"))
    assert [other_salt.assign(k).name for k in keys[:200]] != arms[:200]  # the salt matters
    values = np.array([bucket("s", k) for k in keys])
    assert 0 <= values.min() and values.max() < 1 and abs(values.mean() - 0.5) < 0.01


def test_weight_changes_move_only_the_sessions_they_must():
    keys = [f"s{i}" for i in range(5000)]
    before = experiment(weights=(50, 50))
    after = replace(experiment(weights=(25, 50)), salt=before.salt)  # what `ab set` keeps: the salt
    moved = [k for k in keys if before.assign(k).name != after.assign(k).name]
    assert all(before.assign(k).name == "control" and after.assign(k).name == "treat" for k in moved)
    assert abs(len(moved) / len(keys) - (0.5 - 1 / 3)) < 0.03
    rollback = replace(experiment(weights=(50, 0)), salt=before.salt)
    assert {rollback.assign(k).name for k in keys} == {"control"}


# ---- statistics ---------------------------------------------------------------------------------

def test_statistics_match_scipy_on_known_numbers():
    control = [3.1, 2.9, 3.4, 3.0, 2.7, 3.3, 3.2, 2.8]
    treat = [3.6, 3.9, 3.2, 4.1, 3.5, 3.8]
    m = Moments.of(control)
    assert m.mean == pytest.approx(np.mean(control)) and m.variance == pytest.approx(np.var(control, ddof=1))
    low, high = m.ci95()
    expected = stats.t.interval(0.95, len(control) - 1, loc=np.mean(control), scale=stats.sem(control))
    assert (low, high) == pytest.approx(expected)
    comparison = welch(Moments.of(treat), m)
    reference = stats.ttest_ind(treat, control, equal_var=False)
    assert comparison.p_value == pytest.approx(reference.pvalue)
    ci = reference.confidence_interval(0.95)
    assert (comparison.ci_low, comparison.ci_high) == pytest.approx((ci.low, ci.high))
    assert comparison.diff == pytest.approx(np.mean(treat) - np.mean(control))
    assert comparison.p_value < 0.01  # these two samples do differ
    same = welch(Moments.of(control), Moments.of(control))
    assert same.diff == 0 and same.p_value == pytest.approx(1.0)
    assert math.isnan(Moments.of([3.0]).ci95()[0]) and math.isnan(welch(Moments.of([1.0]), m).p_value)
    assert math.isnan(welch(Moments.of([2.0, 2.0]), Moments.of([2.0, 2.0])).p_value)  # no variance: undefined


# ---- Redis store and the engine -----------------------------------------------------------------

def redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5).ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture
def prefix():
    if not redis_available():
        no_redis("no Redis on 127.0.0.1:6379")
    import redis

    value = f"bptest-{uuid.uuid4().hex[:12]}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{value}*"):
        client.delete(key)


def features(session_id="", policy="exp", dim=97):
    return PolicyFeatures({"last_logits": np.zeros(dim, dtype=np.float32)}, 5, 8, 16, session_id, policy)


async def with_store(prefix, work):
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        return await work(ExperimentStore(client, prefix=prefix))
    finally:
        await client.aclose()


def test_weight_change_and_rollback_take_effect_at_once(prefix, tmp_path):
    async def work(store):
        engine = LocalPolicy(experiments=store, repository=PolicyRepository(tmp_path))
        await store.put(experiment(weights=(100, 0)))
        sessions = [f"s{i}" for i in range(40)]
        first = [await engine.decide(features(s)) for s in sessions]
        assert {(d.arm, d.block_size, d.experiment, d.policy_version) for d in first} == {("control", 2, "exp", "fixed-v1")}
        await store.put(experiment(weights=(0, 100)))  # the very next decision follows
        second = [await engine.decide(features(s)) for s in sessions]
        assert {(d.arm, d.block_size) for d in second} == {("treat", 4)}
        await store.put(experiment(weights=(50, 50)))
        split = {s: (await engine.decide(features(s))).arm for s in sessions}
        assert set(split.values()) == {"control", "treat"}
        assert {s: (await engine.decide(features(s))).arm for s in sessions} == split  # sticky
        await store.put(experiment(weights=(50, 0)))  # rollback of treat
        assert {(await engine.decide(features(s))).arm for s in sessions} == {"control"}
        await store.stop("exp")  # stopped: its control answers, outside the statistics
        stopped = await engine.decide(features("s1"))
        assert (stopped.arm, stopped.block_size, stopped.experiment) == ("control", 2, "")
        one_off = [await engine.decide(features("")) for _ in range(3)]
        assert all(d.experiment == "" for d in one_off)
        engine.close()

    run(with_store(prefix, work))


def test_one_off_requests_hash_their_decision_id(prefix, tmp_path):
    async def work(store):
        engine = LocalPolicy(experiments=store, repository=PolicyRepository(tmp_path))
        saved = await store.put(experiment(weights=(50, 50)))
        decisions = [await engine.decide(features("")) for _ in range(40)]
        assert {d.arm for d in decisions} == {"control", "treat"}
        assert all(saved.assign(d.decision_id).name == d.arm for d in decisions)  # reproducible from the id
        engine.close()

    run(with_store(prefix, work))


def test_shadow_arm_is_computed_and_counted_but_never_applied(prefix, tmp_path):
    write_policy(tmp_path, "learned", 1, choice=5)
    repository = PolicyRepository(tmp_path)
    repository.scan()

    async def work(store):
        engine = LocalPolicy(experiments=store, repository=repository)
        await store.put(experiment(weights=(1, 0), shadows=[("shadow", "learned"), ("ghost", "not-loaded")]))
        decisions = [await engine.decide(features(f"s{i}")) for i in range(12)]
        await engine.drain()
        assert {(d.arm, d.block_size) for d in decisions} == {("control", 2)}  # the shadow's 5 is never applied
        spec = await engine.describe("exp")
        assert spec.experiment == "exp" and [f.kind for f in spec.features] == ["last_logits"]
        assert spec.policy_versions == ("fixed-v1", "learned/1")
        reports = {r.arm.name: r for r in await store.report(await store.get("exp"))}
        assert reports["shadow"].shadow == {"decisions": 12.0, "agree": 0.0, "block_size_sum": 60.0}
        assert reports["ghost"].shadow == {}  # failed (not loaded): counted in metrics, recorded nowhere
        engine.close()

    run(with_store(prefix, work))


def test_arm_without_a_loaded_policy_falls_back_to_the_control(prefix, tmp_path):
    async def work(store):
        engine = LocalPolicy(experiments=store, repository=PolicyRepository(tmp_path))
        await store.put(Experiment("exp", (Arm("control", "fixed-3", 0), Arm("treat", "not-shipped", 1)), "control"))
        decision = await engine.decide(features("s"))
        assert (decision.arm, decision.block_size, decision.fallback_reason) == ("control", 3, "arm_policy_unavailable")
        engine.close()

    run(with_store(prefix, work))


def test_outcomes_add_up_per_arm(prefix, tmp_path):
    async def work(store):
        exp = await store.put(experiment(weights=(50, 50)))
        control_tau, treat_tau = [2.0, 3.0, 4.0], [5.0, 6.0]
        for i, tau in enumerate(control_tau):
            await store.record_outcome("exp", "control", f"c{i % 2}", tokens=10, steps=4, accepted_tokens=int(4 * tau - 4),
                                       decode_seconds=0.5, decode_tokens=int(4 * tau), fallback=False, ttl_s=60)
        for tau in treat_tau:
            await store.record_outcome("exp", "treat", "t", tokens=10, steps=2, accepted_tokens=0, decode_seconds=0.25,
                                       decode_tokens=int(2 * tau), fallback=True, ttl_s=60)
        await store.record_outcome("exp", "treat", "t2", tokens=1, steps=0, accepted_tokens=0, decode_seconds=0.0,
                                   decode_tokens=0, fallback=False, ttl_s=60)  # no decode step: no τ observation
        reports = {r.arm.name: r for r in await store.report(exp)}
        control, treat = reports["control"], reports["treat"]
        assert control.sessions == 2 and control.counters["requests"] == 3 and control.tau.n == 3
        assert control.tau.mean == pytest.approx(3.0) and control.tps.mean == pytest.approx(np.mean([16, 24, 32]))
        assert treat.sessions == 2 and treat.counters["requests"] == 3 and treat.counters["fallbacks"] == 2
        assert treat.tau.n == 2 and treat.tau.mean == pytest.approx(5.5)
        expected = stats.ttest_ind(treat_tau, control_tau, equal_var=False)
        assert treat.tau_vs_control.p_value == pytest.approx(expected.pvalue) and control.tau_vs_control is None
        import redis.asyncio as aioredis  # every key has a TTL

        client = aioredis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(f"{prefix}*")]
        assert keys and all([await client.ttl(k) > 0 for k in keys])
        await client.aclose()
        await store.reset(exp)
        assert (await store.report(exp))[0].counters == {}
        with pytest.raises(NotFoundError):
            await store.stop("missing")

    run(with_store(prefix, work))


def test_ab_cli_set_status_stop(capsys):
    if not redis_available():
        no_redis("no Redis on 127.0.0.1:6379")
    import redis

    from blockpilot.cli import main

    name = f"clitest-{uuid.uuid4().hex[:8]}"
    try:
        assert main(["ab", "set", name, "--arm", "control=default:50", "--arm", "treat=fixed-4:50", "--shadow",
                     "s=fixed-6", "--redis-url", REDIS_URL]) == 0
        assert "control=default (50.0%), treat=fixed-4 (50.0%); control control; shadow s=fixed-6" in capsys.readouterr().out

        async def outcomes(store):
            for tau in (2.0, 2.5, 3.0):
                await store.record_outcome(name, "control", "a", tokens=5, steps=2, accepted_tokens=1, decode_seconds=0.1,
                                           decode_tokens=int(2 * tau), fallback=False, ttl_s=60)
            for tau in (4.0, 4.5, 5.0):
                await store.record_outcome(name, "treat", "b", tokens=5, steps=2, accepted_tokens=1, decode_seconds=0.1,
                                           decode_tokens=int(2 * tau), fallback=False, ttl_s=60)

        run(with_store("bp:", outcomes))
        assert main(["ab", "status", name, "--json", "--redis-url", REDIS_URL]) == 0
        data = json.loads(capsys.readouterr().out)["experiments"][0]
        arms = {a["arm"]: a for a in data["arms"]}
        assert data["active"] and arms["control"]["requests"] == 3 and arms["control"]["sessions"] == 1
        assert arms["treat"]["tau"]["mean"] == pytest.approx(4.5) and arms["s"]["shadow"]
        assert arms["treat"]["tau_vs_control"]["diff"] == pytest.approx(2.0)
        assert arms["treat"]["tau_vs_control"]["p_value"] == pytest.approx(
            stats.ttest_ind([4, 4.5, 5], [2, 2.5, 3], equal_var=False).pvalue)
        assert main(["ab", "status", name, "--redis-url", REDIS_URL]) == 0
        table = capsys.readouterr().out
        assert f"experiment {name} (active; control arm control" in table and "2.00 [" in table and "(control)" in table
        assert "shadow s (fixed-6): 0 decisions" in table
        assert main(["ab", "stop", name, "--redis-url", REDIS_URL]) == 0
        capsys.readouterr()
        assert main(["ab", "status", name, "--json", "--redis-url", REDIS_URL]) == 0
        assert json.loads(capsys.readouterr().out)["experiments"][0]["active"] is False
        assert main(["ab", "stop", "no-such-experiment-x", "--redis-url", REDIS_URL]) == 1
        assert "no experiment named" in capsys.readouterr().err
        assert main(["ab", "set", name, "--arm", "a=default:0", "--redis-url", REDIS_URL]) == 2
        assert "sum to 0" in capsys.readouterr().err
        with pytest.raises(SystemExit) as info:
            main(["ab", "status", "--redis-url", "http://x"])
        assert info.value.code == 2
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"bp:exp:{{{name}}}*"):
            client.delete(key)
        client.srem("bp:experiments", name)


def test_experiment_named_after_a_policy_takes_over_its_traffic_and_gives_it_back(prefix, tmp_path):
    write_policy(tmp_path, "learned", 1, choice=5)
    repository = PolicyRepository(tmp_path)
    repository.scan()

    async def work(store):
        engine = LocalPolicy(experiments=store, repository=repository, default_policy="learned")
        await store.put(Experiment("learned", (Arm("control", "default", 50), Arm("treat", "learned", 50)), "control"))
        decisions = {d.arm: d for d in [await engine.decide(features(f"s{i}", policy="")) for i in range(30)]}
        assert (decisions["treat"].block_size, decisions["treat"].policy_version) == (5, "learned/1")
        assert (decisions["control"].block_size, decisions["control"].policy_version) == (8, "fixed-v1")
        assert {d.experiment for d in decisions.values()} == {"learned"}
        await store.stop("learned")  # the name is a policy's: it answers again
        decision = await engine.decide(features("s1", policy="learned"))
        assert (decision.block_size, decision.arm, decision.experiment) == (5, "learned", "")
        engine.close()

    run(with_store(prefix, work))


def test_unreadable_experiments_fail_open_and_say_so(prefix, tmp_path):
    async def work(store):
        engine = LocalPolicy(experiments=store, repository=PolicyRepository(tmp_path), default_policy="fixed-3")
        await store.client.set(store.config_key("broken"), "{not json", ex=60)
        with pytest.raises(NotFoundError):  # not a policy either: nothing can answer for it
            await engine.decide(features("s", policy="broken"))
        down = LocalPolicy(experiments=ExperimentStore(store.client, prefix=prefix, call=unavailable),
                           repository=PolicyRepository(tmp_path), default_policy="fixed-3")
        decision = await down.decide(features("s", policy=""))  # Redis down: decided without experiments
        assert (decision.block_size, decision.fallback_reason) == (3, "")  # fixed names never look experiments up
        missing = LocalPolicy(experiments=ExperimentStore(store.client, prefix=prefix, call=unavailable),
                              repository=PolicyRepository(tmp_path), default_policy="blockpilot")
        decision = await missing.decide(features("s", policy=""))
        assert decision.block_size == 8
        assert decision.fallback_reason == "experiment_unavailable,default_policy_not_loaded"
        for engine_ in (engine, down, missing):
            engine_.close()

    run(with_store(prefix, work))


async def unavailable(what, factory):
    from blockpilot.errors import UnavailableError

    raise UnavailableError(f"Redis {what} failed: connection refused")
