"""Generate the Python gRPC stubs from protos/ (one command: `make protos`).

The stubs land in the package `blockpilot.v1` (the protos' own package name), so the generated
imports (`from blockpilot.v1 import tensor_pb2`) resolve inside this project. They are committed;
tests/unit/test_protos.py regenerates them into a temporary folder and fails when they are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ("tensor.proto", "policy.proto", "drafter.proto", "verifier.proto")


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under `out_dir`/blockpilot/v1/."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    (out_dir / "blockpilot" / "v1").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    sources = [f"blockpilot/v1/{name}" for name in PROTO_FILES]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "blockpilot" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
