"""Sine position encodings (DETR) that honour padding masks."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "coordinate_to_sine_embedding"]


def _sine_features(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """(...,) coordinates (already scaled) -> (..., num_feats) interleaved sin/cos."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None].float() / dim_t
    return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """2D sine position embedding over the valid (unpadded) region of each image.

    With ``normalize=True`` coordinates are divided by the valid height/width of
    *each image* (from the mask), so the encoding of an image does not depend on
    how much padding the batch added: batched results equal per-image results.

    Args:
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
        temperature: frequency base.
        normalize: scale coordinates to [0, scale] over the valid region.
        scale: the normalization range (2*pi by default).
        offset: added to the 1-based cumulative coordinates before normalizing (-0.5
            centres them on pixels).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
        offset: float = -0.5,
        eps: float = 1e-6,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        """
        Args:
            mask: (B, H, W) bool, True at padded positions.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32; zero at padded positions.
        """
        valid = (~mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        pos = torch.cat(
            [
                _sine_features(y, self.num_pos_feats, self.temperature),
                _sine_features(x, self.num_pos_feats, self.temperature),
            ],
            dim=-1,
        )
        pos = pos * valid[..., None]
        return pos.permute(0, 3, 1, 2).contiguous()


def coordinate_to_sine_embedding(
    coords: Tensor, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """Sine embedding of normalized coordinates, e.g. reference points or boxes.

    Args:
        coords: (..., K) values in [0, 1] (K = 2 for points, 4 for boxes).

    Returns:
        (..., K * num_feats), the per-coordinate embeddings concatenated in input order.
    """
    emb = _sine_features(coords * scale, num_feats, temperature)  # (..., K, num_feats)
    return emb.flatten(-2)
