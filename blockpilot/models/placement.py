"""Where and in which precision the torch engine runs: `--dtype` and `--device`.

The names are plain strings so that the service configs (blockpilot/config.py) can check them
without importing torch; torch is imported only when a placement is turned into torch objects.

The lossless contract is per placement: speculative output equals the same engine's own
block-size-1 output at the same dtype and device (a bf16 engine is compared with the bf16 engine,
never with the fp32 one: rounding differs between precisions, not between block sizes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = "float32"
DEFAULT_DEVICE = "cpu"
_DEVICE_SYNTAX = re.compile(r"cpu|cuda(:\d+)?")


def dtype_problem(name: str) -> str | None:
    """What is wrong with a dtype name, or None (the config loader's check)."""
    return None if name in DTYPE_NAMES else f"must be one of {list(DTYPE_NAMES)}"


def device_problem(name: str) -> str | None:
    """What is wrong with a device name, or None (syntax only: whether the GPU exists is known at load)."""
    return None if _DEVICE_SYNTAX.fullmatch(name) else "must be 'cpu', 'cuda' or 'cuda:N' (N = the GPU's index)"


@dataclass(frozen=True)
class Placement:
    """The torch engine's placement: the target's and the drafter's weights and KV caches.

    dtype: 'float32' (default), 'bfloat16' or 'float16': the precision the weights are cast to at
        load time and the caches are allocated in (a graph backend runs an export of this dtype).
    device: 'cpu' (default), 'cuda' (the current GPU) or 'cuda:N': where the weights and caches live.
    """

    dtype: str = DEFAULT_DTYPE
    device: str = DEFAULT_DEVICE

    def __post_init__(self) -> None:
        for what, value, problem in (("dtype", self.dtype, dtype_problem), ("device", self.device, device_problem)):
            wrong = problem(value)
            if wrong:
                raise InvalidArgumentError(f"{what} {wrong}, got {value!r}")

    @property
    def is_default(self) -> bool:
        return self.dtype == DEFAULT_DTYPE and self.device == DEFAULT_DEVICE

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype)

    def torch_device(self) -> "torch.device":
        """The device, checked against this machine: FailedPreconditionError when the GPU it names
        is not there (so a CPU-only machine says so instead of failing inside torch)."""
        import torch

        device = torch.device(self.device)
        if device.type != "cuda":
            return device
        if not torch.cuda.is_available():
            built = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise FailedPreconditionError(f"device {self.device!r} needs an NVIDIA GPU, but torch sees none (torch "
                                          f"{torch.__version__} is {built}); use device 'cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FailedPreconditionError(f"device {self.device!r} does not exist: torch sees {count} GPU(s), "
                                          f"cuda:0..cuda:{count - 1}")
        return device

    def describe(self) -> str:
        return f"{self.dtype} on {self.device}"


def drafter_run_precision(placement: Placement, device: "torch.device") -> str | None:
    """The precision LocalDrafter runs the drafter in beside a target of this placement.

    A float32 target on the CPU keeps the machine's cheaper draft precision (int8 or bf16, see
    blockpilot.decoding.drafting.draft_precision): drafts decide speed, never output. A bfloat16 or
    float16 engine, or a GPU, runs the drafter as loaded (at the engine's dtype): int8 drafting
    mixes float32 and the engine's dtype inside one pass."""
    from blockpilot.decoding.drafting import draft_precision

    return draft_precision(device) if placement.dtype == DEFAULT_DTYPE else None


def check_backend_placement(placement: Placement, backend: str) -> None:
    """dtype sets every backend's precision: a graph backend (onnxruntime, tensorrt) runs an export
    of that dtype, made from the target loaded in it. device sets the torch backend's: a graph
    backend runs on the device its runtime picks (ONNX Runtime's provider, TensorRT's GPU), so it
    takes the default device only."""
    if placement.device != DEFAULT_DEVICE and backend != "torch":
        raise InvalidArgumentError(f"device {placement.device!r} sets the torch backend; the {backend} backend runs on "
                                   f"the device its runtime picks (use backend torch, or leave device at {DEFAULT_DEVICE!r})")
