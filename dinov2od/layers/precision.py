"""bfloat16 on the CPU: allowed only where the CPU computes it natively.

On x86 CPUs without ``avx512_bf16`` or AMX, PyTorch emulates bfloat16: under
``torch.autocast("cpu", dtype=torch.bfloat16)`` linear layers run several times slower than in
float32 and convolutions fall back to a slow reference kernel (a training step 20x slower on an
AVX2-only EPYC; docs/speed.md). :func:`check_cpu_autocast` refuses that case with a
message naming the CPU's flags; ``DINOV2OD_ALLOW_SLOW_BF16=1`` overrides the refusal.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import FrozenSet

import torch

__all__ = ["ALLOW_ENV", "autocast_context", "check_cpu_autocast", "cpu_flags", "native_cpu_bf16"]

PRECISIONS = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}

ALLOW_ENV = "DINOV2OD_ALLOW_SLOW_BF16"
# CPU flags (/proc/cpuinfo) with native bfloat16 arithmetic: AVX-512 BF16, AMX (x86); BF16 (Arm).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm);
    empty where that file does not exist. Read once per process: the kernel choices of
    :mod:`dinov2od.layers.kernels` ask at every call."""
    return _read_cpu_flags()


@functools.lru_cache(maxsize=None)
def _read_cpu_flags() -> FrozenSet[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_cpu_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (one of :data:`NATIVE_BF16_FLAGS`)."""
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def check_cpu_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Refuse bfloat16 autocast on a CPU that emulates bfloat16.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` (only the CPU is checked).
        dtype: the autocast dtype (only ``torch.bfloat16`` is checked).

    Raises:
        RuntimeError: naming the CPU, the flags looked for, and the fixes.
    """
    if device_type != "cpu" or dtype != torch.bfloat16 or native_cpu_bf16():
        return
    if os.environ.get(ALLOW_ENV, "0") not in ("", "0", "false", "False"):
        return
    flags = cpu_flags()
    simd = " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "sse4", "fma", "asimd", "sve")))) or "unknown"
    raise RuntimeError(
        f"bfloat16 autocast on this CPU ({platform.processor() or platform.machine()}) would be emulated: its "
        f"flags have none of {', '.join(NATIVE_BF16_FLAGS)} (it has: {simd}). Emulated bfloat16 runs linear "
        "layers several times slower than float32 and convolutions on a slow fallback kernel. Use float32 "
        "(train.amp.enabled=False / SOLVER.AMP.ENABLED False), a CPU with avx512_bf16 or AMX, or a GPU; "
        f"set {ALLOW_ENV}=1 to run it anyway.")


def autocast_context(device_type: str, precision: str = "float32"):
    """``torch.autocast`` for ``precision`` (a no-op context for float32), checked first with
    :func:`check_cpu_autocast`.

    Raises:
        ValueError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    check_cpu_autocast(device_type, dtype)
    return torch.autocast(device_type=device_type, dtype=dtype)
