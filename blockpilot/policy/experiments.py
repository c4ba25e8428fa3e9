"""A/B experiments of block-size policies, kept in Redis so every policy replica agrees.

An experiment NAME takes over every Decide whose policy name is NAME (the request's `policy`, or
the policy service's default_policy when the request names none). Its arms name policies
('default', 'fixed-<n>' or a learned policy of the repository) with traffic weights; one arm is
the control. An arm's name is never looked up as an experiment, so an experiment may carry a
learned policy's name and have an arm with that policy: `ab set blockpilot --arm control=default:50
--arm treat=blockpilot:50` splits the default traffic between the fixed size and the policy.

- Assignment is sticky: arm = the weighted bucket of hash(salt, session id), so every turn of a
  session lands in the same arm on every replica. A one-off request (no session) hashes its
  decision id instead: effectively random, and reproducible from the decision id it reports.
  The salt is drawn when the experiment is created and kept when it is changed.
- Weight changes take effect at once: every Decide reads the experiment from Redis (one GET).
  Buckets follow the cumulative weights, so setting an arm's weight to 0 (rollback) moves all of
  its sessions to the other arms on their next request.
- Shadow arms get no traffic: their policy decides every request of the experiment too (after the
  answer, off the request's path); that decision is logged and counted (agreement with the applied
  one), never applied.
- Stopping (`active` false) takes effect at once too: a name that is also a policy's ('default',
  'fixed-<n>', a learned policy, the service's default_policy) goes back to that policy; any other
  name is answered by the control arm, outside the statistics, so clients naming it keep working.
  Config and counters stay until their TTL, for `blockpilot ab status`.
- Outcomes: the verifier reports each decision's outcome; the arm's counters add it. One outcome
  with at least one decode step and a positive decode time is one observation of τ (mean tokens
  per verify step) and of decode tokens/s. Sums and sums of squares give means, 95% confidence
  intervals (Student t) and Welch's t-test against the control. Observations are requests: the
  turns of one session are correlated, so with many turns per session the intervals are too narrow.

Redis keys (`bp:` prefix; hash-tagged by experiment, so one experiment sits in one cluster slot;
every key has a TTL):

    bp:experiments                         set of experiment names
    bp:exp:{<name>}:config                 JSON of the Experiment (TTL: the experiment's ttl_s)
    bp:exp:{<name>}:arm:<arm>              hash: requests, tokens, steps, accepted_tokens,
                                           decode_seconds, fallbacks, tau_n, tau_sum, tau_sumsq,
                                           tps_n, tps_sum, tps_sumsq
    bp:exp:{<name>}:arm:<arm>:sessions     HyperLogLog of the arm's session ids (≈0.8% error)
    bp:exp:{<name>}:shadow:<arm>           hash: decisions, agree, block_size_sum
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

from blockpilot.errors import InvalidArgumentError, NotFoundError, UnavailableError
from blockpilot.policy.repository import POLICY_NAME

ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
FIXED_NAME = re.compile(r"^(default|fixed-\d+)$")
DEFAULT_TTL_S = 30 * 86400.0
ARM_COUNTERS = ("requests", "tokens", "steps", "accepted_tokens", "decode_seconds", "fallbacks",
                "tau_n", "tau_sum", "tau_sumsq", "tps_n", "tps_sum", "tps_sumsq")


def is_fixed_name(name: str) -> bool:
    """'default' and 'fixed-<n>' are fixed-size policies, never experiments."""
    return FIXED_NAME.match(name) is not None


@dataclass(frozen=True)
class Arm:
    """name: the arm's label (metrics, statistics); policy: the policy it applies; weight: its
    share of traffic (relative; 0 = no new traffic); shadow: decides alongside, never applied."""

    name: str
    policy: str
    weight: float = 0.0
    shadow: bool = False


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    control: str
    shadows: tuple[Arm, ...] = ()
    salt: str = field(default_factory=lambda: secrets.token_hex(8))
    active: bool = True
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    ttl_s: float = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not POLICY_NAME.fullmatch(self.name) or is_fixed_name(self.name):
            raise InvalidArgumentError(f"experiment name must match {POLICY_NAME.pattern} and not be 'default' or "
                                       f"'fixed-<n>', got {self.name!r}")
        arms, shadows = tuple(self.arms), tuple(self.shadows)
        object.__setattr__(self, "arms", arms)
        object.__setattr__(self, "shadows", shadows)
        if not arms:
            raise InvalidArgumentError(f"experiment {self.name!r} needs at least one arm")
        names = [a.name for a in arms + shadows]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgumentError(f"experiment {self.name!r}: arm names must be unique, got {duplicates} twice")
        for arm in arms + shadows:
            if not isinstance(arm.name, str) or not ARM_NAME.fullmatch(arm.name):
                raise InvalidArgumentError(f"arm name must match {ARM_NAME.pattern}, got {arm.name!r}")
            if not isinstance(arm.policy, str) or not POLICY_NAME.fullmatch(arm.policy):
                raise InvalidArgumentError(f"arm {arm.name!r}: policy must be 'default', 'fixed-<n>' or a policy name "
                                           f"({POLICY_NAME.pattern}), got {arm.policy!r}")
            if isinstance(arm.weight, bool) or not isinstance(arm.weight, (int, float)) or not math.isfinite(arm.weight) \
                    or arm.weight < 0:
                raise InvalidArgumentError(f"arm {arm.name!r}: weight must be a finite number >= 0, got {arm.weight!r}")
        if any(a.shadow for a in arms) or any(not s.shadow or s.weight for s in shadows):
            raise InvalidArgumentError("shadow arms go in `shadows` (weight 0), traffic arms in `arms`")
        if sum(a.weight for a in arms) <= 0:
            raise InvalidArgumentError(f"experiment {self.name!r}: the arms' weights sum to 0; give at least one arm "
                                       "a positive weight (or stop the experiment)")
        if self.control not in [a.name for a in arms]:
            raise InvalidArgumentError(f"control arm {self.control!r} is not one of the arms {[a.name for a in arms]}")
        if not isinstance(self.salt, str) or not self.salt:
            raise InvalidArgumentError("salt must be a non-empty string")
        if not isinstance(self.ttl_s, (int, float)) or not math.isfinite(self.ttl_s) or self.ttl_s < 1:
            raise InvalidArgumentError(f"ttl_s must be a finite number >= 1, got {self.ttl_s!r}")

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms + self.shadows if a.name == name), None)

    @property
    def control_arm(self) -> Arm:
        return next(a for a in self.arms if a.name == self.control)

    def assign(self, key: str) -> Arm:
        """The arm of a session (or one-off decision id): sticky for a fixed configuration."""
        return assign(self, key)

    def to_json(self) -> str:
        data = {"name": self.name, "control": self.control, "salt": self.salt, "active": self.active,
                "created": self.created, "updated": self.updated, "ttl_s": self.ttl_s,
                "arms": [{"name": a.name, "policy": a.policy, "weight": a.weight} for a in self.arms],
                "shadows": [{"name": a.name, "policy": a.policy} for a in self.shadows]}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Experiment":
        try:
            data = json.loads(text)
            arms = tuple(Arm(str(a["name"]), str(a["policy"]), a["weight"]) for a in data["arms"])
            shadows = tuple(Arm(str(a["name"]), str(a["policy"]), 0.0, True) for a in data.get("shadows", []))
            return cls(name=data["name"], arms=arms, control=data["control"], shadows=shadows, salt=data["salt"],
                       active=bool(data.get("active", True)), created=float(data.get("created", 0.0)),
                       updated=float(data.get("updated", 0.0)), ttl_s=float(data.get("ttl_s", DEFAULT_TTL_S)))
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidArgumentError(f"experiment config is malformed: {err!r}") from None

    def policies(self) -> list[str]:
        """Every policy the experiment uses (traffic arms, then shadows), without repeats."""
        seen: list[str] = []
        for arm in self.arms + self.shadows:
            if arm.policy not in seen:
                seen.append(arm.policy)
        return seen


def bucket(salt: str, key: str) -> float:
    """A uniform number in [0, 1) from (salt, key): the same on every replica and every run."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign(experiment: Experiment, key: str) -> Arm:
    live = [a for a in experiment.arms if a.weight > 0]
    total = sum(a.weight for a in live)
    point = bucket(experiment.salt, key) * total
    upto = 0.0
    for arm in live:
        upto += arm.weight
        if point < upto:
            return arm
    return live[-1]  # point == total only through rounding


def parse_arm(text: str, *, shadow: bool = False) -> Arm:
    """'name=policy:weight' (traffic arm) or 'name=policy' (shadow arm), as `blockpilot ab set` takes them."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        form = "NAME=POLICY" if shadow else "NAME=POLICY:WEIGHT"
        raise InvalidArgumentError(f"arm must be {form}, got {text!r}")
    if shadow:
        return Arm(name, rest, 0.0, True)
    policy, sep, weight_text = rest.rpartition(":")
    if not sep or not policy:
        raise InvalidArgumentError(f"arm must be NAME=POLICY:WEIGHT, got {text!r}")
    try:
        weight = float(weight_text)
    except ValueError:
        raise InvalidArgumentError(f"arm {name!r}: weight must be a number, got {weight_text!r}") from None
    return Arm(name, policy, weight)


# ---- statistics ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Moments:
    """n observations summarized by their sum and sum of squares."""

    n: float = 0.0
    total: float = 0.0
    sumsq: float = 0.0

    @classmethod
    def of(cls, values) -> "Moments":
        values = [float(v) for v in values]
        return cls(len(values), sum(values), sum(v * v for v in values))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Sample variance (n - 1); clipped at 0 (sums of squares lose digits when values barely vary)."""
        if self.n < 2:
            return math.nan
        return max(0.0, (self.sumsq - self.total * self.total / self.n) / (self.n - 1))

    def ci95(self) -> tuple[float, float]:
        """95% confidence interval of the mean (Student t, n - 1 degrees of freedom); NaN below n = 2."""
        from scipy import stats

        if self.n < 2:
            return math.nan, math.nan
        half = stats.t.ppf(0.975, self.n - 1) * math.sqrt(self.variance / self.n)
        return self.mean - half, self.mean + half


@dataclass(frozen=True)
class Comparison:
    """treatment - control: the difference of means, its 95% CI (Welch-Satterthwaite degrees of
    freedom) and the two-sided p-value of Welch's t-test. NaN where undefined (n < 2, no variance)."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float


def welch(treatment: Moments, control: Moments) -> Comparison:
    from scipy import stats

    diff = treatment.mean - control.mean
    if treatment.n < 2 or control.n < 2:
        return Comparison(diff, math.nan, math.nan, math.nan)
    v1, v2 = treatment.variance / treatment.n, control.variance / control.n
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Comparison(diff, diff, diff, math.nan)
    p = float(stats.ttest_ind_from_stats(treatment.mean, math.sqrt(treatment.variance), treatment.n, control.mean,
                                         math.sqrt(control.variance), control.n, equal_var=False).pvalue)
    df = (v1 + v2) ** 2 / (v1 * v1 / (treatment.n - 1) + v2 * v2 / (control.n - 1))
    half = stats.t.ppf(0.975, df) * se
    return Comparison(diff, diff - half, diff + half, p)


@dataclass(frozen=True)
class ArmReport:
    arm: Arm
    sessions: int
    counters: dict[str, float]
    tau: Moments
    tps: Moments
    tau_vs_control: Comparison | None = None
    tps_vs_control: Comparison | None = None
    # shadow arms: decisions, agree (same block size as applied), block_size_sum
    shadow: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def moments(m: Moments) -> dict[str, Any]:
            low, high = m.ci95()
            return {"n": int(m.n), "mean": _num(m.mean), "ci95": [_num(low), _num(high)]}

        def comparison(c: Comparison | None) -> dict[str, Any] | None:
            return None if c is None else {"diff": _num(c.diff), "ci95": [_num(c.ci_low), _num(c.ci_high)],
                                           "p_value": _num(c.p_value)}

        out: dict[str, Any] = {"arm": self.arm.name, "policy": self.arm.policy, "weight": self.arm.weight,
                               "shadow": self.arm.shadow}
        if self.arm.shadow:
            decisions = self.shadow.get("decisions", 0.0)
            out.update(decisions=int(decisions),
                       agreement=_num(self.shadow.get("agree", 0.0) / decisions if decisions else math.nan),
                       mean_block_size=_num(self.shadow.get("block_size_sum", 0.0) / decisions if decisions else math.nan))
            return out
        out.update(sessions=self.sessions, requests=int(self.counters.get("requests", 0.0)),
                   fallbacks=int(self.counters.get("fallbacks", 0.0)), tau=moments(self.tau),
                   decode_tokens_per_s=moments(self.tps), tau_vs_control=comparison(self.tau_vs_control),
                   decode_tokens_per_s_vs_control=comparison(self.tps_vs_control))
        return out


def _num(value: float) -> float | None:
    """JSON has no NaN: undefined figures are null."""
    return None if value is None or not math.isfinite(value) else float(value)


# ---- the Redis store ------------------------------------------------------------------------------

Caller = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


class ExperimentStore:
    """Experiments and their arm counters in Redis (redis.asyncio client with decode_responses).

    `call(what, factory)` runs each Redis operation; the policy service passes its session store's,
    so experiments fail open with the same back-off (UnavailableError). Default: Redis errors
    become UnavailableError."""

    def __init__(self, client, *, prefix: str = "bp:", call: Caller | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self._call = call or self._plain_call
        self._parsed: dict[str, Experiment] = {}  # raw JSON -> parsed (the hot path parses once)

    @staticmethod
    async def _plain_call(what: str, factory):
        import redis.exceptions as rex

        try:
            return await factory()
        except (rex.ConnectionError, rex.TimeoutError, OSError) as err:
            raise UnavailableError(f"Redis {what} failed: {err}") from None

    # keys
    def index_key(self) -> str:
        return f"{self.prefix}experiments"

    def config_key(self, name: str) -> str:
        return f"{self.prefix}exp:{{{name}}}:config"

    def arm_key(self, name: str, arm: str) -> str:
        return f"{self.prefix}exp:{{{name}}}:arm:{arm}"

    def sessions_key(self, name: str, arm: str) -> str:
        return f"{self.prefix}exp:{{{name}}}:arm:{arm}:sessions"

    def shadow_key(self, name: str, arm: str) -> str:
        return f"{self.prefix}exp:{{{name}}}:shadow:{arm}"

    # config
    async def get(self, name: str) -> Experiment | None:
        """The experiment named `name` (active or stopped), None if there is none. A config that
        does not parse raises InvalidArgumentError (the caller decides without it, and says so)."""
        if is_fixed_name(name):
            return None
        raw = await self._call("experiment get", lambda: self.client.get(self.config_key(name)))
        if raw is None:
            return None
        parsed = self._parsed.get(raw)
        if parsed is None:
            parsed = Experiment.from_json(raw)
            if len(self._parsed) > 256:
                self._parsed.clear()
            self._parsed[raw] = parsed
        return parsed

    async def names(self) -> list[str]:
        members = await self._call("experiment list", lambda: self.client.smembers(self.index_key()))
        return sorted(members)

    async def put(self, experiment: Experiment) -> Experiment:
        """Create or change an experiment. A change keeps the existing salt and creation time, so
        sessions stay in their arms (except where weights moved the bucket bounds)."""
        existing = await self.get(experiment.name)
        if existing is not None:
            experiment = replace(experiment, salt=existing.salt, created=existing.created, updated=time.time())
        ttl = int(experiment.ttl_s)

        async def run():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.config_key(experiment.name), experiment.to_json(), ex=ttl)
                pipe.sadd(self.index_key(), experiment.name)
                # The index lives as long as its longest-lived experiment: NX gives a new set a
                # TTL, GT only ever extends it (both need Redis >= 7).
                pipe.expire(self.index_key(), ttl, nx=True)
                pipe.expire(self.index_key(), ttl, gt=True)
                await pipe.execute()

        await self._call("experiment put", run)
        return experiment

    async def stop(self, name: str) -> Experiment:
        """Stop at once (Decide ignores it from the next request on); config and counters are kept
        (until their TTL) so `ab status` still shows the result."""
        experiment = await self.get(name)
        if experiment is None:
            raise NotFoundError(f"no experiment named {name!r}")
        stopped = replace(experiment, active=False, updated=time.time())
        await self._call("experiment stop", lambda: self.client.set(self.config_key(name), stopped.to_json(),
                                                                   ex=int(stopped.ttl_s)))
        return stopped

    async def reset(self, experiment: Experiment) -> None:
        """Delete the counters of every arm (a fresh start of the statistics)."""
        keys = []
        for arm in experiment.arms:
            keys += [self.arm_key(experiment.name, arm.name), self.sessions_key(experiment.name, arm.name)]
        keys += [self.shadow_key(experiment.name, arm.name) for arm in experiment.shadows]
        await self._call("experiment reset", lambda: self.client.delete(*keys))

    # counters
    async def record_outcome(self, name: str, arm: str, session_key: str, *, tokens: int, steps: int,
                             accepted_tokens: int, decode_seconds: float, decode_tokens: int, fallback: bool,
                             ttl_s: float) -> None:
        counters: dict[str, float] = {"requests": 1, "tokens": tokens, "steps": steps, "accepted_tokens": accepted_tokens,
                                      "decode_seconds": decode_seconds, "fallbacks": int(fallback)}
        if steps > 0 and decode_seconds > 0:
            tau = decode_tokens / steps
            tps = decode_tokens / decode_seconds
            counters.update(tau_n=1, tau_sum=tau, tau_sumsq=tau * tau, tps_n=1, tps_sum=tps, tps_sumsq=tps * tps)
        key, sessions, ttl = self.arm_key(name, arm), self.sessions_key(name, arm), max(1, int(ttl_s))

        async def run():
            async with self.client.pipeline(transaction=False) as pipe:
                for counter, value in counters.items():
                    pipe.hincrbyfloat(key, counter, float(value))
                pipe.expire(key, ttl)
                pipe.pfadd(sessions, session_key)
                pipe.expire(sessions, ttl)
                await pipe.execute()

        await self._call("experiment outcome", run)

    async def record_shadow(self, name: str, arm: str, block_size: int, applied_block_size: int, ttl_s: float) -> None:
        key, ttl = self.shadow_key(name, arm), max(1, int(ttl_s))

        async def run():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hincrbyfloat(key, "decisions", 1)
                pipe.hincrbyfloat(key, "agree", float(block_size == applied_block_size))
                pipe.hincrbyfloat(key, "block_size_sum", float(block_size))
                pipe.expire(key, ttl)
                await pipe.execute()

        await self._call("experiment shadow", run)

    async def report(self, experiment: Experiment) -> list[ArmReport]:
        """Per arm: counters, sessions, τ and decode tokens/s moments, and the comparison with the
        control arm (traffic arms), then the shadow arms' agreement counters."""

        async def run():
            async with self.client.pipeline(transaction=False) as pipe:
                for arm in experiment.arms:
                    pipe.hgetall(self.arm_key(experiment.name, arm.name))
                    pipe.pfcount(self.sessions_key(experiment.name, arm.name))
                for arm in experiment.shadows:
                    pipe.hgetall(self.shadow_key(experiment.name, arm.name))
                return await pipe.execute()

        replies = await self._call("experiment report", run)
        reports: dict[str, ArmReport] = {}
        for index, arm in enumerate(experiment.arms):
            raw, sessions = replies[2 * index], replies[2 * index + 1]
            counters = {k: float(v) for k, v in (raw or {}).items()}
            tau = Moments(counters.get("tau_n", 0.0), counters.get("tau_sum", 0.0), counters.get("tau_sumsq", 0.0))
            tps = Moments(counters.get("tps_n", 0.0), counters.get("tps_sum", 0.0), counters.get("tps_sumsq", 0.0))
            reports[arm.name] = ArmReport(arm, int(sessions or 0), counters, tau, tps)
        control = reports[experiment.control]
        out = []
        for arm in experiment.arms:
            report = reports[arm.name]
            if arm.name != experiment.control:
                report = replace(report, tau_vs_control=welch(report.tau, control.tau),
                                 tps_vs_control=welch(report.tps, control.tps))
            out.append(report)
        offset = 2 * len(experiment.arms)
        for index, arm in enumerate(experiment.shadows):
            raw = replies[offset + index] or {}
            out.append(ArmReport(arm, 0, {}, Moments(), Moments(), shadow={k: float(v) for k, v in raw.items()}))
        return out
