"""Acceptance rules: verify a drafted block against the target model's scores of it.

Terms (defined once, used throughout)
-------------------------------------
V
    Vocabulary size.
block
    ``[anchor, d_1, ..., d_n]``: the last committed token followed by ``n = block_size - 1`` draft
    tokens. ``n`` may be 0, which is a plain autoregressive step.
row i
    The target's output at block position ``i`` (``0 <= i <= n``): the distribution of the token
    that follows block position ``i``. Row ``i`` judges ``d_{i+1}``; row ``n`` judges nothing and
    only supplies the token after the last draft.
p_i
    Target probabilities of row ``i``: ``target_probs[i]``, shape [V]. With top-k / top-p set it
    is the truncated distribution (see truncation), which is then the law every committed token
    follows.
q_i
    Draft probabilities that ``d_{i+1}`` was sampled from: ``draft_probs[i]``, shape [V].
a
    Number of accepted draft tokens, ``0 <= a <= n``; always a prefix ``d_1 .. d_a``.
next token
    The one token the target itself contributes after the accepted prefix: its own choice at block
    position ``a``. A step commits ``a + 1`` tokens, the acceptance length.
truncation
    ``truncate_probs``: rank a row's tokens by probability, highest first, equal probabilities by
    lower token id (``greedy_verify``'s tie rule, so top-k = 1 is the greedy choice); keep the
    first ``top_k`` ranks (0 = all), renormalise, then keep the shortest prefix of those ranks
    whose mass reaches ``top_p`` (1 = all; the first rank always stays) and renormalise again.
    ``probs_from_logits`` applies it, so the target's own sampling and every verify rule see the
    same p. Draft distributions q need no truncation: the rules below are lossless for any q
    (a truncated p with an untruncated q just rejects the drafts p has cut).
uniform
    A number from U[0, 1). All randomness enters as explicit float64 uniforms, so that a slow
    reference and these vectorized rules, fed the same uniforms, must return the same verdict.
    ``draw_uniforms`` draws them from a ``torch.Generator``.

Rules
-----
``greedy_verify`` (temperature 0)
    Accept ``d_{i+1}`` while it is the argmax of row ``i``; the next token is the argmax of row
    ``a``. The output is exactly what greedy decoding with the target alone would produce.
``sample_and_match_verify`` (temperature > 0, greedy draft; the DFlash rule)
    Draw ``x_i ~ p_i`` for every row, accept ``d_{i+1}`` while ``d_{i+1} == x_i``; the next token
    is ``x_a``. Every committed token is a genuine sample of the target given the committed
    prefix, so the output law is the target's. It is speculative sampling specialised to a
    point-mass draft: accept with probability ``p_i(d)``, on rejection draw from ``p_i`` with
    ``d`` removed, which is exactly the law of ``x_i`` given ``x_i != d``.
``speculative_sampling_verify`` (temperature > 0, sampled draft)
    Leviathan et al. 2023 / Chen et al. 2023: accept ``d_{i+1} ~ q_i`` with probability
    ``min(1, p_i(d_{i+1}) / q_i(d_{i+1}))``; on the first rejection draw the next token from the
    residual ``normalize(max(0, p_a - q_a))``; if everything was accepted draw it from ``p_n``.

Losslessness of the sampled rules needs the uniforms to be independent of the draft and of each
other; the rules themselves cannot check that.

Cost
----
Each rule is vectorized over the block (``sample_and_match_verify`` on the CPU draws row by row up
to the first rejection instead, see there): one pass over the [n + 1, V] rows (argmax, or a float64
CDF for the rows that are sampled), no Python loop over positions, and a single host sync
(``tolist``) when the verdict is built. Input validation is shape checks only; token ids are
assumed to lie in [0, V) and probability rows to be non-negative with positive mass.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one block."""

    num_accepted: int  # a: draft tokens accepted, 0..n
    next_token: int  # token appended after the accepted drafts (the target's choice at block position a)

    @property
    def acceptance_length(self) -> int:
        """Tokens committed by this step: the accepted drafts plus the next token."""
        return self.num_accepted + 1


def draw_uniforms(generator: torch.Generator, count: int) -> torch.Tensor:
    """Draw ``count`` float64 uniforms in [0, 1) on the generator's device: [count]."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return torch.rand(count, generator=generator, dtype=torch.float64, device=generator.device)


class PositionalUniforms:
    """One request's uniforms, addressed by output position: u(stream, t) for the t-th generated
    token (t = 0: the prefill's). Counter-based: the uniforms of positions [j * BLOCK, (j + 1) *
    BLOCK) are torch.rand(BLOCK) from a generator seeded with a hash of (seed, stream, j), so any
    position's uniform is known without drawing the ones before it.

    Why by position: a verify step at position t reads at(t, n + 1), the uniforms of the positions
    its tokens may land on, whatever n is. Sample-and-match then commits exactly the tokens a plain
    sampler reading at(t, 1) per token commits (token t is the inverse-CDF draw of p_t with u(t)),
    for every draft: a seeded request gives the same tokens at any block size, from any draft
    source, with or without drafts dropped under load. (The min(1, p/q) rule reads more uniforms per
    token and its output depends on the draft by design.)

    stream: VERIFY for the target's draws; ACCEPT, RESIDUAL and DRAFT for the p/q rule's acceptance
    tests, its residual draws and the drafter's own sampling; each independent of the others."""

    BLOCK = 64
    VERIFY, ACCEPT, RESIDUAL, DRAFT = 0, 1, 2, 3

    def __init__(self, seed: int | None) -> None:
        self.seed = int(seed) if seed is not None else int(torch.seed())
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}

    def _block(self, stream: int, index: int) -> torch.Tensor:
        key = (stream, index)
        block = self._blocks.get(key)
        if block is None:
            digest = hashlib.blake2b(f"{self.seed}/{stream}/{index}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
            block = torch.rand(self.BLOCK, generator=generator, dtype=torch.float64)
            if len(self._blocks) > 8:  # a request moves forward: older blocks are not read again
                self._blocks.clear()
            self._blocks[key] = block
        return block

    def at(self, position: int, count: int, stream: int = VERIFY) -> torch.Tensor:
        """u(stream, position .. position + count - 1): float64 [count]."""
        if position < 0 or count < 0:
            raise ValueError(f"position and count must be >= 0, got {position}, {count}")
        parts = []
        while count > 0:
            index, offset = divmod(position, self.BLOCK)
            take = min(count, self.BLOCK - offset)
            parts.append(self._block(stream, index)[offset : offset + take])
            position, count = position + take, count - take
        if not parts:
            return torch.empty(0, dtype=torch.float64)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def probs_from_logits(logits: torch.Tensor, temperature: float, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Float32 ``softmax(logits / temperature)`` over the last dim, truncated by top-k / top-p
    (``truncate_probs``; the defaults keep every token): [..., V] -> [..., V].

    A ``-inf`` logit gets probability 0; a row with no finite maximum is invalid (NaN).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    logits = logits.to(torch.float32)
    # Shift before dividing: (logit - max) <= 0, so a small temperature can push entries to -inf
    # (probability 0) but never overflow the maximum to +inf, which would turn the row into NaN.
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # [..., V]
    probs = torch.softmax(shifted / temperature, dim=-1)
    return truncate_probs(probs, top_k, top_p)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of ``tokens`` under the raw rows ``log_softmax(logits)``
    (temperature 1, no truncation: what a caller's ``logprobs`` reports, whatever law sampled the
    tokens): logits [m, V], tokens [m] -> [m]."""
    if logits.dim() != 2 or tokens.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [m, V] and tokens [m], got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    rows = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [m, V]
    return rows.gather(1, tokens.to(device=rows.device, dtype=torch.long)[:, None])[:, 0]


def truncate_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p truncation, renormalised (see "truncation" above): [..., V] -> [..., V].

    top_k: ranks kept, >= 0 (0 = all). top_p: mass kept, in (0, 1] (1 = all). With both off the
    rows come back as they are. Rows must have positive mass.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    vocab = probs.shape[-1]
    ranks = top_k if 0 < top_k < vocab else vocab  # the ranks top-k keeps
    if ranks == vocab and top_p == 1:
        return probs
    # One int64 key per token: the float32 bits of its probability (ordered as the values are, for
    # values >= 0) above its reversed id, so equal probabilities rank the lower id first and the
    # order is total: topk's own order among equal values is unspecified. Ranking only the top-k
    # is cheap; top-p without top-k ranks the whole row (measured, probs_from_logits on 8 rows of
    # 49,152, one thread of a busy 2-core machine: 4 ms untruncated, 5-8 ms with top-k = 50,
    # ~50 ms with top-p alone).
    ids = torch.arange(vocab, device=probs.device)  # [V]
    bits = probs.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)  # [..., V]
    order = ((bits << 32) | (vocab - 1 - ids)).topk(ranks, dim=-1).indices  # [..., ranks] ids by rank
    ranked = probs.gather(-1, order)  # [..., ranks]
    if top_p < 1:
        # In float64, in rank order: a rank stays while the mass of the ranks before it is below
        # top_p of the (top-k) total, so the first rank always stays and the prefix ends at the
        # rank that reaches top_p.
        cdf = ranked.to(torch.float64).cumsum(dim=-1)  # [..., ranks]
        before = torch.cat([torch.zeros_like(cdf[..., :1]), cdf[..., :-1]], dim=-1)  # [..., ranks]
        ranked = torch.where(before < top_p * cdf[..., -1:], ranked, 0.0)
    truncated = torch.zeros_like(probs).scatter_(-1, order, ranked)  # [..., V] back in token order, cut ranks 0
    return truncated / truncated.sum(dim=-1, keepdim=True)


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, one draw per row: probs [..., V], uniforms [...] -> int64 [...].

    Returns the smallest index whose float64 cumulative sum exceeds ``u * row_total``. Rows need
    not be normalized; an index with zero probability is never returned from a row with positive
    mass (a row without any, which is invalid input, still gets an id in [0, V)).
    """
    if probs.dim() < 1 or probs.shape[-1] == 0:
        raise ValueError(f"probs must have shape [..., V] with V > 0, got {tuple(probs.shape)}")
    if uniforms.shape != probs.shape[:-1]:
        raise ValueError(
            f"uniforms must have shape {tuple(probs.shape[:-1])} (probs without its last dim), "
            f"got {tuple(uniforms.shape)}"
        )
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [..., V]
    total = cdf[..., -1:]  # [..., 1]
    # u < 1 keeps u * total below the total, after rounding too for any normal total. Cap the
    # threshold one ulp below the total anyway, so that a u of exactly 1 or a subnormal total
    # cannot leave it with no entry above it (searchsorted would answer V).
    threshold = torch.minimum(
        uniforms.to(torch.float64).unsqueeze(-1) * total,
        torch.nextafter(total, torch.zeros_like(total)),
    )  # [..., 1]
    index = torch.searchsorted(cdf, threshold, right=True)  # [..., 1]
    # Only a row without positive mass (invalid input) finds nothing; keep the id in range anyway.
    index.clamp_(max=probs.shape[-1] - 1)
    # A zero-probability entry adds exactly 0 in a sequential scan, so its CDF equals its
    # predecessor's and "first entry above the threshold" cannot stop on it. A parallel (GPU) scan
    # may round it a sliver higher; then fall back to the row's mode rather than ever return it.
    # (One argmax pass; cheaper than repairing the whole CDF, and the fallback is ~never taken.)
    chosen = probs.gather(-1, index)  # [..., 1]
    index = torch.where(chosen > 0, index, probs.argmax(dim=-1, keepdim=True))  # [..., 1]
    return index.squeeze(-1)


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Temperature-0 verification: draft_tokens [n] int, target_logits [n + 1, V].

    Ties in a row go to the lowest token id (``torch.argmax``'s convention), so a draft token
    that ties for the maximum is accepted only if no lower id shares the maximum.
    """
    n = _check_draft(draft_tokens)
    _check_rows(target_logits, n + 1, "target_logits")
    choices = target_logits.argmax(dim=-1)  # [n + 1] the target's own token at each position
    a = _accepted_prefix_length(draft_tokens == choices[:n])  # 0-d
    return _verdict(a, choices.index_select(0, a.view(1)).squeeze(0))


def sample_and_match_verify(
    draft_tokens: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor
) -> Verdict:
    """DFlash verification of a greedy draft at temperature > 0.

    draft_tokens [n] int, target_probs [n + 1, V], uniforms [n + 1] (one per row).
    """
    n = _check_draft(draft_tokens)
    _check_rows(target_probs, n + 1, "target_probs")
    _check_uniforms(uniforms, n + 1, "uniforms")
    # Row i's draw uses only row i and uniforms[i], so drawing the rows in order and stopping at
    # the first mismatch gives the same verdict as drawing them all. On the CPU that is cheaper:
    # the float64 CDF of every row is the cost (measured, 49,152-token rows, one thread: 1.35 ms for
    # 8 rows, 6.9 ms for 12, where it outgrows the L2 cache), and at T > 0 most blocks fail early.
    # Elsewhere one vectorized pass avoids a host sync per row.
    if target_probs.device.type == "cpu":
        return _sample_and_match_rows(draft_tokens, target_probs, uniforms)
    return _sample_and_match_vectorized(draft_tokens, target_probs, uniforms)


def _sample_and_match_rows(draft_tokens: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor) -> Verdict:
    """Row by row, up to the first rejection (shapes as sample_and_match_verify, checked there)."""
    drafts = draft_tokens.tolist()
    for i, draft in enumerate(drafts):
        token = int(sample_categorical(target_probs[i], uniforms[i]))  # x_i ~ p_i
        if token != draft:
            return Verdict(num_accepted=i, next_token=token)
    n = len(drafts)
    return Verdict(num_accepted=n, next_token=int(sample_categorical(target_probs[n], uniforms[n])))


def _sample_and_match_vectorized(draft_tokens: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor) -> Verdict:
    """Every row in one pass (shapes as sample_and_match_verify, checked there)."""
    n = draft_tokens.shape[0]
    # Sampling every row, not just rows 0..a, is what makes this vectorized.
    samples = sample_categorical(target_probs, uniforms)  # [n + 1] x_i ~ p_i
    a = _accepted_prefix_length(draft_tokens == samples[:n])  # 0-d
    return _verdict(a, samples.index_select(0, a.view(1)).squeeze(0))


def speculative_sampling_verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    accept_uniforms: torch.Tensor,
    residual_uniform: float | torch.Tensor,
) -> Verdict:
    """Speculative sampling for a draft that sampled ``d_{i+1} ~ q_i``.

    draft_tokens [n] int, draft_probs [n, V], target_probs [n + 1, V], accept_uniforms [n],
    residual_uniform a float or 0-d tensor (draws the next token).

    A draft token with ``q_i(d) = 0`` cannot have been sampled, so it only arises from bad input.
    It is accepted iff ``p_i(d) > 0``: the textbook ratio ``p/q`` is then +inf, and whatever
    the input, a token the target gives zero probability is never committed.
    """
    n = _check_draft(draft_tokens)
    vocab = _check_rows(target_probs, n + 1, "target_probs")
    _check_rows(draft_probs, n, "draft_probs", vocab)
    _check_uniforms(accept_uniforms, n, "accept_uniforms")
    residual_u = torch.as_tensor(residual_uniform, dtype=torch.float64, device=target_probs.device)
    if residual_u.dim() != 0:
        raise ValueError(f"residual_uniform must be a float or a 0-d tensor, got shape {tuple(residual_u.shape)}")

    drafts = draft_tokens.to(torch.int64).unsqueeze(1)  # [n, 1]
    p_draft = target_probs[:n].gather(1, drafts).squeeze(1).to(torch.float64)  # [n] p_i(d_{i+1})
    q_draft = draft_probs.gather(1, drafts).squeeze(1).to(torch.float64)  # [n] q_i(d_{i+1})
    # u < min(1, p/q)  <=>  u * q < p  for q > 0 (u < 1 makes the cap at 1 automatic), without a
    # division; at q = 0 it reads "accept iff p > 0" (see the docstring).
    accepted = accept_uniforms.to(torch.float64) * q_draft < p_draft  # [n]
    a = _accepted_prefix_length(accepted)  # 0-d

    p_row = target_probs.index_select(0, a.view(1)).squeeze(0).to(torch.float64)  # [V] p_a
    if n == 0:
        weights = p_row
    else:
        # q_a exists only when a < n. At a == n nothing was rejected and the next token comes
        # from p_n itself, which is the residual with q taken as 0.
        q_row = draft_probs.index_select(0, a.clamp(max=n - 1).view(1)).squeeze(0).to(torch.float64)  # [V]
        residual = (p_row - torch.where(a < n, q_row, 0.0)).clamp_min(0.0)  # [V] max(0, p_a - q_a)
        # For normalized rows an all-zero residual means p_a == q_a, where a rejection needs
        # p_a(d) = q_a(d) = 0: there is no correction to make, so draw from p_a itself. Decided
        # on device, without a sync.
        weights = torch.where(residual.sum() > 0, residual, p_row)  # [V]
    next_token = sample_categorical(weights, residual_u)  # 0-d
    return _verdict(a, next_token)


def _accepted_prefix_length(accepted: torch.Tensor) -> torch.Tensor:
    """accepted [n] bool -> 0-d int64: the number of leading True entries."""
    # cumprod is 1 up to the first rejection and 0 from there on, so the sum counts the prefix
    # only; an empty block (n = 0) sums to 0.
    return accepted.to(torch.int64).cumprod(dim=0).sum()


def _verdict(num_accepted: torch.Tensor, next_token: torch.Tensor) -> Verdict:
    """Build the verdict from two 0-d int64 tensors with one host transfer."""
    a, token = torch.stack((num_accepted, next_token)).tolist()
    return Verdict(num_accepted=a, next_token=token)


def _check_draft(draft_tokens: torch.Tensor) -> int:
    """Return n after checking that draft_tokens is a 1-D integer tensor [n]."""
    dtype = draft_tokens.dtype
    if draft_tokens.dim() != 1 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(
            f"draft_tokens must be a 1-D integer tensor [n], got shape {tuple(draft_tokens.shape)} "
            f"dtype {draft_tokens.dtype}"
        )
    return draft_tokens.shape[0]


def _check_rows(rows: torch.Tensor, count: int, name: str, vocab: int | None = None) -> int:
    """Return V after checking that ``rows`` is [count, V] (with the given V if there is one)."""
    expected = f"[{count}, {vocab if vocab is not None else 'V'}]"
    if rows.dim() != 2 or rows.shape[0] != count or rows.shape[1] == 0:
        raise ValueError(f"{name} must have shape {expected} with V > 0, got {tuple(rows.shape)}")
    if vocab is not None and rows.shape[1] != vocab:
        raise ValueError(f"{name} must have shape {expected} (the target's V), got {tuple(rows.shape)}")
    return rows.shape[1]


def _check_uniforms(uniforms: torch.Tensor, count: int, name: str) -> None:
    """Check that ``uniforms`` is [count]."""
    if uniforms.shape != (count,):
        raise ValueError(f"{name} must have shape [{count}], got {tuple(uniforms.shape)}")
