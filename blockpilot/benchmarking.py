"""Helpers shared by the benchmark scripts: prompt sets in the project's JSONL format."""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

from blockpilot.errors import InvalidArgumentError, NotFoundError


def read_jsonl_prompts(path: Path, limit: int | None = None) -> list[dict]:
    """First-turn prompts of a `{"id", "dataset", "turns": [...]}` JSONL file: [{"id", "dataset", "text"}]."""
    if not path.is_file():
        raise NotFoundError(f"no prompt file '{path}'")
    prompts = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append({"id": record["id"], "dataset": record.get("dataset", path.stem), "text": record["turns"][0]})
            except (json.JSONDecodeError, KeyError, IndexError) as err:
                raise InvalidArgumentError(f"'{path}' line {line_no} is not a prompt record: {err}") from None
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def load_prompts(source: Path, total: int, datasets: list[str] | None = None) -> list[dict]:
    """`total` prompts from a JSONL file, or round-robin over a folder's *.jsonl files (sorted by
    name, or the named `datasets`), first records first, so every run picks the same prompts."""
    if source.is_file():
        return read_jsonl_prompts(source, total)
    if not source.is_dir():
        raise NotFoundError(f"no prompt file or folder '{source}'")
    files = [source / f"{name}.jsonl" for name in datasets] if datasets else sorted(source.glob("*.jsonl"))
    if not files:
        raise NotFoundError(f"no *.jsonl prompt files in '{source}'")
    return interleave([read_jsonl_prompts(f, total) for f in files])[:total]


def interleave(lists: list[list[dict]]) -> list[dict]:
    """Round-robin over several prompt lists (first of each, then second of each, ...)."""
    return [p for group in zip_longest(*lists) for p in group if p is not None]
