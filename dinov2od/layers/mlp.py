"""A plain multi-layer perceptron (used for box heads and query embeddings)."""
from __future__ import annotations

from torch import Tensor, nn

from .kernels import linear_module

__all__ = ["MLP"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    Args:
        input_dim, hidden_dim, output_dim: widths.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):  # (bf16 inference: weights cast once, ReLU fused; layers.kernels)
            x = linear_module(layer, x, "relu" if i < last else None)
        return x
