"""Helpers shared by the benchmark scripts: prompt sets in the project's JSONL format, one
generation timed as a client sees it."""

from __future__ import annotations

import json
import time
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


def machine_info() -> dict:
    """The machine a benchmark ran on, read at run time (the CPU changes between machines): CPU
    model, the vector extensions that decide kernel choice, torch's CPU capability, core count,
    library versions. Every benchmark JSON records it."""
    import os
    import platform
    import subprocess

    import torch

    fields: dict[str, str] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8")
    info = {"cpu": fields.get("Model name", platform.processor() or platform.machine()),
            "cpu_family_model": f"{fields.get('CPU family', '?')}/{fields.get('Model', '?')}",
            "cpu_flags": [f for f in wanted if f in flags], "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def timed_generation(client, messages: list[dict], max_new_tokens: int) -> dict:
    """One greedy-by-default generation through a BlockPilotClient, timed as the client sees it:
    {"token_ids", "final" (the GenerateFinal message), "ttft_s" (sent -> first tokens), "total_s",
    "decode_tokens_per_s" (the tokens after the first message over the time they took to arrive;
    None when all came in one message)}."""
    sent = time.perf_counter()
    first = last = None
    first_count = 0
    token_ids: list[int] = []
    final = None
    for event in client.stream(messages=messages, max_new_tokens=max_new_tokens):
        if event.final is not None:
            final = event.final
            break
        if event.token_ids:
            last = time.perf_counter()
            if first is None:
                first, first_count = last, len(event.token_ids)
            token_ids += event.token_ids
    if final is None or first is None:
        raise RuntimeError("a stream ended without tokens or without a final message")
    return {"token_ids": token_ids, "final": final, "ttft_s": first - sent, "total_s": time.perf_counter() - sent,
            "decode_tokens_per_s": (len(token_ids) - first_count) / (last - first) if last > first else None}
