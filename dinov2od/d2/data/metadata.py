"""The model's classes (names and the dataset's category ids) as Detectron2 metadata, both ways.

Training stores the train dataset's ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``
in the model (:meth:`DINOv2ObjectDetector.set_classes`, saved with the weights); prediction reads
them back as a ``Metadata`` that Detectron2's ``Visualizer`` and the COCO-json conversion use, so
a checkpoint gives the dataset's ids and names without the dataset being registered.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

__all__ = ["classes_from_dataset", "classes_in_checkpoint", "metadata_for_model", "model_classes", "set_model_classes"]

logger = logging.getLogger("dinov2od")


def _detector(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "detector", model)  # the meta-architecture holds the plain detector


def model_classes(model) -> Optional[Tuple[List[str], List[int]]]:
    """``(names, dataset_ids)`` stored in ``model`` (meta-architecture, DDP or plain detector), or None."""
    det = _detector(model)
    names, ids = getattr(det, "class_names", None), getattr(det, "class_ids", None)
    return None if names is None else (names, ids)


def classes_in_checkpoint(path: str) -> Optional[Tuple[List[str], List[int]]]:
    """``(names, dataset ids)`` stored in a checkpoint's ``class_metadata`` buffer (a Detectron2
    checkpoint of the meta-architecture or a plain detector ``state_dict``, ``.pth`` or
    ``.safetensors``), or None. The file is read without running code from it
    (:func:`~dinov2od.modeling.checkpoint_io.load_state`: ``UnsafeCheckpointError`` unless trusted)."""
    import torch

    from dinov2od.modeling.checkpoint_io import load_state
    from dinov2od.modeling.classes import decode_class_metadata

    obj = load_state(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else {}
    for key in ("detector.class_metadata", "class_metadata"):
        if isinstance(sd, dict) and key in sd:
            return decode_class_metadata(torch.as_tensor(sd[key]))
    return None


def classes_from_dataset(name: str) -> Optional[Tuple[List[str], List[int]]]:
    """``(thing_classes, dataset ids in contiguous order)`` of a registered dataset, or None if its
    metadata has no ``thing_classes``. Ids default to ``0..K-1`` when the metadata has no id map."""
    meta = MetadataCatalog.get(name)
    names = meta.get("thing_classes", None)
    if names is None:
        return None
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    if id_map:
        inverse = {v: k for k, v in id_map.items()}
        ids = [int(inverse[i]) for i in range(len(names))]
    else:
        ids = list(range(len(names)))
    return list(names), ids


def set_model_classes(model, dataset_name: str) -> bool:
    """Store the classes of registered dataset ``dataset_name`` in ``model``; False if it has none."""
    classes = classes_from_dataset(dataset_name)
    det = _detector(model)
    if classes is None or not hasattr(det, "set_classes"):
        return False
    det.set_classes(*classes)
    return True


def metadata_for_model(model, dataset: Optional[str] = None) -> Metadata:
    """A Detectron2 ``Metadata`` with the classes to report for ``model``'s predictions.

    Args:
        model: the meta-architecture (or plain detector).
        dataset: a registered dataset whose classes to use instead of the model's (e.g. for a
            checkpoint saved before models stored their classes). An unregistered name is an error.

    Returns:
        ``Metadata`` with ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``; the classes
        are ``class_0..class_{K-1}`` with ids ``0..K-1`` when neither source has any.
    """
    if dataset:
        if dataset not in DatasetCatalog.list():
            raise KeyError(
                f"--dataset {dataset!r} is not a registered dataset (registered: "
                f"{', '.join(sorted(DatasetCatalog.list())[:12])}, ...). Leave it out to use the classes saved "
                "in the checkpoint, or register the dataset first."
            )
        if not MetadataCatalog.get(dataset).get("thing_dataset_id_to_contiguous_id", None):
            DatasetCatalog.get(dataset)  # loading the json fills in the id map
        classes = classes_from_dataset(dataset)
        if classes is None:
            raise ValueError(f"Dataset {dataset!r} has no thing_classes in its metadata.")
        source = f"dataset {dataset}"
    else:
        classes = model_classes(model)
        source = "checkpoint"
        if classes is None:
            k = getattr(getattr(model, "module", model), "num_classes")
            logger.warning(
                "The weights hold no class names (saved before dinov2od stored them); labels are reported as "
                "class_0..class_%d with ids 0..%d. Pass a registered dataset to name them.", k - 1, k - 1)
            classes = [f"class_{i}" for i in range(k)], list(range(k))
            source = "none"
    names, ids = classes
    meta = Metadata(name=f"dinov2od_classes_from_{source}")
    meta.set(thing_classes=list(names), thing_dataset_id_to_contiguous_id={int(d): i for i, d in enumerate(ids)})
    return meta
