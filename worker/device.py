"""Device and dtype resolution: which torch device a worker runs on, and in what precision."""
from __future__ import annotations

import logging

import torch

from producer.contract.errors import DeviceError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cpu:N`` (an alias of cpu, to run and route several CPU workers), ``cuda`` or ``cuda:N``."""
    name = (name or "cpu").strip().lower()
    kind, _, index = name.partition(":")
    if kind == "cpu":
        if index and not index.isdigit():
            raise DeviceError(f"device {name!r}: use cpu or cpu:N")
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA device on this machine")
    n = int(index or 0)
    if n >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", n)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on cuda and float32 on cpu; float16 on cpu is refused (slow and lossy there)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: use auto, float32, float16 or bfloat16")
    if name == "float16" and device.type == "cpu":
        raise DeviceError("float16 is not supported on cpu: use bfloat16 (fast on CPUs with AMX) or float32")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_bfloat16():
        log.warning("this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 is emulated here and "
                    "runs several times slower than float32; use --dtype float32")
    return DTYPES[name]


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without them torch emulates it."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(checks):
        return True  # a torch that cannot tell: say nothing
    return any(check() for check in checks if check)


def pin(device: torch.device) -> None:
    """Make ``device`` the current CUDA device before anything else touches CUDA."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def dtype_name(dtype: torch.dtype) -> str:
    """The settings name of a torch dtype."""
    return {v: k for k, v in DTYPES.items()}[dtype]
