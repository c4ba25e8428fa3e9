"""`blockpilot generate --block-size auto` without services: the policy engine the policy service
runs (serving.policy.LocalPolicy over a PolicyRepository), driven in this process.

The decoding loop's block-size hook is synchronous and runs once, right after prefill; the engine
is async (it serves gRPC), so each call runs it to completion on a private event loop. No
experiments and no session store here: those live in Redis behind the policy service
(`generate --server`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from blockpilot.decoding.speculative import BlockSizeHook, PrefillInfo
from blockpilot.policy.features import policy_features
from blockpilot.policy.repository import PolicyRepository, SHIPPED_POLICY_NAME, default_repository_dir
from blockpilot.serving.policy import Decision, LocalPolicy, PolicyFeatures, PolicySpec

log = logging.getLogger(__name__)


class InProcessPolicy:
    """repository: a policy repository folder (default: the shipped policies/ of this checkout).
    policy: the policy name to ask ("" = the shipped default policy, else a learned policy's name,
    'default' or 'fixed-<n>'). After a generation, `decision` holds what was decided."""

    def __init__(self, repository: Path | None = None, policy: str = "") -> None:
        self.repository = PolicyRepository(Path(repository) if repository else default_repository_dir())
        self.repository.scan()
        self.engine = LocalPolicy(default_policy=SHIPPED_POLICY_NAME, repository=self.repository, threads=1)
        self.policy = policy
        self.spec: PolicySpec = asyncio.run(self.engine.describe(policy))  # unknown names fail here, before prefill
        self.decision: Decision | None = None

    def hook(self, default_block_size: int, max_block_size: int) -> BlockSizeHook:
        """The block-size hook for one request: computes the features the policy needs from the
        prefill and returns its decision."""

        def decide(info: PrefillInfo) -> int:
            features, problems = policy_features(self.spec.features, info)
            if problems:
                # A policy trained for another target (vocabulary, hidden size): the verifier's rule.
                log.warning("policy %s needs features this target cannot give (%s); block size %d",
                            self.policy or "(default)", "; ".join(problems), default_block_size)
                self.decision = Decision(max(1, min(default_block_size, max_block_size)), "", "", "",
                                         fallback_reason="policy_feature_mismatch")
            else:
                request = PolicyFeatures(features, info.prompt_len, default_block_size, max_block_size, policy=self.policy)
                self.decision = asyncio.run(self.engine.decide(request))
            return self.decision.block_size

        return decide

    def close(self) -> None:
        self.engine.close()
