"""Drafter training data on disk: token ids in binary shards, with a manifest.

A data folder holds

    manifest.json       format, the target (name and weights digest), the token dtype, and one
                        entry per shard: file, records, response tokens, the generator settings
                        that made it (precision, batch size, seed, CPU, ...), when it was written;
    shard-00000.npz     one shard (numpy arrays, no pickles):
                          tokens     [T] uint16 or int32: prompt ids then response ids, per record
                          offsets    [N + 1] int64: record i is tokens[offsets[i]:offsets[i + 1]]
                          prompt_lens [N] int32
                          ids, datasets, modes, finish_reasons [N] unicode

A record is the pair (prompt id, mode) with mode "greedy" or "sample" (temperature 1); a folder
holds each pair at most once. Shards are written whole (to a temporary name, then renamed) and the
manifest after them, so an interrupted writer leaves a valid folder; a shard present on disk but
not yet in the manifest (the writer died between the two renames) is adopted when the folder is
opened. Token ids take 2 bytes when the vocabulary fits (SmolLM2's 49,152 does).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from blockpilot.errors import InvalidArgumentError, NotFoundError

FORMAT = "blockpilot-drafter-data/1"
MANIFEST = "manifest.json"
MODES = ("greedy", "sample")


@dataclass(frozen=True)
class ResponseRecord:
    """One generated response. prompt_ids: the chat-templated prompt; response_ids: the target's
    continuation (ending with a stop id when finish_reason is "stop")."""

    id: str
    dataset: str
    mode: str
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str

    def as_dict(self) -> dict:
        return {"id": self.id, "dataset": self.dataset, "mode": self.mode, "prompt_ids": self.prompt_ids,
                "response_ids": self.response_ids, "finish_reason": self.finish_reason}


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


class ResponseStore:
    """A data folder (see the module docstring). `target` identifies the model that writes to it:
    {"name": ..., "weights_digest": ..., "vocab_size": ...}; a folder made by another target refuses
    new shards instead of mixing two models' responses."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = self._read_manifest()
        self._adopt_orphans()

    # ---- reading -----------------------------------------------------------------------------

    @classmethod
    def open_existing(cls, directory: str | Path) -> "ResponseStore":
        path = Path(directory)
        if not (path / MANIFEST).is_file():
            raise NotFoundError(f"no drafter data folder at '{path}' (no {MANIFEST}; make one with `blockpilot drafter data`)")
        return cls(path)

    def _read_manifest(self) -> dict:
        path = self.directory / MANIFEST
        if not path.is_file():
            return {"format": FORMAT, "target": None, "token_dtype": None, "shards": []}
        try:
            manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidArgumentError(f"'{path}' is not valid JSON: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise InvalidArgumentError(f"'{path}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
        return manifest

    def _adopt_orphans(self) -> None:
        known = {entry["file"] for entry in self.manifest["shards"]}
        orphans = sorted(p.name for p in self.directory.glob("shard-*.npz") if p.name not in known)
        for name in orphans:
            arrays = self._load(name)
            self.manifest["shards"].append({"file": name, "records": int(len(arrays["ids"])),
                                            "response_tokens": _response_tokens(arrays), "generator": {"adopted": True}})
        if orphans:
            self._write_manifest()

    def _load(self, name: str) -> dict[str, np.ndarray]:
        path = self.directory / name
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot read drafter data shard '{path}': {exc}") from None

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest["shards"])

    def keys(self) -> set[tuple[str, str]]:
        """The (prompt id, mode) pairs already in the folder."""
        done: set[tuple[str, str]] = set()
        for entry in self.manifest["shards"]:
            arrays = self._load(entry["file"])
            done.update(zip(arrays["ids"].tolist(), arrays["modes"].tolist()))
        return done

    def prompt_ids(self) -> set[str]:
        return {key for key, _ in self.keys()}

    def records(self, limit_tokens: int | None = None) -> Iterator[ResponseRecord]:
        """Records in the order they were written; limit_tokens stops after that many response
        tokens (the learning curve trains on growing prefixes of the data)."""
        seen = 0
        for entry in self.manifest["shards"]:
            arrays = self._load(entry["file"])
            tokens, offsets, prompt_lens = arrays["tokens"], arrays["offsets"], arrays["prompt_lens"]
            for i in range(len(arrays["ids"])):
                row = tokens[offsets[i] : offsets[i + 1]].astype(np.int64).tolist()
                split = int(prompt_lens[i])
                if limit_tokens is not None and seen >= limit_tokens:
                    return
                seen += len(row) - split
                yield ResponseRecord(str(arrays["ids"][i]), str(arrays["datasets"][i]), str(arrays["modes"][i]),
                                     row[:split], row[split:], str(arrays["finish_reasons"][i]))

    def summary(self) -> dict:
        shards = self.manifest["shards"]
        return {"shards": len(shards), "records": sum(s["records"] for s in shards),
                "response_tokens": sum(s["response_tokens"] for s in shards), "target": self.manifest["target"]}

    # ---- writing -----------------------------------------------------------------------------

    def bind_target(self, target: dict) -> None:
        """Record the writing target, or check it is the one that made the folder."""
        known = self.manifest["target"]
        if known is None:
            self.manifest["target"] = dict(target)
            self.manifest["token_dtype"] = token_dtype_for(int(target["vocab_size"]))
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
        elif known.get("weights_digest") != target.get("weights_digest"):
            raise InvalidArgumentError(
                f"'{self.directory}' holds responses of another target ({known.get('name')}, weights digest "
                f"{str(known.get('weights_digest'))[:12]}...), not of {target.get('name')} "
                f"({str(target.get('weights_digest'))[:12]}...): use another folder")

    def write_shard(self, records: Sequence[ResponseRecord], generator: dict) -> dict | None:
        """Append one shard holding `records` (skipping pairs already present); returns its
        manifest entry, or None when nothing was new."""
        if self.manifest["target"] is None:
            raise InvalidArgumentError("bind_target() before writing shards")
        present = self.keys()
        fresh: list[ResponseRecord] = []
        for record in records:
            if record.mode not in MODES:
                raise InvalidArgumentError(f"record {record.id!r} has mode {record.mode!r}, expected one of {MODES}")
            key = (record.id, record.mode)
            if key not in present:
                present.add(key)
                fresh.append(record)
        if not fresh:
            return None
        dtype = np.dtype(self.manifest["token_dtype"])
        rows = [r.prompt_ids + r.response_ids for r in fresh]
        limit = np.iinfo(dtype).max
        if any(t < 0 or t > limit for row in rows for t in row):
            raise InvalidArgumentError(f"a token id does not fit the folder's {dtype} ids")
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(row) for row in rows])
        arrays = {
            "tokens": np.fromiter((t for row in rows for t in row), dtype=dtype, count=int(offsets[-1])),
            "offsets": offsets,
            "prompt_lens": np.array([len(r.prompt_ids) for r in fresh], dtype=np.int32),
            "ids": np.array([r.id for r in fresh]),
            "datasets": np.array([r.dataset for r in fresh]),
            "modes": np.array([r.mode for r in fresh]),
            "finish_reasons": np.array([r.finish_reason for r in fresh]),
        }
        name = f"shard-{self._next_index():05d}.npz"
        partial = self.directory / (name + ".tmp")
        with partial.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(self.directory / name)
        entry = {"file": name, "records": len(fresh), "response_tokens": _response_tokens(arrays),
                 "generator": dict(generator), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.manifest["shards"].append(entry)
        self._write_manifest()
        return entry

    def _next_index(self) -> int:
        used = [int(p.name[6:11]) for p in self.directory.glob("shard-*.npz")]
        return max(used, default=-1) + 1

    def _write_manifest(self) -> None:
        path = self.directory / MANIFEST
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(self.manifest, indent=1) + "\n")
        partial.replace(path)


def _response_tokens(arrays: dict[str, np.ndarray]) -> int:
    return int(arrays["offsets"][-1]) - int(arrays["prompt_lens"].sum())


def records_from_jsonl(path: Path) -> Iterable[ResponseRecord]:
    """Records of the JSONL format written before the shards (one JSON object per line)."""
    with Path(path).open() as handle:
        for line in handle:
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted writer
                yield ResponseRecord(item["id"], item["dataset"], item["mode"], item["prompt_ids"], item["response_ids"],
                                     item["finish_reason"])
