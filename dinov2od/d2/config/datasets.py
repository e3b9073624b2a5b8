"""A config's datasets: their names, registering ``dataset.root`` / ``DATASETS.ROOT`` data, and the
checks that run before training (every dataset registered, its files sound, its class count equal
to the model's ``num_classes``)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .style import is_lazy

logger = logging.getLogger("dinov2od")

__all__ = ["check_config_datasets", "check_datasets", "check_num_classes", "dataset_classes", "dataset_names",
           "resolve_dataset"]


def dataset_classes(name: str) -> Optional[List[str]]:
    """The class names of registered dataset ``name``: its metadata's ``thing_classes``, else the
    categories of the json its metadata names (read without loading the dataset), else None."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is None and meta.get("json_file", None) and os.path.isfile(meta.json_file):
        from dinov2od.d2.data.datasets import read_coco_categories

        classes = read_coco_categories(meta.json_file)[0]
    return None if classes is None else list(classes)


def _num_classes_error(name: str, classes: Sequence[str], num_classes: int) -> ValueError:
    return ValueError(
        f"Dataset {name!r} has {len(classes)} classes ({list(classes)[:10]}"
        f"{'...' if len(classes) > 10 else ''}) but the model has num_classes={num_classes}. "
        f"Set num_classes={len(classes)} in the config (lazy: `num_classes` at the top of the "
        "model config, e.g. `model.num_classes=N`, or None to take it from dataset.root; yacs: "
        "MODEL.DINOV2OD.NUM_CLASSES, 0 to take it from DATASETS.ROOT)."
    )


def check_num_classes(model, dataset_names: Sequence[str]) -> None:
    """Raise a clear error when a dataset's class count differs from the model's ``num_classes``.

    Args:
        model: the meta-architecture (or a DDP wrapper of it), or the ``num_classes`` itself.
        dataset_names: a name or list of registered dataset names.
    """
    num_classes = model if isinstance(model, int) or model is None else getattr(model, "module", model).num_classes
    if num_classes is None:  # not resolved yet (a lazy config that takes it from its data)
        return
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    for name in names:
        classes = dataset_classes(name)
        if classes is not None and len(classes) != num_classes:
            raise _num_classes_error(name, classes, num_classes)


_CHECKED: set = set()


def check_datasets(dataset_names: Sequence[str]) -> None:
    """Run :func:`~dinov2od.d2.data.datasets.check_coco_dataset` (files, sizes, ids, boxes) on each dataset
    registered with the check on (``register_coco_dataset(check=True)``: ``dataset.root`` /
    ``DATASETS.ROOT`` data), once per process, before the model is built."""
    from detectron2.utils import comm

    from dinov2od.d2.data.datasets import check_coco_dataset

    # a distributed job: each process opens its share of the images, every process gets every problem
    world = comm.get_world_size()
    shard = (comm.get_rank(), world)
    gather = (lambda found: [p for part in comm.all_gather(found) for p in part]) if world > 1 else None
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        mode = meta.get("dinov2od_check", False)  # "decode" (or True), "header", False
        key = (meta.get("json_file", None), meta.get("image_root", None), mode)
        if not mode or key in _CHECKED:
            continue
        s = check_coco_dataset(meta.get("dinov2od_source_json", key[0]), key[1], check_files=mode, shard=shard,
                               gather=gather)
        _CHECKED.add(key)
        logger.info(
            "Checked %s: %d images (%d with boxes), %d boxes, %d classes; %s%s", name, s.num_images,
            s.num_images_with_boxes, s.num_boxes, len(meta.thing_classes),
            "every file decodes and has the json's size" if mode != "header" else
            "every file's header reads and has the json's size (headers only: a truncated file is not found)",
            f" (the images shared among the job's {world} processes)" if world > 1 else "")


def _dataset_options(cfg) -> Dict[str, Any]:
    if is_lazy(cfg):
        d = cfg.get("dataset", None) or {}
        opts = {k: d.get(k, None) for k in ("root", "name", "train_json", "train_images", "val_json", "val_images")}
        opts["check"] = d.get("check", True)
        opts["check_images"] = d.get("check_images", "decode")
        opts["format"] = d.get("format", "auto")
        return opts
    d = cfg.DATASETS
    return {"root": d.ROOT, "name": d.NAME, "train_json": d.TRAIN_JSON, "train_images": d.TRAIN_IMAGES,
            "val_json": d.TEST_JSON, "val_images": d.TEST_IMAGES, "check": d.CHECK,
            "check_images": d.get("CHECK_IMAGES", "decode"), "format": d.get("FORMAT", "auto")}


def dataset_names(cfg) -> Dict[str, List[str]]:
    """{"train": [...], "test": [...]} dataset names a config trains and evaluates on."""
    if not is_lazy(cfg):
        return {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)}
    out = {}
    for split in ("train", "test"):
        loader = cfg.get("dataloader", {}).get(split, None)
        names = loader.dataset.get("names", None) if loader is not None and "dataset" in loader else None
        out[split] = [] if names is None else [names] if isinstance(names, str) else list(names)
    return out


def check_config_datasets(cfg, splits: Sequence[str] = ("train", "test")) -> List[str]:
    """:func:`check_datasets` and the class-count check for the datasets of ``splits`` of a config
    (lazy or yacs), before its model is built; returns their names."""
    names = [n for split in splits for n in dataset_names(cfg)[split]]
    check_datasets(names)
    check_num_classes(cfg.model.num_classes if is_lazy(cfg) else cfg.MODEL.DINOV2OD.NUM_CLASSES, names)
    if "train" in splits:  # training: object sizes at the input size, a suggested size (main process, once)
        from dinov2od.d2.data.datasets.sizes import advise_input_size

        advise_input_size(cfg, dataset_names(cfg)["train"])
    return names


def resolve_dataset(cfg) -> None:
    """Complete ``cfg`` from its data, in place, before anything is built.

    * ``dataset.root`` / ``DATASETS.ROOT`` (or the explicit json + images keys): register the splits
      (:func:`~dinov2od.d2.data.datasets.register_coco_folder`), train on ``<name>_train`` and evaluate
      on ``<name>_val``; ``num_classes`` comes from the data when unset (lazy None, yacs 0).
    * every dataset the config names must be registered (else an error with the fix), and its class
      count must equal ``num_classes`` (else an error naming both numbers).

    :func:`~dinov2od.d2.config.load_config` then converts epochs to iterations
    (:func:`~dinov2od.d2.config.batch.epochs_to_iterations`).
    """
    from dinov2od.d2.data.datasets import check_mode, register_coco_folder

    opts = _dataset_options(cfg)
    lazy = is_lazy(cfg)
    if opts["root"] or opts["train_json"]:
        names = register_coco_folder(
            opts["root"] or None, opts["name"] or "custom", opts["train_json"] or None, opts["train_images"] or None,
            opts["val_json"] or None, opts["val_images"] or None,
            check=check_mode(opts["check_images"], "dataset.check_images / DATASETS.CHECK_IMAGES")
            if opts["check"] else False,
            format=opts["format"],
        )
        test = [names["val"]] if "val" in names else []
        if not test:
            logger.warning("No validation split found: evaluation is turned off (give dataset.val_json).")
        if lazy:
            cfg.dataloader.train.dataset.names = names["train"]
            if "test" in cfg.dataloader:
                cfg.dataloader.test.dataset.names = test[0] if test else names["train"]
            if not test:
                cfg.dataloader.evaluator = None
        else:
            cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names["train"],), tuple(test)
        classes = dataset_classes(names["train"])
        num_classes = cfg.model.get("num_classes", None) if lazy else cfg.MODEL.DINOV2OD.NUM_CLASSES
        if not num_classes:  # lazy None / yacs 0: from the data
            if lazy:
                cfg.model.num_classes = len(classes)
            else:
                cfg.MODEL.DINOV2OD.NUM_CLASSES = len(classes)
            logger.info("num_classes=%d from %s: %s", len(classes), names["train"], classes)
    _check_registered_and_classes(cfg)


def _check_registered_and_classes(cfg) -> None:
    lazy = is_lazy(cfg)
    num_classes = cfg.get("model", {}).get("num_classes", None) if lazy else cfg.MODEL.DINOV2OD.NUM_CLASSES
    registered = set(DatasetCatalog.list())
    all_names = dataset_names(cfg)
    if not all_names["train"] and not all_names["test"]:
        raise ValueError(
            "The config names no dataset. For your own COCO data set "
            + ("dataset.root=FOLDER" if lazy else "DATASETS.ROOT FOLDER") + " (see docs/your_data.md)."
        )
    for split, names in all_names.items():
        for name in names:
            if name not in registered:
                key = "dataloader.%s.dataset.names" % split if lazy else "DATASETS.%s" % split.upper()
                raise KeyError(
                    f"Dataset {name!r} ({key}) is not registered. For your own COCO data set "
                    + ("dataset.root=FOLDER (or dataset.train_json=... dataset.train_images=...)" if lazy else
                       "DATASETS.ROOT FOLDER (or DATASETS.TRAIN_JSON / TRAIN_IMAGES): a yacs config cannot run "
                       "Python to register it")
                    + "; see docs/your_data.md."
                )
            classes = dataset_classes(name)
            if isinstance(num_classes, int) and classes is not None and len(classes) != num_classes:
                raise _num_classes_error(name, classes, num_classes)
