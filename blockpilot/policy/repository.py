"""The policy repository as the policy service serves it: versioned learned policies loaded with
ONNX Runtime, rescanned without a restart.

Layout (the contract in blockpilot/policy/metadata.py):

    <root>/<name>/<version>/model.onnx + metadata.json      version: a positive integer folder

For each name the highest complete version (both files present) that loads is served. A scan
(`scan()`: on start, every `poll_interval_s` by `poll()`, and on the Reload RPC) picks up new
versions, versions replaced in place (their files' size or mtime changed) and removed ones
(the next lower version is served again: deleting a folder is a rollback).

A version that fails to load (unreadable metadata, a metadata name/version that disagrees with its
folder, a graph ONNX Runtime rejects, or one that cannot score a zero feature vector) is logged,
counted in blockpilot_policy_load_failures_total{policy_version} and NOT served: the version served
before keeps serving. It is not retried until its files change, so a broken drop costs one log line,
not one per poll. To publish a version atomically, write it to a temporary folder beside the others
(a name that is not an integer is ignored) and rename it to its version number.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.policy.metadata import METADATA_FILE, MODEL_FILE, POLICY_NAME, SHIPPED_POLICY_NAME, PolicyMetadata

log = logging.getLogger(__name__)

PROVIDER_MODES = ("auto", "cpu", "cuda")


def default_repository_dir() -> Path:
    """The policies/ folder of this checkout (beside the package, like models/ for the drafter)."""
    return Path(__file__).resolve().parents[2] / "policies"


def resolve_repository_dir(configured: str) -> Path:
    return Path(configured).expanduser() if configured else default_repository_dir()


def onnx_providers(mode: str) -> list[str]:
    """ONNX Runtime execution providers for a mode: 'cpu'; 'auto' = CUDA then CPU when
    onnxruntime-gpu and a GPU are present, else CPU (onnx_policy.default_providers); 'cuda' = the
    same, but refused (FailedPreconditionError, at start) when CUDA is not there."""
    from blockpilot.policy.onnx_policy import default_providers

    if mode not in PROVIDER_MODES:
        raise InvalidArgumentError(f"onnx providers must be one of {PROVIDER_MODES}, got {mode!r}")
    if mode == "cpu":
        return ["CPUExecutionProvider"]
    providers = default_providers()
    if mode == "cuda" and "CUDAExecutionProvider" not in providers:
        import onnxruntime as ort

        raise FailedPreconditionError("onnx_providers 'cuda' needs onnxruntime-gpu and a visible GPU "
                                      f"(this ONNX Runtime offers {ort.get_available_providers()})")
    return providers


def _load_onnx_policy(version_dir: Path, providers: list[str]) -> Any:
    from blockpilot.policy.onnx_policy import OnnxPolicy

    return OnnxPolicy.load(version_dir, providers=providers)


@dataclass(frozen=True)
class ServedPolicy:
    """One loaded version. `model` is an onnx_policy.OnnxPolicy (`logits(features [D]) -> [C]`)."""

    metadata: PolicyMetadata
    model: Any
    path: Path
    signature: tuple[int, ...]
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def policy_version(self) -> str:
        return self.metadata.policy_version


@dataclass
class ScanResult:
    """What one scan did. loaded: every version served after it; changed: versions it started
    serving; failures: (name/version, error) found broken by it; removed: names no longer served."""

    loaded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _signature(version_dir: Path) -> tuple[int, ...]:
    out: list[int] = []
    for name in (MODEL_FILE, METADATA_FILE):
        stat = (version_dir / name).stat()
        out += [stat.st_size, stat.st_mtime_ns]
    return tuple(out)


class PolicyRepository:
    """Thread-safe: scans run in a worker thread (the poller, a Reload call) and swap the served
    mapping in one assignment, so readers on the event loop never see half a scan."""

    def __init__(self, root: Path, *, providers: list[str] | None = None,
                 loader: Callable[[Path], Any] | None = None, on_failure: Callable[[str, str], None] | None = None,
                 on_served: Callable[[dict[str, ServedPolicy]], None] | None = None) -> None:
        self.root = Path(root)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self._loader = loader or (lambda path: _load_onnx_policy(path, self.providers))
        self._on_failure = on_failure
        self._on_served = on_served
        self._served: dict[str, ServedPolicy] = {}
        self._failed: dict[tuple[str, int], tuple[int, ...]] = {}  # broken version -> the signature that failed
        self.last_errors: dict[str, str] = {}  # name -> its newest load error (for NOT_FOUND messages)
        self._lock = threading.Lock()
        self._missing_logged = False

    # ---- reading ------------------------------------------------------------------------------

    def get(self, name: str) -> ServedPolicy | None:
        return self._served.get(name)

    def served(self) -> dict[str, ServedPolicy]:
        return dict(self._served)

    # ---- scanning -----------------------------------------------------------------------------

    def _versions(self, folder: Path) -> list[tuple[int, Path]]:
        found = []
        for child in folder.iterdir():
            if child.is_dir() and child.name.isdigit() and int(child.name) >= 1:
                if (child / MODEL_FILE).is_file() and (child / METADATA_FILE).is_file():
                    found.append((int(child.name), child))
        return sorted(found, reverse=True)

    def _load(self, name: str, version: int, version_dir: Path, signature: tuple[int, ...]) -> ServedPolicy:
        metadata = PolicyMetadata.load(version_dir)
        if metadata.name != name or metadata.version != version:
            raise InvalidArgumentError(f"metadata says {metadata.policy_version} but the folder is {name}/{version}")
        model = self._loader(version_dir)
        loaded_meta = getattr(model, "metadata", metadata)
        if loaded_meta != metadata:
            raise InvalidArgumentError("the loaded model's metadata differs from metadata.json")
        # A graph can load and still fail at run time (wrong shapes inside): score one zero vector
        # now, so a broken version is refused here and never reaches a request.
        scores = np.asarray(model.logits(np.zeros(metadata.feature_dim, dtype=np.float32)))
        if scores.shape != (len(metadata.candidates),) or not np.isfinite(scores).all():
            raise InvalidArgumentError(f"scoring a zero feature gave shape {list(scores.shape)} (expected "
                                       f"[{len(metadata.candidates)}]) or non-finite values")
        return ServedPolicy(metadata, model, version_dir, signature)

    def _fail(self, result: ScanResult, name: str, version: int, signature: tuple[int, ...], err: BaseException) -> None:
        label = f"{name}/{version}"
        message = str(err) or type(err).__name__
        self._failed[(name, version)] = signature
        self.last_errors[name] = f"{label}: {message}"
        result.failures.append((label, message))
        log.error("policy %s is broken and NOT served (%s); the version served before keeps serving", label, message)
        if self._on_failure is not None:
            self._on_failure(label, message)

    def scan(self) -> ScanResult:
        """Rescan the folder; returns what changed. Never raises for a bad policy (see module doc)."""
        with self._lock:
            result = ScanResult()
            current = self._served
            served: dict[str, ServedPolicy] = {}
            if not self.root.is_dir():
                if not self._missing_logged:
                    log.warning("policy repository %s does not exist (yet): no learned policies", self.root)
                    self._missing_logged = True
                names: list[Path] = []
            else:
                self._missing_logged = False
                names = sorted(p for p in self.root.iterdir() if p.is_dir() and POLICY_NAME.fullmatch(p.name))
            for folder in names:
                name = folder.name
                old = current.get(name)
                try:
                    versions = self._versions(folder)
                except OSError as err:  # the folder vanished mid-scan: keep what was served
                    log.warning("policy folder %s could not be listed (%s)", folder, err)
                    if old is not None:
                        served[name] = old
                    continue
                for version, version_dir in versions:
                    try:
                        signature = _signature(version_dir)
                    except OSError:  # deleted mid-scan
                        continue
                    if old is not None and (version, signature) == (old.version, old.signature):
                        served[name] = old
                        break
                    if self._failed.get((name, version)) == signature:
                        if old is not None and version == old.version:  # replaced in place, broken: keep the old one
                            served[name] = old
                            break
                        continue
                    try:
                        policy = self._load(name, version, version_dir, signature)
                    except Exception as err:  # noqa: BLE001 - any load failure: not served, counted
                        self._fail(result, name, version, signature, err)
                        if old is not None and version == old.version:
                            served[name] = old
                            break
                        continue
                    served[name] = policy
                    self._failed.pop((name, version), None)
                    self.last_errors.pop(name, None)
                    result.changed.append(policy.policy_version)
                    log.info("policy %s served (%s, candidates %s, feature %s [%d])", policy.policy_version,
                             version_dir, list(policy.metadata.candidates), policy.metadata.feature_kind,
                             policy.metadata.feature_dim)
                    break
            for name, old in current.items():
                if name not in served:
                    result.removed.append(old.policy_version)
                    log.warning("policy %s is no longer served (its folder or every loadable version is gone)",
                                old.policy_version)
            self._served = served
            result.loaded = sorted(p.policy_version for p in served.values())
            if self._on_served is not None:
                self._on_served(dict(served))
            return result

    async def poll(self, interval_s: float, stop: asyncio.Event) -> None:
        """Rescan every `interval_s` until `stop` is set (a scan that raises is logged, not fatal)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await asyncio.to_thread(self.scan)
            except Exception:  # noqa: BLE001 - e.g. a permission error on the folder: try again next time
                log.exception("policy repository scan failed")
