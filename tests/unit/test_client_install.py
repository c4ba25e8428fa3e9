"""The client needs only the base install (grpcio and protobuf): importing it must not pull in
torch, numpy or any other package of the server extra. Checked in fresh interpreters, so the test
process's own imports (torch, via conftest) do not matter."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Prints the top-level names of the non-standard-library modules loaded after the given imports.
_LOADED = ("import json, sys\n{imports}\n"
           "print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} - set(sys.stdlib_module_names))))")


def _third_party_after(imports: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _LOADED.format(imports=imports)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_client_imports_only_grpc_and_protobuf():
    # What grpcio and protobuf load by themselves (grpcio also picks up its optional plugins when
    # they are installed) is allowed; anything beyond that came from the client.
    baseline = _third_party_after("import grpc, grpc.aio, google.protobuf.message")
    loaded = _third_party_after("import blockpilot.client\nfrom blockpilot.client import AsyncBlockPilotClient, BlockPilotClient")
    assert "torch" not in loaded
    assert loaded - baseline - {"blockpilot"} == set(), "blockpilot.client imports packages beyond grpcio and protobuf"


def test_base_dependencies_are_the_client_s():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf"}
    assert any(dep.startswith("torch") for dep in project["optional-dependencies"]["server"])


def test_the_gateway_runs_without_torch_or_numpy():
    """The HTTP gateway only relays Generate: its process loads neither torch nor numpy."""
    loaded = _third_party_after("import services.gateway.server")
    assert {"torch", "numpy", "transformers"}.isdisjoint(loaded), sorted(loaded)
