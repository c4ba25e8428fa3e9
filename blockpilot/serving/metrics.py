"""Prometheus metrics of the three services (names shared with the compose stack's dashboards).

Each service process exposes the default registry on its own HTTP port (`/metrics`); a metric a
service never touches stays at zero or, with labels, absent.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("blockpilot_requests", "RPCs served, by service and final status code", ["service", "status"])
# source: the draft source, "dflash" (drafter) or "lookup" (prompt lookup).
DRAFTS = Counter("blockpilot_drafts", "Verify steps that had drafts", ["block_size", "policy_version", "source"])
DRAFT_TOKENS = Counter("blockpilot_draft_tokens", "Draft tokens proposed", ["block_size", "policy_version", "source"])
ACCEPTED_TOKENS = Counter("blockpilot_accepted_tokens", "Draft tokens accepted", ["block_size", "policy_version", "source"])
ACCEPTED_BY_POSITION = Counter("blockpilot_accepted_tokens_by_position",
                               "Accepted draft tokens by position in the block (1 = first draft)", ["position"])
FALLBACKS = Counter("blockpilot_fallbacks", "Degradations: drafter/policy/session store unavailable", ["reason"])
TTFT = Histogram("blockpilot_time_to_first_token_seconds", "Time to first token (prefill included)",
                 ["policy_version"], buckets=_TTFT_BUCKETS)
INTER_TOKEN = Histogram("blockpilot_inter_token_latency_seconds", "Time between streamed tokens (per token)",
                        ["block_size"], buckets=_LATENCY_BUCKETS)
STEP_SECONDS = Histogram("blockpilot_step_seconds", "Time of one decode step (verifier: draft + verify; drafter: draft)",
                         ["service", "block_size"], buckets=_LATENCY_BUCKETS)
_TAU_BUCKETS = tuple(float(i) for i in range(1, 17)) + (24.0, 32.0, 64.0)
ACCEPTANCE_LENGTH = Histogram("blockpilot_acceptance_length", "Tokens committed per verify step, bonus included",
                              ["block_size", "policy_version", "arm"], buckets=_TAU_BUCKETS)
BLOCK_SIZE_CHOSEN = Counter("blockpilot_block_size_chosen", "Block size used per request",
                            ["block_size", "policy_version", "arm"])
GENERATED_TOKENS = Counter("blockpilot_generated_tokens", "Tokens generated (streamed to clients)")
BATCH_SESSIONS = Gauge("blockpilot_batch_sessions", "Sessions in the verifier's decode batch (set every scheduler iteration)")
BATCH_TOKENS = Histogram("blockpilot_batch_tokens", "Tokens verified per batched target pass",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
CAPPED_STEPS = Counter("blockpilot_capped_steps", "Steps the load-aware cap ran without a draft (drafts did not pay in the batch)")
DRAFTER_SESSIONS = Gauge("blockpilot_drafter_sessions", "Active draft sessions (open Draft streams)")
DRAFTER_BATCH_SESSIONS = Histogram("blockpilot_drafter_batch_sessions", "Sessions whose draft steps ran in one drafter pass",
                                   buckets=(1, 2, 4, 8, 16, 32, 64))
DRAFTER_PASS_SECONDS = Histogram("blockpilot_drafter_pass_seconds", "Time of one drafter pass (all its sessions' steps)",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
DRAFTER_CACHED_SESSIONS = Gauge("blockpilot_drafter_cached_sessions",
                                "Draft caches kept after their session's stream ended, for the next turn")
DRAFTER_CACHE_RESUMES = Counter("blockpilot_drafter_cache_resumes",
                                "Draft streams that asked to resume a kept cache, by result (hit: resumed; miss: "
                                "not held here - unknown, evicted, expired, other tag - so the context is sent again)",
                                ["result"])
VERIFIER_BACKEND = Gauge("blockpilot_verifier_backend_info", "The verifier's target backend and numeric precision (always 1)",
                         ["backend", "precision"])
INFLIGHT = Gauge("blockpilot_inflight_requests", "RPCs in progress", ["service"])

# Policy service. `arm` is the experiment arm (outside experiments: the policy name asked for);
# `experiment` is "" outside experiments.
POLICY_DECISIONS = Counter("blockpilot_policy_decisions", "Block-size decisions applied, by policy version, arm and size",
                           ["policy_version", "arm", "experiment", "block_size"])
POLICY_SHADOW_DECISIONS = Counter("blockpilot_policy_shadow_decisions",
                                  "Shadow-arm decisions (computed and logged, never applied), by whether they agree "
                                  "with the applied one (result: agree | differ | error)",
                                  ["policy_version", "arm", "experiment", "result"])
POLICY_OUTCOMES = Counter("blockpilot_policy_outcomes", "Decision outcomes reported by verifiers",
                          ["policy_version", "arm", "experiment"])
POLICY_TAU = Histogram("blockpilot_policy_tau", "Per-request τ of reported outcomes (mean tokens per verify step)",
                       ["policy_version", "arm", "experiment"], buckets=_TAU_BUCKETS)
POLICY_DECIDE_SECONDS = Histogram("blockpilot_policy_decide_seconds", "Time the policy service takes to answer Decide",
                                  ["policy_version"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025,
                                                               0.05, 0.1, 0.25, 1.0))
POLICY_SERVED = Gauge("blockpilot_policy_served", "Learned policy versions being served (1 each)", ["policy_version"])
POLICY_LOAD_FAILURES = Counter("blockpilot_policy_load_failures",
                               "Policy versions that failed to load (not served; the version before keeps serving)",
                               ["policy_version"])

# HTTP gateway (its own /metrics on its HTTP port).
GATEWAY_REQUESTS = Counter("blockpilot_gateway_requests", "HTTP requests of the gateway, by endpoint and HTTP status",
                           ["endpoint", "status"])
GATEWAY_TTFT = Histogram("blockpilot_gateway_time_to_first_token_seconds",
                         "Time from an HTTP request's arrival to its first generated text (through the verifier)",
                         ["endpoint"], buckets=_TTFT_BUCKETS)
GATEWAY_DISCONNECTS = Counter("blockpilot_gateway_disconnects",
                              "Generations cut short because the HTTP client went away (the gRPC stream was cancelled)")
GATEWAY_STOP_STRINGS = Counter("blockpilot_gateway_stop_strings",
                               "Generations the gateway ended at a stop string (the gRPC stream was cancelled)")


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics on host:port (port 0 = disabled)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
