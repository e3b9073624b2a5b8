"""The AVX-512 attention kernel's tests: where it must exist, q/k/v as a ViT block makes them, tiny wide
backbones that use it, and attention in float64."""
import os
import platform
import sys

import torch

from dinov2od.modeling import DINOv2Backbone, DINOv3Backbone

KERNEL_FLAGS = {"avx512f", "avx512dq", "fma"}


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def kernel_expected():
    """(whether this machine must have the kernel, why not)."""
    if os.environ.get("DINOV2OD_NO_EXT", "0") == "1":
        return False, "DINOV2OD_NO_EXT=1: dinov2od._C is deliberately not built"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"the kernel is built for x86-64 Linux (GCC) only, this is {sys.platform}/{platform.machine()}"
    flags = cpu_flags()
    if flags is None or not KERNEL_FLAGS <= flags:
        return False, f"this CPU lacks {sorted(KERNEL_FLAGS - (flags or set()))} (the kernel needs AVX-512)"
    return True, ""


WIDE2 = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256, image_size=56)
WIDE3 = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256)


def qkv_views(b, h, t, seed=0, scale=1.0):
    """q, k, v as a ViT block makes them: strided views of one (B, T, 3, H, 64) product."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, t, 3, h, 64, generator=g).permute(2, 0, 3, 1, 4).unbind(0)
    return q * scale, k, v


def make(family, window_size=None, registers=False):
    """A tiny DINOv2 or DINOv3 backbone of head dim 64 (the kernel's), weights moved off their init, in eval mode."""
    torch.manual_seed(0)
    if family == "dinov2":
        bb = DINOv2Backbone(arch="tiny", arch_overrides=WIDE2, registers=registers, num_taps=2, lora_rank=4,
                            window_size=window_size)
    else:
        bb = DINOv3Backbone(arch="tiny", arch_overrides=WIDE3, num_taps=2, lora_rank=4, window_size=window_size)
    with torch.no_grad():  # non-trivial layer scales, biases and LoRA adapters
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return bb.eval()


def attention_float64(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, written out; (B, H, T, d) -> (B, T, H, d)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    return (weights / weights.sum(-1, keepdim=True) @ v).transpose(1, 2)
