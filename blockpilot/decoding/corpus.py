"""Corpus n-grams: a draft for the steps where prompt lookup has nothing good to copy.

Prompt lookup (lookup.py) copies what followed an earlier occurrence of the history's last tokens.
Where the last token never occurred before (about a fifth of the positions of the default
target's greedy responses) or only that one token matches (another fifth; such a copy is right
27 % of the time), a step verifies the anchor alone. On the fused ONNX Runtime backend that pass
runs two rows anyway (a lone token is padded, see backends/onnxruntime_fused.py), so a one-token
draft there costs about 3 % of a step; on the target's own greedy responses to training prompts,
the token that most often followed the last two tokens is right about half of the time at those
positions (measured by `blockpilot drafter corpus`, recorded in the table's metadata).

Terms
-----
corpus
    The target's own greedy responses to training prompts (never evaluation prompts), with the
    last two prompt tokens before each response (the template's assistant header).
trigram table / bigram table
    For each pair (a, b) seen at least `min_count` times followed by a token, the token c that
    followed it most often (ties: the smallest id); for each token b, the same over single tokens.
continuation
    From the history's last two tokens, repeatedly the trigram table's next token, else the bigram
    table's, each guess appended before the next: at most `max_tokens` tokens; it stops where
    neither table knows the last tokens.
survival[case][j - 1]
    P(the first j continuation tokens are all right) over held-out responses' positions, case 0:
    prompt lookup finds no match there, case 1: only a 1-token match. It describes the corpus and
    the target, not the machine, so the proposal lengths follow from it and each backend's verify
    cost (lookup.lengths_for_cost).

A continuation is a deterministic draft (one-hot), verified exactly like a prompt-lookup copy: the
output is the target's own at every temperature.

On disk (a folder): `ngrams.npz` (bigram_keys uint32 [B], bigram_next uint32 [B], trigram_keys
uint64 [T] = a * vocab + b, trigram_next uint32 [T], both sorted by key) and `corpus.json` (format,
target name and weights digest, vocab size, min_count, records and tokens used, held-out records,
survival, created).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

FORMAT = "blockpilot-corpus-ngrams/1"
TABLE_FILE = "ngrams.npz"
METADATA_FILE = "corpus.json"
SURVIVAL_LENGTH = 8  # continuation lengths measured (j = 1..8)


@dataclass(frozen=True, eq=False)
class CorpusNgrams:
    """The two tables (see the module docstring) and what they were made from.

    bigram: token b -> the next token; trigram: (a, b) -> the next token.
    survival: ((case 0 row), (case 1 row)), each SURVIVAL_LENGTH long (empty before measuring).
    info: corpus.json's other fields (target, counts) and, once loaded, "folder": where from."""

    bigram: dict[int, int]
    trigram: dict[tuple[int, int], int]
    survival: tuple[tuple[float, ...], ...] = ()
    info: dict = field(default_factory=dict)

    def continuation(self, last_two: Sequence[int], max_tokens: int) -> list[int]:
        """Up to max_tokens guesses after a history ending with last_two (one or two tokens)."""
        guesses: list[int] = []
        a = int(last_two[-2]) if len(last_two) >= 2 else None
        b = int(last_two[-1])
        while len(guesses) < max_tokens:
            nxt = self.trigram.get((a, b)) if a is not None else None
            if nxt is None:
                nxt = self.bigram.get(b)
                if nxt is None:
                    break
            guesses.append(nxt)
            a, b = b, nxt
        return guesses

    # ---- making one ---------------------------------------------------------------------------

    @classmethod
    def count(cls, sequences: Iterable[Sequence[int]], *, min_count: int = 2, info: dict | None = None) -> "CorpusNgrams":
        """Tables from token sequences (each the last prompt tokens then a response). A trigram
        seen fewer than min_count times is left to the bigram table (one occurrence predicts
        worse than the bigram's majority)."""
        if min_count < 1:
            raise InvalidArgumentError(f"min_count must be >= 1, got {min_count!r}")
        bigrams: dict[int, Counter] = defaultdict(Counter)
        trigrams: dict[tuple[int, int], Counter] = defaultdict(Counter)
        for seq in sequences:
            seq = [int(t) for t in seq]
            for i in range(len(seq) - 1):
                bigrams[seq[i]][seq[i + 1]] += 1
                if i >= 1:
                    trigrams[(seq[i - 1], seq[i])][seq[i + 1]] += 1

        def best(counter: Counter) -> tuple[int, int]:
            top = max(counter.values())
            return min(token for token, n in counter.items() if n == top), top

        bigram = {key: best(c)[0] for key, c in bigrams.items()}
        trigram = {}
        for key, c in trigrams.items():
            token, top = best(c)
            if top >= min_count:
                trigram[key] = token
        return cls(bigram, trigram, (), dict(info or {}, min_count=min_count))

    def with_survival(self, survival: Sequence[Sequence[float]]) -> "CorpusNgrams":
        rows = tuple(tuple(float(p) for p in row) for row in survival)
        if len(rows) != 2 or any(len(row) != SURVIVAL_LENGTH for row in rows):
            raise InvalidArgumentError(f"survival needs 2 rows of {SURVIVAL_LENGTH}, got {[len(r) for r in rows]}")
        return CorpusNgrams(self.bigram, self.trigram, rows, self.info)

    # ---- files --------------------------------------------------------------------------------

    def save(self, directory: str | Path, vocab_size: int) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        bi_keys = np.array(sorted(self.bigram), dtype=np.uint32)
        tri_sorted = sorted(self.trigram, key=lambda k: k[0] * vocab_size + k[1])
        arrays = {
            "bigram_keys": bi_keys,
            "bigram_next": np.array([self.bigram[int(k)] for k in bi_keys], dtype=np.uint32),
            "trigram_keys": np.array([a * vocab_size + b for a, b in tri_sorted], dtype=np.uint64),
            "trigram_next": np.array([self.trigram[k] for k in tri_sorted], dtype=np.uint32),
        }
        partial = directory / f"{TABLE_FILE}.tmp.npz"
        np.savez_compressed(partial, **arrays)
        partial.replace(directory / TABLE_FILE)
        metadata = {"format": FORMAT, **self.info, "vocab_size": vocab_size, "bigrams": len(self.bigram),
                    "trigrams": len(self.trigram), "survival": {"no_match": list(self.survival[0]) if self.survival else [],
                                                                "one_token_match": list(self.survival[1]) if self.survival else []},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "CorpusNgrams":
        directory = Path(directory).expanduser()
        meta_path, table_path = directory / METADATA_FILE, directory / TABLE_FILE
        if not meta_path.is_file() or not table_path.is_file():
            raise NotFoundError(f"no corpus n-grams at '{directory}' (needs {METADATA_FILE} and {TABLE_FILE}; "
                                "make them with `blockpilot drafter corpus`)")
        info = json.loads(meta_path.read_text())
        if info.get("format") != FORMAT:
            raise FailedPreconditionError(f"'{meta_path}' is not a corpus n-gram table of format {FORMAT} "
                                          f"(format {info.get('format')!r})")
        vocab = int(info["vocab_size"])
        with np.load(table_path) as arrays:
            bigram = dict(zip(arrays["bigram_keys"].tolist(), arrays["bigram_next"].tolist()))
            trigram = {(key // vocab, key % vocab): nxt for key, nxt in
                       zip(arrays["trigram_keys"].tolist(), arrays["trigram_next"].tolist())}
        survival = info.pop("survival", {})
        rows = (tuple(survival.get("no_match", ())), tuple(survival.get("one_token_match", ())))
        return cls(bigram, trigram, rows if all(rows) else (), {**info, "folder": str(directory)})


def measure_survival(corpus: CorpusNgrams, records: Iterable[tuple[Sequence[int], Sequence[int]]],
                     lookup) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """survival (see the module docstring) over held-out (prompt_ids, response_ids) pairs, cases
    by the longest match of prompt lookup under `lookup` (a LookupConfig; positions with longer
    matches are not counted)."""
    from blockpilot.decoding.lookup import PromptLookupIndex

    right = np.zeros((2, SURVIVAL_LENGTH))
    positions = np.zeros(2)
    for prompt_ids, response_ids in records:
        response = [int(t) for t in response_ids]
        index = PromptLookupIndex(lookup, [int(t) for t in prompt_ids])
        for i, token in enumerate(response[:-1]):
            index.extend([token])
            case = index.longest_match()[0]
            if case > 1:
                continue
            positions[case] += 1
            truth = response[i + 1 : i + 1 + SURVIVAL_LENGTH]
            for j, guess in enumerate(corpus.continuation(index.tokens[-2:], len(truth))):
                if guess != truth[j]:
                    break
                right[case, j] += 1
    rates = right / np.maximum(positions, 1)[:, None]
    return tuple(round(float(p), 4) for p in rates[0]), tuple(round(float(p), 4) for p in rates[1])


def held_out(record_id: str, share: float) -> bool:
    """Whether a record is kept out of the tables to measure them (a stable hash of its id)."""
    digest = int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big")
    return digest / 2**64 < share


def build_from_responses(records: Iterable, target: dict, *, min_count: int = 2, holdout_share: float = 0.05,
                         context_tokens: int = 2, lookup=None, progress=None) -> CorpusNgrams:
    """Tables over the greedy records (shards.ResponseRecord) of a drafter data folder, survival
    measured on the held-out share of them. target: the folder's target ({name, weights_digest,
    vocab_size}). Each sequence is the last `context_tokens` prompt tokens (the assistant header
    the response follows) then the response."""
    from blockpilot.decoding.lookup import LookupConfig

    if not 0 < holdout_share < 1:
        raise InvalidArgumentError(f"holdout_share must be in (0, 1), got {holdout_share!r}")
    train, test, tokens = [], [], 0
    for record in records:
        if record.mode != "greedy":
            continue  # the argmax path is what greedy verification accepts
        if progress is not None:
            progress.update(1)
        if held_out(record.id, holdout_share):
            test.append((record.prompt_ids, record.response_ids))
        else:
            train.append(list(record.prompt_ids[-context_tokens:]) + list(record.response_ids))
            tokens += len(record.response_ids)
    if not train or not test:
        raise FailedPreconditionError(f"need greedy records both to count and to measure, got {len(train)} and {len(test)}")
    corpus = CorpusNgrams.count(train, min_count=min_count, info={
        "target": target, "records": len(train), "tokens": tokens, "held_out_records": len(test),
        "holdout_share": holdout_share})
    return corpus.with_survival(measure_survival(corpus, test, lookup or LookupConfig()))
