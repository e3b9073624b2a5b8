"""Class names and the dataset's own category ids, carried inside the model's ``state_dict``.

A detector predicts contiguous labels ``0..K-1``; users want their dataset's category ids (COCO's
run 1..90 with gaps; a custom export may use 1, 5, 9) and names. :class:`DINOv2ObjectDetector`
keeps both in a persistent ``uint8`` buffer, ``class_metadata``, holding UTF-8 JSON padded with
zeros to a fixed size. Being a buffer, it travels with every file that holds the model's
weights (training checkpoints, ``model_final_ema.pth``, a plain ``state_dict``) and is loaded by
every loader (Detectron2's ``DetectionCheckpointer`` in ``DefaultPredictor``, ``load_state_dict``),
so a checkpoint predicts the user's ids and names without the dataset being registered.

The size is fixed (:data:`CLASS_METADATA_BYTES`) because Detectron2's checkpointer skips a tensor
whose shape differs from the model's; 64 KiB holds e.g. LVIS's 1,203 names and ids.
"""
from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["CLASS_METADATA_BYTES", "decode_class_metadata", "encode_class_metadata"]

CLASS_METADATA_BYTES = 65536


def encode_class_metadata(names: Sequence[str], ids: Optional[Sequence[int]], num_classes: int) -> Tensor:
    """The buffer's content for ``names`` (one per contiguous label) and the dataset's ``ids``.

    Args:
        names: class names, ``names[i]`` for label ``i``.
        ids: the dataset's category id of each label (None: ``0..K-1``).
        num_classes: the model's K; both lists must have this length.

    Returns:
        (CLASS_METADATA_BYTES,) uint8.
    """
    names = [str(n) for n in names]
    ids = list(range(len(names))) if ids is None else [int(i) for i in ids]
    if len(names) != num_classes or len(ids) != num_classes:
        raise ValueError(
            f"The model has num_classes={num_classes} but was given {len(names)} class names and "
            f"{len(ids)} category ids; give one name and one id per class."
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"Category ids must be distinct, got {ids}.")
    data = json.dumps({"names": names, "ids": ids}, ensure_ascii=False).encode("utf-8")
    if len(data) >= CLASS_METADATA_BYTES:
        raise ValueError(
            f"The class names take {len(data)} bytes as JSON; the model keeps at most "
            f"{CLASS_METADATA_BYTES - 1}. Shorten the names."
        )
    out = torch.zeros(CLASS_METADATA_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def decode_class_metadata(buffer: Tensor) -> Optional[Tuple[List[str], List[int]]]:
    """``(names, ids)`` stored in ``buffer``, or None when none were stored (all zeros)."""
    raw = bytes(buffer.detach().to("cpu", torch.uint8).numpy().tobytes())
    end = raw.find(b"\x00")
    raw = raw if end < 0 else raw[:end]
    if not raw:
        return None
    data = json.loads(raw.decode("utf-8"))
    return list(data["names"]), [int(i) for i in data["ids"]]
