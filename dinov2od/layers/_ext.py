"""Loader for the compiled multi-scale deformable attention op (built by setup.py).

Until the compiled op is built, nothing is available and the PyTorch path runs.
"""
from torch import Tensor


def available_for(value: Tensor) -> bool:
    """Whether a compiled kernel exists for ``value``'s device and dtype."""
    return False


def ms_deform_attn_compiled(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    raise RuntimeError("the compiled multi-scale deformable attention op is not built")
