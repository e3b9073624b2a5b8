"""Which CPU kind a benchmark ran on: its model name, the ISA flags that decide bf16 speed, and what
torch / oneDNN report about them.

Ratios against RF-DETR differ by CPU kind (issue 32: on a Zen 4 with ``avx512_bf16`` and no AMX the
bf16 path reached parity; on a Xeon with AMX it did not), so every ratio the benchmark prints carries
:func:`cpu_tag` and its header carries :func:`header_lines`::

    python tools/benchmark.py --isa            # this report alone (no timing)

Sources, most portable first: ``/proc/cpuinfo`` (the flags, via
:func:`dinov2od.layers.precision.cpu_flags`, the same source the project's bf16 decision reads);
``torch.backends.mkldnn`` (oneDNN built in and enabled); ``torch.backends.cpu.get_cpu_capability()``
(torch's own kernels' ISA: DEFAULT / AVX2 / AVX512, never AMX); ``torch.cpu._is_amx_tile_supported()``
and ``_is_avx512_bf16_supported()`` (torch >= 2.4; absent in torch 2.3.1: reported as such); and oneDNN's
own verbose output for one bf16 matmul and one bf16 convolution at representative sizes: the ISA line
(``isa:...``) and each primitive's implementation name (``brg_matmul:avx512_core_amx`` on an AMX CPU,
``brg_matmul:avx512_core_bf16`` on a CPU with AVX512-BF16 only; docs/speed.md, "CPU kinds").
"""
from __future__ import annotations

import os
import platform
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from dinov2od.layers import precision

__all__ = ["ISA_FLAGS", "AMX_FLAGS", "CpuKind", "cpu_kind", "cpu_model_name", "cpu_tag", "header_lines",
           "onednn_implementations", "torch_cpu_report"]

# the flags that decide the speed of fp32 and bf16 products on x86 (and Arm's bf16)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
AMX_FLAGS = ("amx_bf16", "amx_tile")  # oneDNN's AMX bf16 kernels need both


@dataclass(frozen=True)
class CpuKind:
    """One CPU kind as the benchmark reports it (:func:`cpu_kind`)."""

    model: str  # /proc/cpuinfo's "model name" (or the platform's processor string)
    flags: Dict[str, bool]  # each of ISA_FLAGS: present in /proc/cpuinfo
    amx: bool  # amx_bf16 and amx_tile
    native_bf16: bool  # the project's decision: dinov2od.layers.precision.native_cpu_bf16()
    torch: Dict[str, object] = field(default_factory=dict)  # torch_cpu_report()
    onednn: Dict[str, str] = field(default_factory=dict)  # onednn_implementations()

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_model_name() -> str:
    """``model name`` from ``/proc/cpuinfo`` (x86), else ``platform.processor()`` / ``machine()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def torch_cpu_report() -> Dict[str, object]:
    """What this torch build reports: its version, oneDNN (built, enabled, version), torch's kernel ISA
    and, where this torch has them (>= 2.4), its own AMX / AVX512-BF16 probes (else ``"n/a (torch X)"``)."""
    out: Dict[str, object] = {"torch": torch.__version__,
                              "mkldnn available": torch.backends.mkldnn.is_available(),
                              "mkldnn enabled": bool(torch.backends.mkldnn.enabled)}
    m = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    out["oneDNN version"] = m.group(1) if m else "unknown"
    get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    out["cpu capability"] = get_capability() if get_capability else f"n/a (torch {torch.__version__})"
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        out[f"torch.cpu.{name}()"] = bool(probe()) if probe else f"n/a (torch {torch.__version__})"
    return out


def _onednn_verbose(fn: Callable[[], object]) -> str:
    """oneDNN's verbose lines (its C-level stdout) while ``fn()`` runs."""
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors="replace")


def _implementation(lines: str, primitive: str) -> str:
    """The implementation name of the last executed ``primitive`` in oneDNN verbose ``lines``."""
    found = "none"
    for line in lines.splitlines():
        parts = line.split(",")
        if "exec" in parts and "cpu" in parts:
            i = parts.index("cpu")
            if len(parts) > i + 2 and parts[i + 1] == primitive:
                found = parts[i + 2]
    return found


def onednn_implementations() -> Dict[str, str]:
    """oneDNN's own report (verbose mode, in this process, this thread count): its ISA line and the
    implementation it picks for a bf16 linear (``torch.ops.mkldnn._linear_pointwise``, the op of the
    project's CPU inference path) at the ViT-S MLP shape 1024 x 384 -> 1536, a bf16 ``torch.mm`` at
    1536^3, a bf16 3x3 convolution, and the fp32 linear. Empty without oneDNN."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return {}
    x, w = torch.randn(1024, 384), torch.randn(1536, 384)
    a = torch.randn(1536, 1536, dtype=torch.bfloat16)
    image, kernel = torch.randn(1, 64, 32, 32, dtype=torch.bfloat16), torch.randn(64, 64, 3, 3, dtype=torch.bfloat16)
    xb, wb = x.bfloat16(), w.bfloat16()

    def run():
        with torch.no_grad():
            torch.ops.mkldnn._linear_pointwise(xb, wb, None, "none", [], "")
            torch.mm(a, a)
            torch.nn.functional.conv2d(image, kernel, padding=1)
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    try:
        lines = _onednn_verbose(run)
    except (OSError, RuntimeError) as err:  # (no fd 1, a torch without the verbose switch)
        return {"error": str(err)}
    isa = re.search(r"isa:([^\n]*)", lines)
    execs = [ln for ln in lines.splitlines() if ",exec," in ln]
    # oneDNN runs inner_product (torch 2.3) or matmul for the linears; the fp32 one is the last exec
    linears = [ln for ln in execs if ",inner_product," in ln or ",matmul," in ln]
    bf16_linear = next((ln for ln in linears if "bf16" in ln), "")
    fp32_linear = next((ln for ln in reversed(linears) if "f32" in ln and "bf16" not in ln), "")

    def impl(line: str) -> str:
        for primitive in ("inner_product", "matmul"):
            name = _implementation(line, primitive)
            if name != "none":
                return name
        return "none"

    mm = [ln for ln in execs if ",matmul," in ln and "64x1536:1536x1536" not in ln and "1536x1536" in ln]
    return {"isa": isa.group(1).strip() if isa else "unknown",
            "bf16 linear 1024x384->1536": impl(bf16_linear),
            "bf16 torch.mm 1536^3": _implementation("\n".join(mm), "matmul") if mm else "not oneDNN",
            "bf16 conv2d 3x3": _implementation(lines, "convolution"),
            "fp32 linear 1024x384->1536": impl(fp32_linear)}


_CACHE: Dict[str, Dict[str, str]] = {}


def cpu_kind(probe_onednn: bool = True) -> CpuKind:
    """This CPU's kind (:class:`CpuKind`), read now from the flags' source (``precision.cpu_flags``);
    the oneDNN probe (a few ms of products) runs once per process."""
    if probe_onednn and "onednn" not in _CACHE:
        _CACHE["onednn"] = onednn_implementations()
    flags = precision.cpu_flags()
    return CpuKind(model=cpu_model_name(), flags={f: f in flags for f in ISA_FLAGS},
                   amx=all(f in flags for f in AMX_FLAGS), native_bf16=precision.native_cpu_bf16(),
                   torch=torch_cpu_report(), onednn=_CACHE["onednn"] if probe_onednn else {})


def cpu_tag(kind: Optional[CpuKind] = None) -> str:
    """The short tag printed next to every ratio: ``[AMD EPYC | avx512_bf16, AMX: no, native bf16: yes]``."""
    kind = kind or cpu_kind(probe_onednn=False)
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if kind.flags.get(f)]
    return (f"[{kind.model} | {' '.join(bf16) or 'no bf16 ISA'}, AMX: {'yes' if kind.amx else 'no'}, "
            f"native bf16: {'yes' if kind.native_bf16 else 'no'}]")


def header_lines(kind: Optional[CpuKind] = None) -> List[str]:
    """The CPU kind's lines of the benchmark's header."""
    kind = kind or cpu_kind()
    lines = [f"CPU: {kind.model}, {os.cpu_count()} logical CPUs; ISA flags (/proc/cpuinfo): "
             + " ".join(f"{f}={'yes' if v else 'no'}" for f, v in kind.flags.items()),
             f"AMX: {'yes' if kind.amx else 'no'}; native bf16: {'yes' if kind.native_bf16 else 'no'} "
             f"(dinov2od.layers.precision.native_cpu_bf16: one of {', '.join(precision.NATIVE_BF16_FLAGS)})",
             "torch: " + ", ".join(f"{k} {v}" for k, v in kind.torch.items())]
    if kind.onednn:
        lines.append("oneDNN reports (ONEDNN_VERBOSE): " + "; ".join(f"{k}: {v}" for k, v in kind.onednn.items()))
    return lines
