"""`blockpilot ab ...` commands: A/B experiments of block-size policies (registered by blockpilot.cli).

    blockpilot ab set NAME --arm control=default:50 --arm treat=<policy>:50 [--shadow ARM=POLICY]
                           [--control ARM] [--ttl-days D] [--reset] [--redis-url URL]
    blockpilot ab status [NAME] [--json] [--redis-url URL]
    blockpilot ab stop NAME [--redis-url URL]

The experiment lives in Redis (blockpilot/policy/experiments.py), so every policy replica applies a
change from its next decision on: re-running `set` with other weights shifts traffic at once, and a
weight of 0 is a rollback. Requests reach the experiment by naming it as their policy, or by
naming none when the policy service's default_policy is NAME.

Which Redis: --redis-url, else $BLOCKPILOT_POLICY_REDIS_URL, else the Redis of the local stack that
`blockpilot up` runs (read from its run dir; for a Redis that `up --secure` started, as its ACL user
with the password in <run dir>/secure/redis-password), else redis://127.0.0.1:6379/0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from urllib.parse import urlparse

from blockpilot.cli_args import OneLineParser, checked_number
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from blockpilot.policy.experiments import DEFAULT_TTL_S, ArmReport, Comparison, Experiment, ExperimentStore, parse_arm

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"must be a redis://, rediss:// or unix:// URL, got {text!r}")
    return text


def _ttl_days(text: str) -> float:
    return checked_number(text, float, "a number of days", lambda v: math.isfinite(v) and v > 0, "a positive number of days")


def resolve_redis_url(given: str | None) -> tuple[str, str]:
    """The Redis `ab` talks to and where that choice came from (see the module doc)."""
    if given:
        return given, "--redis-url"
    from_env = os.environ.get("BLOCKPILOT_POLICY_REDIS_URL", "").strip()
    if from_env:
        try:
            return _redis_url(from_env), "$BLOCKPILOT_POLICY_REDIS_URL"
        except argparse.ArgumentTypeError as err:
            raise InvalidArgumentError(f"$BLOCKPILOT_POLICY_REDIS_URL {err}") from None
    from blockpilot.serving import stack

    state = stack.read_state()  # present from `up` until `down`
    if state is not None:
        url = stack.stack_redis_url(state)
        if url == "memory":
            raise FailedPreconditionError("the local stack runs without Redis (in-memory stores), so it has no experiments "
                                          "to change; give --redis-url")
        return url, f"the local stack in {state['run_dir']}"
    return DEFAULT_REDIS_URL, "the default"


def _printable(url: str) -> str:
    """The URL without its password (errors may be pasted into tickets)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=f"{parsed.username or ''}:***@{parsed.hostname}:{parsed.port or 6379}").geturl()


def add_parsers(sub) -> None:
    """Adds `ab set`, `ab status` and `ab stop` to the top-level parser."""
    ab = sub.add_parser("ab", help="A/B experiments of block-size policies (kept in Redis)")
    commands = ab.add_subparsers(dest="ab_command", required=True, parser_class=OneLineParser)
    # --redis-url's default is resolved when the command runs (resolve_redis_url): the local stack may start or stop.
    redis_help = ("Redis of the policy service (default: $BLOCKPILOT_POLICY_REDIS_URL, else the Redis of the local stack "
                  "`blockpilot up` runs, with the ACL user and password of `up --secure` when it started that Redis, "
                  f"else {DEFAULT_REDIS_URL}); an external secured Redis: redis://USER:PASSWORD@HOST:PORT/0")

    create = commands.add_parser("set", help="create an experiment or change it (weights take effect at once)")
    create.add_argument("name", metavar="NAME", help="experiment name; requests reach it by naming it as their policy "
                                                     "(or by naming none when it is the service's default_policy)")
    create.add_argument("--arm", dest="arms", action="append", required=True, metavar="NAME=POLICY:WEIGHT",
                        help="traffic arm: POLICY is 'default', 'fixed-<n>' or a learned policy; WEIGHT its relative "
                             "share of sessions (0 = no traffic). Repeat for each arm.")
    create.add_argument("--shadow", dest="shadows", action="append", default=[], metavar="NAME=POLICY",
                        help="shadow arm: decides every request of the experiment too, logged and counted, never applied")
    create.add_argument("--control", default=None, metavar="ARM",
                        help="the control arm (default: the arm named 'control', else the first --arm)")
    create.add_argument("--ttl-days", type=_ttl_days, default=DEFAULT_TTL_S / 86400,
                        help=f"the experiment expires this long after its last change (default {DEFAULT_TTL_S / 86400:g})")
    create.add_argument("--reset", action="store_true", help="clear the arms' statistics (a fresh start)")
    create.add_argument("--redis-url", type=_redis_url, default=None, help=redis_help)
    create.set_defaults(handler=_set)

    status = commands.add_parser("status", help="per arm: sessions, mean τ and decode tokens/s with 95%% CIs, "
                                                "difference to the control and Welch's p-value")
    status.add_argument("name", metavar="NAME", nargs="?", default=None, help="one experiment (default: all)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--redis-url", type=_redis_url, default=None, help=redis_help)
    status.set_defaults(handler=_status)

    stop = commands.add_parser("stop", help="stop an experiment at once (its statistics are kept)")
    stop.add_argument("name", metavar="NAME")
    stop.add_argument("--redis-url", type=_redis_url, default=None, help=redis_help)
    stop.set_defaults(handler=_stop)


def _run(given_url: str | None, work):
    """Run `work(store)` against the Redis resolve_redis_url picks; unreachable Redis is
    UnavailableError, a refused login FailedPreconditionError (exit 1), each naming the Redis."""
    import redis.asyncio as aioredis
    import redis.exceptions as rex

    from blockpilot.serving.stack import REDIS_USER

    url, source = resolve_redis_url(given_url)

    async def main():
        client = aioredis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
        try:
            # A login failure surfaces on the first command as a connection error ("HELLO must be
            # called with the client already authenticated", "invalid username-password pair"):
            # check it here, so that it is reported as what it is.
            try:
                await client.ping()
            except rex.AuthenticationError as err:
                raise FailedPreconditionError(
                    f"Redis {_printable(url)} ({source}) refused the login: {str(err).rstrip('.')}. A Redis that `blockpilot up --secure` "
                    f"started takes user {REDIS_USER} with the password in <run dir>/secure/redis-password: run `ab` "
                    "while that stack is up without --redis-url, or give redis://USER:PASSWORD@HOST:PORT/0") from None
            except (rex.ConnectionError, rex.TimeoutError, OSError) as err:
                raise UnavailableError(f"Redis {_printable(url)} ({source}) does not answer: {err}") from None
            return await work(ExperimentStore(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def _set(args: argparse.Namespace) -> int:
    arms = tuple(parse_arm(text) for text in args.arms)
    shadows = tuple(parse_arm(text, shadow=True) for text in args.shadows)
    names = [a.name for a in arms]
    control = args.control or ("control" if "control" in names else names[0])
    experiment = Experiment(args.name, arms, control, shadows, ttl_s=args.ttl_days * 86400)

    async def work(store: ExperimentStore):
        saved = await store.put(experiment)
        if args.reset:
            await store.reset(saved)
        return saved

    saved = _run(args.redis_url, work)
    total = sum(a.weight for a in saved.arms)
    arms_text = ", ".join(f"{a.name}={a.policy} ({100 * a.weight / total:.1f}%)" for a in saved.arms)
    shadow_text = "; shadow " + ", ".join(f"{a.name}={a.policy}" for a in saved.shadows) if saved.shadows else ""
    print(f"experiment {saved.name}: {arms_text}; control {saved.control}{shadow_text}"
          f"{' (statistics reset)' if args.reset else ''}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = _run(args.redis_url, lambda store: store.stop(args.name))
    print(f"experiment {stopped.name} stopped (statistics kept; `blockpilot ab status {stopped.name}`)")
    return 0


def _status(args: argparse.Namespace) -> int:
    async def work(store: ExperimentStore):
        names = [args.name] if args.name else await store.names()
        out = []
        for name in names:
            experiment = await store.get(name)
            if experiment is None:
                if args.name:
                    raise NotFoundError(f"no experiment named {name!r}")
                continue  # expired since it was listed
            out.append((experiment, await store.report(experiment)))
        return out

    results = _run(args.redis_url, work)
    if args.json:
        print(json.dumps({"experiments": [_experiment_dict(e, r) for e, r in results]}, indent=2))
        return 0
    if not results:
        print("no experiments")
        return 0
    for index, (experiment, reports) in enumerate(results):
        if index:
            print()
        print(format_experiment(experiment, reports))
    return 0


def _experiment_dict(experiment: Experiment, reports: list[ArmReport]) -> dict:
    return {"name": experiment.name, "active": experiment.active, "control": experiment.control,
            "created": experiment.created, "updated": experiment.updated, "arms": [r.as_dict() for r in reports]}


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ci(mean: float, low: float, high: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(low):
        return _fmt(mean, digits)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _p(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _versus(comparison: Comparison | None, digits: int) -> list[str]:
    if comparison is None:
        return ["(control)", ""]
    return [_ci(comparison.diff, comparison.ci_low, comparison.ci_high, digits), _p(comparison.p_value)]


def format_experiment(experiment: Experiment, reports: list[ArmReport]) -> str:
    state = "active" if experiment.active else "stopped"
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(experiment.updated))
    lines = [f"experiment {experiment.name} ({state}; control arm {experiment.control}; last change {updated})"]
    header = ["arm", "policy", "weight", "sessions", "requests", "τ mean [95% CI]", "Δτ vs control [95% CI]", "p",
              "decode tok/s [95% CI]", "Δ tok/s vs control [95% CI]", "p"]
    rows = [header]
    total = sum(a.weight for a in experiment.arms)
    for report in reports:
        if report.arm.shadow:
            continue
        tau_low, tau_high = report.tau.ci95()
        tps_low, tps_high = report.tps.ci95()
        rows.append([report.arm.name, report.arm.policy, f"{100 * report.arm.weight / total:.0f}%", str(report.sessions),
                     str(int(report.counters.get("requests", 0))), _ci(report.tau.mean, tau_low, tau_high, 2),
                     *_versus(report.tau_vs_control, 2), _ci(report.tps.mean, tps_low, tps_high, 1),
                     *_versus(report.tps_vs_control, 1)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for report in reports:
        if report.arm.shadow:
            data = report.as_dict()
            agreement = data["agreement"]
            lines.append(f"shadow {report.arm.name} ({report.arm.policy}): {data['decisions']} decisions, "
                         f"agrees with the applied size in {'-' if agreement is None else f'{100 * agreement:.1f}%'}, "
                         f"mean block size {_fmt(data['mean_block_size'], 2)}")
    return "\n".join(lines)
