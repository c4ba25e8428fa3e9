"""Faults with greedy streams in flight, every output compared with its reference: one fault table.

Starts its own stack with `blockpilot up`'s machinery (blockpilot/serving/stack.py) on loopback
ports that are free, with its own redis-server and run dir; takes each prompt's reference one
request at a time at block size 1, prompt lookup off; then runs, in this order:

  overload            more streams than the verifier's max_streams: the extra get RESOURCE_EXHAUSTED
                      at once (client retries off), the admitted ones finish identical
  restart drafter     rolling restart (SIGTERM: drain, then start again) of each service in turn
  restart policy        while client threads stream the default path (policy block size, lookup on)
  restart verifier      and retry (the client retries before the first token only; a stream cut
                      after tokens is reissued by the thread, and that retry must be identical)
  verifier retry      the verifier stopped, a client call started, the verifier started again: the
                      client (gRPC wait_for_ready) carries the call over the restart
  drafter killed      SIGKILL mid-stream, then started again
  policy down         stopped while requests arrive, then started again
  redis down          the stack's Redis stopped with streams in flight, requests while it is down,
                      started again: the services use it again without a restart
  client cancel       a stream closed by its client after two messages: the verifier frees it
  deadline            deadlines that expire before and during a stream

Per fault: expected, observed, requests, errors by status, outputs changed (a completed output that
differs from its reference), cut streams whose tokens are not a prefix of the reference, requests
lost (never completed identical, retry included), fallback reasons, pass. JSON (--out) with the
machine; a markdown table on stdout. Exit 1 when a fault did not behave as expected.
Bounded: --max-minutes for the whole run, a deadline on every call, a bound on every wait.

    .venv/bin/python benchmarks/faults.py ../shared/datasets --out runs/faults.json          # default model
    .venv/bin/python benchmarks/faults.py --tiny --out runs/faults-tiny.json                  # tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blockpilot.benchmarking import load_prompts, machine_info
from blockpilot.client import BlockPilotClient
from blockpilot.errors import BlockPilotError
from blockpilot.serving import stack

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    """One request as its client saw it."""

    prompt: int
    status: str  # "OK" or the gRPC status name
    tokens: list[int]
    fallback_reason: str = ""
    seconds: float = 0.0
    retry_of_cut: bool = False  # reissued after a stream was cut mid-way


@dataclass
class Fault:
    fault: str
    expected: str
    outcomes: list[Outcome] = field(default_factory=list)
    observed: str = ""
    details: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)


class Runner:
    def __init__(self, args, opts: stack.StackOptions, prompts: list[dict], references: list[list[int]], address: str,
                 metrics: str, deadline: float) -> None:
        self.args, self.opts, self.prompts, self.references = args, opts, prompts, references
        self.address, self.metrics_url, self.deadline = address, metrics, deadline

    # ---- requests -------------------------------------------------------------------------

    def client(self, retries: int | None = None) -> BlockPilotClient:
        """A client that waits for a restarting verifier (gRPC wait_for_ready, within the request
        timeout) and retries busy refusals; retries=0: neither (a refusal is the observation)."""
        retries = self.args.retries if retries is None else retries
        return BlockPilotClient(self.address, retries=retries, backoff_s=self.args.backoff_s, wait_for_ready=retries > 0,
                                timeout=self.args.request_timeout_s)

    def request_args(self, prompt: int, **extra) -> dict:
        return {**self.prompts[prompt]["request"], "max_new_tokens": self.args.max_new_tokens, **extra}

    def call(self, client: BlockPilotClient, prompt: int, on_first=None, timeout: float | None = None, **extra) -> Outcome:
        """One streamed request; on_first() runs when its first tokens arrive."""
        tokens: list[int] = []
        began = time.monotonic()
        try:
            for event in client.stream(timeout=timeout, **self.request_args(prompt, **extra)):
                if event.final is not None:
                    return Outcome(prompt, "OK", tokens, event.final.fallback_reason, time.monotonic() - began)
                if event.token_ids and not tokens and on_first is not None:
                    on_first()
                tokens += event.token_ids
        except BlockPilotError as err:
            code = getattr(err, "status_code", None)
            return Outcome(prompt, code.name if code is not None else type(err).__name__, tokens, "", time.monotonic() - began)
        raise RuntimeError("the stream ended without a final message")

    def is_prefix(self, outcome: Outcome) -> bool:
        return outcome.tokens == self.references[outcome.prompt][: len(outcome.tokens)]

    def inflight(self) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "blockpilot_inflight_requests" and s.labels.get("service") == "verifier")

    def wait_for(self, predicate, timeout: float, what: str) -> float:
        began = time.monotonic()
        while not predicate():
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - began

    def check_time(self, name: str) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"--max-minutes {self.args.max_minutes:g} reached before the fault {name!r}")

    # ---- streams in flight during an action -----------------------------------------------

    def with_streams(self, fault: Fault, action) -> None:
        """`--streams` client threads send the prompts round-robin (the default path) while
        action() runs, once every thread has a stream with tokens; after action() returns, each
        thread finishes one request it sent afterwards (recovery), then stops. A stream cut after
        tokens is reissued at once (the client's own retries cover only the time before a first
        token)."""
        lock = threading.Lock()
        streaming: set[int] = set()
        acted = threading.Event()
        done_after: set[int] = set()
        errors: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                with self.client() as client:
                    turn = index
                    retry = False
                    while time.monotonic() < self.deadline:
                        prompt = turn % len(self.prompts)
                        sent_after = acted.is_set()
                        outcome = self.call(client, prompt, on_first=lambda: streaming.add(index))
                        outcome.retry_of_cut = retry
                        with lock:
                            fault.outcomes.append(outcome)
                        retry = outcome.status != "OK" and bool(outcome.tokens)
                        if retry:
                            continue  # the same prompt again: the retried request must be identical
                        turn += 1
                        if sent_after:
                            with lock:
                                done_after.add(index)
                            return
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.args.streams)]
        for thread in threads:
            thread.start()
        # Every thread has streamed, and the verifier has as many streams open: the fault meets them in flight.
        self.wait_for(lambda: errors or (len(streaming) == len(threads) and self.inflight() >= len(threads)), 300,
                      "every client thread streaming")
        fault.details["inflight_at_fault"] = self.inflight()
        began = time.monotonic()
        action()
        fault.details["action_s"] = round(time.monotonic() - began, 2)
        acted.set()
        for thread in threads:
            thread.join(timeout=max(1.0, self.deadline - time.monotonic()))
        if errors:
            raise errors[0]
        if any(thread.is_alive() for thread in threads):
            raise TimeoutError("client threads still running at --max-minutes")

    # ---- the faults -----------------------------------------------------------------------

    def overload(self) -> Fault:
        limit, extra = self.args.max_streams, self.args.overload_extra
        fault = Fault("overload", f"{extra} requests beyond max_streams={limit} get RESOURCE_EXHAUSTED at once (client "
                                  f"retries off); the {limit} admitted streams finish identical")
        clients = [self.client(retries=0) for _ in range(limit)]
        streams = [c.stream(**self.request_args(i % len(self.prompts))) for i, c in enumerate(clients)]
        received: list[list[int]] = [[] for _ in streams]
        finals = [None] * len(streams)
        try:
            for i, events in enumerate(streams):  # admitted: each has sent its first tokens
                for event in events:
                    received[i] += event.token_ids
                    if event.token_ids:
                        break
            # A refusal proves the limit was full when it came: had an admitted stream ended, the
            # extra request would have been admitted (and counted as not refused).
            refusals = []
            with self.client(retries=0) as client:
                for j in range(extra):
                    outcome = self.call(client, j % len(self.prompts))
                    fault.outcomes.append(outcome)
                    refusals.append(outcome.seconds)
            for i, events in enumerate(streams):
                for event in events:
                    if event.final is not None:
                        finals[i] = event.final
                    received[i] += event.token_ids
        finally:
            for events in streams:
                events.close()
            for c in clients:
                c.close()
        for i, tokens in enumerate(received):
            fault.outcomes.append(Outcome(i % len(self.prompts), "OK" if finals[i] is not None else "NO_FINAL", tokens,
                                          finals[i].fallback_reason if finals[i] is not None else ""))
        with self.client(retries=0) as client:  # the slots are free again
            after = self.call(client, 0)
        fault.outcomes.append(after)
        refused = [o for o in fault.outcomes[:extra] if o.status == "RESOURCE_EXHAUSTED"]
        admitted = fault.outcomes[extra:extra + limit]
        fault.details.update(refusal_s_max=round(max(refusals), 3), refusal_s_median=round(sorted(refusals)[len(refusals) // 2], 3))
        fault.checks = {"extra refused RESOURCE_EXHAUSTED": len(refused) == extra,
                        "admitted identical": all(o.status == "OK" and o.tokens == self.references[o.prompt] for o in admitted),
                        "a request after them admitted and identical": after.status == "OK" and after.tokens == self.references[0]}
        fault.observed = (f"{len(refused)}/{extra} refused RESOURCE_EXHAUSTED in {fault.details['refusal_s_median'] * 1000:.0f} ms "
                          f"(max {fault.details['refusal_s_max'] * 1000:.0f} ms); admitted identical {sum(o.tokens == self.references[o.prompt] for o in admitted)}/{limit}")
        return fault

    def restart(self, name: str) -> Fault:
        expected = {
            "drafter": "streams finish identical (drafts from the draining drafter, else block size 1: drafter_*); "
                       "no client error",
            "policy": "streams finish identical; requests while it is down take the default block size "
                      "(policy_unavailable); no client error",
            "verifier": f"streams still running after the drain grace ({self.args.verifier_grace_s:g} s) are cut: the "
                        "client sees an error after tokens, the tokens a prefix of the reference; the reissued request "
                        "(client retries over the restart) is identical",
        }[name]
        fault = Fault(f"restart {name}", expected)

        def action():
            stopped = stack.stop_service(name, grace_s=60)
            began = time.monotonic()
            stack.start_service(name, self.opts, timeout_s=300)
            fault.details.update(stopped_pid=stopped, restart_s=round(time.monotonic() - began, 2))

        self.with_streams(fault, action)
        self.summarize_streams(fault, allow_cuts=name == "verifier")
        return fault

    def verifier_retry(self) -> Fault:
        fault = Fault("verifier restarted while a client retries",
                      "the call, started while the verifier is down, is carried over the restart by the client (gRPC "
                      "wait_for_ready: it waits for the channel within its deadline) and returns the identical output")
        stack.stop_service("verifier", grace_s=60)
        result: dict = {}
        started = threading.Event()

        def caller():
            with self.client() as client:
                started.set()
                result["outcome"] = self.call(client, 0)

        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        started.wait(10)
        time.sleep(0.5)  # the call's first attempts meet a closed port (what the fault is about)
        began = time.monotonic()
        stack.start_service("verifier", self.opts, timeout_s=300)
        restart_s = time.monotonic() - began
        thread.join(timeout=max(1.0, self.args.request_timeout_s))
        outcome = result.get("outcome") or Outcome(0, "CLIENT_HUNG", [])
        fault.outcomes.append(outcome)
        identical = outcome.status == "OK" and outcome.tokens == self.references[0]
        fault.details.update(restart_s=round(restart_s, 2), call_s=round(outcome.seconds, 2), retries=self.args.retries,
                             backoff_s=self.args.backoff_s, wait_for_ready=True)
        fault.checks = {"the call outlived the restart": outcome.seconds > restart_s, "identical": identical}
        fault.observed = (f"call returned {outcome.status} after {outcome.seconds:.1f} s (verifier down, then {restart_s:.1f} s "
                          f"to SERVING); output {'identical' if identical else 'DIFFERENT'}")
        return fault

    def drafter_killed(self) -> Fault:
        fault = Fault("drafter killed mid-stream", "streams finish identical, at block size 1 from the kill on (a drafter_* "
                                                   "fallback) until it is back; no client error")

        def action():
            stack.stop_service("drafter", kill=True)
            began = time.monotonic()
            stack.start_service("drafter", self.opts, timeout_s=300)
            fault.details["restart_s"] = round(time.monotonic() - began, 2)

        self.with_streams(fault, action)
        self.summarize_streams(fault)
        fault.checks["drafter_* fallback reported"] = any("drafter_" in o.fallback_reason for o in fault.outcomes)
        return fault

    def policy_down(self) -> Fault:
        fault = Fault("policy down", "requests take the default block size (policy_unavailable), identical; no client error")
        stack.stop_service("policy", grace_s=60)
        try:
            with self.client() as client:
                for prompt in range(len(self.prompts)):
                    fault.outcomes.append(self.call(client, prompt))
        finally:
            stack.start_service("policy", self.opts, timeout_s=300)
        self.summarize_streams(fault)
        fault.checks["policy_unavailable reported"] = all("policy_unavailable" in o.fallback_reason for o in fault.outcomes)
        return fault

    def redis_down(self) -> Fault:
        fault = Fault("redis down and back", "streams and new sessions finish identical (session_store_unavailable while "
                                             "down); the store is used again without a restart; no client error")

        def action():
            stack.stop_service("redis", grace_s=30)
            with self.client() as client:
                for prompt in range(min(2, len(self.prompts))):
                    outcome = self.call(client, prompt, new_session=True)
                    fault.outcomes.append(outcome)
            stack.start_service("redis", self.opts)
            began = time.monotonic()
            with self.client() as client:  # the store retries after its back-off (1 s): bounded poll until clean
                while True:
                    outcome = self.call(client, 0, new_session=True)
                    fault.outcomes.append(outcome)
                    if outcome.status != "OK" or "session_store_unavailable" not in outcome.fallback_reason:
                        break
                    if time.monotonic() - began > 30:
                        break
            fault.details["recovered_s"] = round(time.monotonic() - began, 2)
            fault.details["recovered"] = outcome.status == "OK" and "session_store_unavailable" not in outcome.fallback_reason

        self.with_streams(fault, action)
        self.summarize_streams(fault)
        fault.checks["session_store_unavailable while down"] = any("session_store_unavailable" in o.fallback_reason
                                                                   for o in fault.outcomes)
        fault.checks["store used again"] = fault.details["recovered"]
        return fault

    def client_cancel(self) -> Fault:
        fault = Fault("client cancel", "the verifier frees the stream (in-flight gauge back to 0); the next request is identical")
        with self.client(retries=0) as client:
            tokens: list[int] = []
            events = client.stream(**self.request_args(0))
            for event in events:
                tokens += event.token_ids
                if len(tokens) >= 2:
                    break
            events.close()  # cancels the call
            fault.outcomes.append(Outcome(0, "CANCELLED", tokens))
            freed_s = self.wait_for(lambda: self.inflight() == 0, 30, "verifier in-flight gauge back to 0")
            after = self.call(client, 0)
        fault.outcomes.append(after)
        fault.details["freed_s"] = round(freed_s, 2)
        fault.checks = {"tokens before the cancel a prefix": self.is_prefix(fault.outcomes[0]),
                        "next request identical": after.status == "OK" and after.tokens == self.references[0]}
        fault.observed = (f"cancelled after {len(tokens)} tokens; in-flight 0 after {freed_s:.1f} s; next request "
                          f"{'identical' if fault.checks['next request identical'] else after.status + ' / DIFFERENT'}")
        return fault

    def deadline_expiry(self) -> Fault:
        fault = Fault("deadline expiry", "an expired deadline and one that ends mid-stream give DEADLINE_EXCEEDED, the tokens "
                                         "so far a prefix of the reference; the next request is identical")
        with self.client(retries=0) as client:
            expired = self.call(client, 0, timeout=1e-6)
            whole = self.call(client, 0)  # how long the request takes now: half of it ends mid-stream
            mid = self.call(client, 0, timeout=0.5 * whole.seconds)
            fault.outcomes += [expired, whole, mid]
            self.wait_for(lambda: self.inflight() == 0, 30, "verifier in-flight gauge back to 0")
            after = self.call(client, 0)
        fault.outcomes.append(after)
        fault.checks = {"expired: DEADLINE_EXCEEDED": expired.status == "DEADLINE_EXCEEDED",
                        "whole request identical": whole.status == "OK" and whole.tokens == self.references[0],
                        "mid-stream: DEADLINE_EXCEEDED after tokens": mid.status == "DEADLINE_EXCEEDED" and bool(mid.tokens),
                        "tokens a prefix": self.is_prefix(mid),
                        "next request identical": after.status == "OK" and after.tokens == self.references[0]}
        fault.observed = (f"expired: {expired.status}; mid-stream: {mid.status} after {len(mid.tokens)} tokens "
                          f"(prefix: {self.is_prefix(mid)}); next request {after.status}, "
                          f"{'identical' if after.tokens == self.references[0] else 'DIFFERENT'}")
        return fault

    def summarize_streams(self, fault: Fault, allow_cuts: bool = False) -> None:
        """Checks and the observed line of a fault whose requests should all complete identical
        (allow_cuts: a stream may be cut after tokens if its reissue is identical)."""
        done = [o for o in fault.outcomes if o.status == "OK"]
        changed = [o for o in done if o.tokens != self.references[o.prompt]]
        cut = [o for o in fault.outcomes if o.status != "OK" and o.tokens]
        before_first = [o for o in fault.outcomes if o.status != "OK" and not o.tokens]
        retried = [o for o in fault.outcomes if o.retry_of_cut]
        fallbacks = Counter(o.fallback_reason or "-" for o in done)
        fault.checks.update({"no output changed": not changed, "cut streams a prefix": all(self.is_prefix(o) for o in cut),
                             "no error before a first token": not before_first})
        if allow_cuts:
            fault.checks["every cut stream retried identical"] = len(retried) >= len(cut) and all(
                o.status == "OK" and o.tokens == self.references[o.prompt] for o in retried)
        else:
            fault.checks["no stream cut"] = not cut
        fault.observed = (f"{len(done)}/{len(fault.outcomes)} completed, {len(changed)} changed; {len(cut)} cut after tokens "
                          f"({sum(len(o.tokens) for o in cut)} tokens, prefix {all(self.is_prefix(o) for o in cut)})"
                          + (f", retried identical {sum(o.status == 'OK' and o.tokens == self.references[o.prompt] for o in retried)}"
                             f"/{len(retried)}" if retried else "")
                          + f"; fallbacks {dict(fallbacks)}")
        for key in ("restart_s", "action_s"):
            if key in fault.details:
                fault.observed += f"; {key.replace('_s', '')} {fault.details[key]:.1f} s"
                break


def fault_record(fault: Fault, references: list[list[int]]) -> dict:
    errors = Counter(o.status for o in fault.outcomes if o.status != "OK")
    changed = sum(1 for o in fault.outcomes if o.status == "OK" and o.tokens != references[o.prompt])
    cut_not_prefix = sum(1 for o in fault.outcomes if o.status != "OK" and o.tokens != references[o.prompt][: len(o.tokens)])
    return {"fault": fault.fault, "expected": fault.expected, "observed": fault.observed, "requests": len(fault.outcomes),
            "errors_by_status": dict(errors), "outputs_changed": changed, "cut_tokens_not_prefix": cut_not_prefix,
            "fallbacks": dict(Counter(o.fallback_reason for o in fault.outcomes if o.status == "OK" and o.fallback_reason)),
            "checks": fault.checks, "passed": all(fault.checks.values()), "details": fault.details}


def markdown(records: list[dict]) -> str:
    lines = ["| fault | expected | observed | requests | errors by status | outputs changed | pass |",
             "| --- | --- | --- | ---: | --- | ---: | --- |"]
    for r in records:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors_by_status"].items()) or "-"
        failed = [k for k, ok in r["checks"].items() if not ok]
        verdict = "yes" if r["passed"] else "NO (" + "; ".join(failed) + ")"
        lines.append(f"| {r['fault']} | {r['expected']} | {r['observed']} | {r['requests']} | {errors} | "
                     f"{r['outputs_changed']} | {verdict} |")
    return "\n".join(lines)


def tiny_target(folder: Path) -> Path:
    """The tests' tiny random Llama (tests/tiny_models.py: no download, no tokenizer), saved once."""
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' helper module, shared rather than copied
    from tiny_models import build_tiny_hf_model, save_tiny_hf_model

    out = folder / "tiny-llama"
    if not (out / "config.json").is_file():
        save_tiny_hf_model(build_tiny_hf_model("llama", seed=0), out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, nargs="?", help="folder of evaluation *.jsonl files (not with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (token-id prompts, random drafter, torch)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=3, help="client threads streaming during a fault")
    parser.add_argument("--max-streams", type=int, default=4, help="the verifier's stream limit (its max_streams)")
    parser.add_argument("--overload-extra", type=int, default=4, help="requests sent beyond the limit")
    parser.add_argument("--verifier-grace-s", type=float, default=1.0,
                        help="the verifier's drain grace: short, so that a restart cuts streams (its default, 10 s, "
                             "lets most finish)")
    parser.add_argument("--retries", type=int, default=4, help="client retries before a first token (UNAVAILABLE, busy; "
                                                               "gRPC allows 0..4); with retries the client also waits for "
                                                               "an unreachable verifier (wait_for_ready)")
    parser.add_argument("--backoff-s", type=float, default=0.25, help="client back-off, doubled per retry (gRPC's jitter)")
    parser.add_argument("--request-timeout-s", type=float, default=240.0)
    parser.add_argument("--threads", type=int, default=1, help="threads per service")
    parser.add_argument("--max-minutes", type=float, default=12.0, help="bound of the whole run")
    parser.add_argument("--run-dir", type=Path, default=None, help="the stack's run dir (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.tiny == (args.datasets is not None):
        parser.error("give a datasets folder or --tiny (not both)")
    if args.streams >= args.max_streams:
        parser.error("--streams must stay below --max-streams (the restarts measure faults, not the limit)")
    began = time.monotonic()
    deadline = began + args.max_minutes * 60

    folder = args.run_dir or Path(tempfile.mkdtemp(prefix="blockpilot-faults-"))
    folder.mkdir(parents=True, exist_ok=True)
    # The stack reads its run dir and the services their settings from the environment.
    os.environ.update({"BLOCKPILOT_RUN_DIR": str(folder), "OMP_NUM_THREADS": str(args.threads),
                       "BLOCKPILOT_VERIFIER_MAX_STREAMS": str(args.max_streams),
                       "BLOCKPILOT_VERIFIER_GRACE_S": str(args.verifier_grace_s)})
    ports = {f"{name}_{kind}": stack_free_port() for name in stack.SERVICES for kind in ("port", "metrics_port")}
    redis_url = f"redis://127.0.0.1:{stack_free_port()}/0"  # nothing answers there: `up` starts its own redis-server
    if args.tiny:
        # The drafter's per-step delay (a fault-injection setting) keeps the tiny model's streams in
        # flight long enough for a fault to meet them.
        os.environ["BLOCKPILOT_DRAFTER_STEP_DELAY_S"] = "0.02"
        # The shipped policy reads the default model's features; the tiny model gets the fixed default size.
        os.environ["BLOCKPILOT_POLICY_DEFAULT_POLICY"] = "default"
        opts = stack.StackOptions(target=str(tiny_target(folder)), drafter="random", backend="torch", redis_url=redis_url,
                                  threads=args.threads, timeout_s=300, **ports)
        rng = random.Random(0)
        prompts = [{"id": f"tiny-{i}", "request": {"token_ids": [rng.randrange(3, 97) for _ in range(12)]}}
                   for i in range(args.prompts)]
    else:
        opts = stack.StackOptions(redis_url=redis_url, threads=args.threads, timeout_s=600, **ports)
        prompts = [{"id": p["id"], "request": {"messages": [{"role": "user", "content": p["text"]}]}}
                   for p in load_prompts(args.datasets, args.prompts)]
    print(f"faults: run dir {folder}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.streams} streams, "
          f"max_streams {args.max_streams}", file=sys.stderr)
    records: list[dict] = []
    state = stack.up(opts, log=lambda line: print(line, file=sys.stderr))
    try:
        address = state["services"]["verifier"]["address"]
        with BlockPilotClient(address, timeout=args.request_timeout_s) as client:
            references = [client.generate(**p["request"], max_new_tokens=args.max_new_tokens, block_size="off",
                                          prompt_lookup=False).token_ids for p in prompts]
        print(f"references: {len(references)} prompts ({sum(map(len, references))} tokens)", file=sys.stderr)
        runner = Runner(args, opts, prompts, references, address, state["services"]["verifier"]["metrics"], deadline)
        plan = [("overload", runner.overload), ("restart drafter", lambda: runner.restart("drafter")),
                ("restart policy", lambda: runner.restart("policy")), ("restart verifier", lambda: runner.restart("verifier")),
                ("verifier retry", runner.verifier_retry), ("drafter killed", runner.drafter_killed),
                ("policy down", runner.policy_down), ("redis down", runner.redis_down),
                ("client cancel", runner.client_cancel), ("deadline", runner.deadline_expiry)]
        for name, run in plan:
            runner.check_time(name)
            fault_began = time.monotonic()
            record = fault_record(run(), references)
            record["seconds"] = round(time.monotonic() - fault_began, 1)
            records.append(record)
            print(f"{record['fault']}: {'pass' if record['passed'] else 'FAIL'}: {record['observed']}", file=sys.stderr)
    finally:
        stack.down(grace_s=10, log=lambda line: print(line, file=sys.stderr))
    report = {"machine": machine_info(), "model": "tiny random llama (tests/tiny_models.py)" if args.tiny else "default",
              "backend": opts.backend or "onnxruntime (the verifier's default)",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "prompts": [p["id"] for p in prompts], "reference": "one request at a time, block size 1, prompt lookup off",
              "minutes": round((time.monotonic() - began) / 60, 2), "faults": records,
              "passed": all(r["passed"] for r in records)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(records))
    return 0 if report["passed"] else 1


def stack_free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
