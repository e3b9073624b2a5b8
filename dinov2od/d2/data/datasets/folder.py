"""Your own COCO-format data: find the splits in a folder, register them with their classes known at
once, and check the files before training.

Layouts :func:`find_coco_splits` recognises under a root folder:

* Roboflow's / RF-DETR's COCO export: ``train/``, ``valid/`` (or ``val/``), ``test/``, each holding
  its images and ``_annotations.coco.json``;
* COCO's own: ``annotations/instances_<split>*.json`` with images in ``<split>*/`` (e.g.
  ``annotations/instances_train2017.json`` + ``train2017/``), ``<split>`` one of train, val, test.

An explicit json + image folder per split needs no layout (:func:`register_coco_folder`'s
``train_json`` / ``train_images`` / ``val_json`` / ``val_images``). YOLO and Pascal VOC folders are
read into COCO jsons in the dataset cache first (:mod:`dinov2od.d2.data.datasets.formats`), then
registered and checked as here.

Registration reads the json's ``categories`` right away and fills the dataset's metadata
(``thing_classes``, ``thing_dataset_id_to_contiguous_id``, the same values Detectron2's
``load_coco_json`` sets later), so the class count is known, and checked against the model, before
anything is built. Roboflow's exports list the dataset itself as a category (id 0, no boxes, the
``supercategory`` of every class): :func:`coco_classes` recognises it and leaves it out of the
classes, and Detectron2 (loader and ``COCOEvaluator``) reads a copy of the json without it.

The check before training, :func:`~dinov2od.d2.data.datasets.check.check_coco_dataset`, is in
:mod:`dinov2od.d2.data.datasets.check`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from dinov2od.modeling.checkpoint_io import atomic_write

__all__ = [
    "CHECK_MODES",
    "DatasetError",
    "check_mode",
    "coco_classes",
    "find_coco_splits",
    "read_coco_categories",
    "register_coco_dataset",
    "register_coco_folder",
]

logger = logging.getLogger("dinov2od")

ROBOFLOW_JSON = "_annotations.coco.json"
SPLIT_ALIASES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
SKIP_CHECK_HINT = (
    "or skip this check (e.g. on a large dataset you have checked before): dataset.check=False "
    "(lazy configs) / DATASETS.CHECK False (yacs)."
)
# how the start-up check opens the images: "decode" (every pixel, so a truncated file is found) or
# "header" (size only, much faster; docs/your_data.md has the timings)
CHECK_MODES = ("decode", "header")
EDGE_TOLERANCE = 1.0  # px a box may reach beyond its image before the check counts it


class DatasetError(ValueError):
    """A dataset's files or annotations cannot be trained on; the message names them and the fix."""


def problems_error(source: str, problems: List[str], hint: str = SKIP_CHECK_HINT) -> DatasetError:
    """One error listing ``problems`` (the first 12, then a count) found in ``source``."""
    shown = "\n  - ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    return DatasetError(f"{source}: {len(problems)} problem(s) found before training:\n  - {shown}{more}\n{hint}")


def _read_json(json_file: str) -> dict:
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"COCO json {json_file!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"COCO json {json_file!r} cannot be read as JSON ({e}); is the file empty or truncated? "
            "Export the annotations again."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"COCO json {json_file!r} has no 'images' list; it is not a COCO instances file.")
    if not data.get("categories"):
        raise DatasetError(
            f"COCO json {json_file!r} has no 'categories': a detector needs the list of classes "
            "(e.g. [{\"id\": 1, \"name\": \"cat\"}, ...])."
        )
    from .boxes import remember_boxes  # the boxes as arrays for the size advice: the json is not parsed again

    remember_boxes(json_file, data)
    return data


def _categories(data: dict, json_file: str) -> Tuple[List[str], List[int]]:
    """All of the json's categories, as Detectron2's ``load_coco_json`` takes them (sorted by id)."""
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))  # Detectron2's load_coco_json order
        ids = [int(c["id"]) for c in cats]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(
            f"COCO json {json_file!r}: every entry of 'categories' needs an integer 'id' and a 'name'."
        ) from None
    if len(set(ids)) != len(ids):
        raise DatasetError(f"COCO json {json_file!r} lists a category id twice: {ids}.")
    return [str(c.get("name")) for c in cats], ids


def roboflow_supercategory(data: dict) -> Optional[dict]:
    """The category a Roboflow export adds for the dataset itself, or None.

    Roboflow writes ``{"id": 0, "name": "<dataset>", "supercategory": "none"}`` and then every class
    with ``"supercategory": "<dataset>"``; no box has that category. Recognised here: the one
    category that has no boxes and is the ``supercategory`` of every other category (there are at
    least two categories). A category with boxes is always a class.
    """
    cats = data.get("categories") or []
    if len(cats) < 2:
        return None
    used = {a.get("category_id") for a in data.get("annotations") or [] if isinstance(a, dict)}
    for cat in cats:
        others = [c for c in cats if c is not cat]
        if cat.get("id") not in used and all(c.get("supercategory") == cat.get("name") for c in others):
            return cat
    return None


def coco_classes(data: dict, json_file: str) -> Tuple[List[str], List[int], Optional[dict]]:
    """``(names, ids, dropped)``: the classes of a COCO json in Detectron2's contiguous order (by id)
    and the Roboflow dataset category left out of them (:func:`roboflow_supercategory`), or None."""
    dropped = roboflow_supercategory(data)
    names, ids = _categories(data, json_file)
    if dropped is not None:
        keep = [i for i, d in enumerate(ids) if d != int(dropped["id"])]
        names, ids = [names[i] for i in keep], [ids[i] for i in keep]
    return names, ids, dropped


def read_coco_categories(json_file: str) -> Tuple[List[str], List[int]]:
    """``(names, ids)`` of every category of a COCO json, in Detectron2's contiguous order (by id):
    the classes ``load_coco_json`` gives it (a Roboflow dataset category included; the classes
    :func:`register_coco_dataset` registers are :func:`coco_classes`')."""
    return _categories(_read_json(json_file), json_file)


def check_mode(check: Union[bool, str, None], key: str = "dataset.check_images") -> Union[bool, str]:
    """``False`` (no check), ``"decode"`` or ``"header"`` from a ``check`` option (True = "decode")."""
    if check is None or check is False or (isinstance(check, str) and check.lower() in ("", "false", "off", "none")):
        return False
    if check is True:
        return "decode"
    if isinstance(check, str) and check.lower() in CHECK_MODES:
        return check.lower()
    raise ValueError(
        f"{key} must be one of {list(CHECK_MODES)} (decode every image, or read the headers only), got {check!r}; "
        "dataset.check=False / DATASETS.CHECK False turns the check off."
    )


def _zero_annotation_id(data: dict) -> bool:
    """Whether an annotation has id 0 (Roboflow numbers them from 0): pycocotools' ``COCOeval`` (and
    Detectron2's copy of it) records a match by the ground truth's id, and takes id 0 for "no
    match", so that box could never be found and its detection counted as a false positive."""
    return any(isinstance(a, dict) and a.get("id") == 0 for a in data.get("annotations") or [])


def _json_for_detectron2(data: dict, json_file: str, dropped: Optional[dict]) -> str:
    """The json Detectron2's loader and ``COCOEvaluator`` read: ``json_file`` itself, or a copy in the
    dataset cache (never next to the user's file) without the Roboflow dataset category ``dropped``
    and with annotation ids 1..N where one was 0 (:func:`_zero_annotation_id`). Image ids, category
    ids, boxes and everything else are the user's. The same content is written once (the name holds
    the source's hash)."""
    renumber = _zero_annotation_id(data)
    if dropped is None and not renumber:
        return json_file
    with open(json_file, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:16]
    stem = os.path.basename(json_file).rsplit(".json", 1)[0].strip("._") or "annotations"
    out = dict(data)
    if dropped is not None:
        out["categories"] = [c for c in data["categories"] if c is not dropped]
    if renumber:
        out["annotations"] = [dict(a, id=i + 1) if isinstance(a, dict) else a for i, a in enumerate(data["annotations"])]
        logger.info(
            "%s: annotation ids start at 0; pycocotools' COCOeval takes a match with annotation id 0 for no match "
            "(that box could never be found), so Detectron2 reads a copy with annotation ids 1..%d",
            json_file, len(out["annotations"]),
        )
    tag = ("-no-category-%s" % dropped["id"] if dropped is not None else "") + ("-ann-ids-from-1" if renumber else "")
    return write_cache_json(out, f"{stem}-{digest}{tag}.json")


def write_cache_json(data: dict, filename: str, text: Optional[str] = None) -> str:
    """Write ``data`` (or its json ``text``) as ``filename`` in the dataset cache's ``json/`` folder
    (else a temporary folder) unless that file exists already (the name holds a hash of the
    content); returns its path."""
    from ..data_cache import default_cache_dir

    for folder in (os.path.join(default_cache_dir(), "json"), os.path.join(tempfile.gettempdir(), "dinov2od-json")):
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
        try:
            os.makedirs(folder, exist_ok=True)
            with atomic_write(path, "w") as f:  # another rank writing the same file is harmless
                if text is None:
                    json.dump(data, f)
                else:
                    f.write(text)
            return path
        except OSError:
            continue
    raise DatasetError(f"Cannot write {filename}, the json Detectron2 should read (no writable cache folder).")


def register_coco_dataset(
    name: str, json_file: str, image_root: str, check: Union[bool, str] = True
) -> None:
    """Register a COCO-format detection dataset (Detectron2's ``register_coco_instances``) with its
    classes in the metadata at once, so the class count is checked before the model is built.

    A Roboflow dataset category (:func:`roboflow_supercategory`) is left out of the classes (one log
    line names it): Detectron2's loader and ``COCOEvaluator`` read a copy of the json without it
    (metadata ``json_file``; ``dinov2od_source_json`` is the file given here), with annotation ids
    from 1 where Roboflow starts them at 0 (pycocotools takes id 0 for "no match"). The other
    classes keep their ids (``thing_dataset_id_to_contiguous_id``), so predictions carry the json's
    ids.

    Args:
        name: dataset name to use in configs, e.g. ``"my_train"``.
        json_file: COCO instances json (``images``, ``annotations``, ``categories``).
        image_root: folder the json's ``file_name`` entries are relative to.
        check: training runs :func:`check_coco_dataset` on it before it starts (metadata
            ``dinov2od_check``): True or "decode" (decode every image), "header" (headers only),
            False (no check).
    """
    mode = check_mode(check, "check")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        source = meta.get("dinov2od_source_json", meta.get("json_file", None))
        if source == json_file and meta.get("image_root", None) == image_root:
            return  # the same registration again (e.g. the config loaded twice)
        raise ValueError(
            f"Dataset {name!r} is already registered with {source or '?'}; pick another name for {json_file}."
        )
    data = _read_json(json_file)
    names, ids, dropped = coco_classes(data, json_file)
    if dropped is not None:
        logger.info(
            "%s: category %r (id %s) has no boxes and is the supercategory of every other category (Roboflow "
            "lists the dataset itself so); it is not a class: %d classes %s, ids %s",
            json_file, dropped.get("name"), dropped.get("id"), len(names), names, ids,
        )
    register_coco_instances(name, {}, _json_for_detectron2(data, json_file, dropped), image_root)
    MetadataCatalog.get(name).set(
        thing_classes=names,
        thing_dataset_id_to_contiguous_id={d: i for i, d in enumerate(ids)},
        dinov2od_check=mode,
        dinov2od_source_json=json_file,
    )


def _split_of(folder_name: str) -> Optional[str]:
    low = folder_name.lower()
    for split, aliases in SPLIT_ALIASES.items():
        if low in aliases:
            return split
    return None


def find_coco_splits(root: str) -> Dict[str, Tuple[str, str]]:
    """The COCO splits under ``root``: ``{"train": (json_file, image_root), "val": ..., "test": ...}``.

    Raises:
        FileNotFoundError: ``root`` does not exist, or holds neither layout (the message shows both).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset folder {root!r} does not exist.")
    splits: Dict[str, Tuple[str, str]] = {}
    for entry in sorted(os.listdir(root)):  # Roboflow / RF-DETR: <split>/_annotations.coco.json
        split, folder = _split_of(entry), os.path.join(root, entry)
        if split and split not in splits and os.path.isfile(os.path.join(folder, ROBOFLOW_JSON)):
            splits[split] = (os.path.join(folder, ROBOFLOW_JSON), folder)
    ann_dir = os.path.join(root, "annotations")
    if not splits and os.path.isdir(ann_dir):  # COCO: annotations/instances_<split>*.json + <split>*/
        for fname in sorted(os.listdir(ann_dir)):
            m = re.fullmatch(r"instances_((train|val|test)\w*)\.json", fname)
            if not m or m.group(2) in splits:
                continue
            for image_dir in (m.group(1), m.group(2)):
                if os.path.isdir(os.path.join(root, image_dir)):
                    splits[m.group(2)] = (os.path.join(ann_dir, fname), os.path.join(root, image_dir))
                    break
    if "train" not in splits:
        raise FileNotFoundError(
            f"No COCO training split found in {root!r}. Expected one of:\n"
            f"  {root}/train/{ROBOFLOW_JSON} (+ valid/, test/)   Roboflow / RF-DETR export\n"
            f"  {root}/annotations/instances_train*.json + {root}/train*/   COCO's layout\n"
            "or give the files explicitly: dataset.train_json=... dataset.train_images=... (lazy) / "
            "DATASETS.TRAIN_JSON, DATASETS.TRAIN_IMAGES (yacs)."
        )
    return splits


def register_coco_folder(
    root: Optional[str] = None,
    name: str = "custom",
    train_json: Optional[str] = None,
    train_images: Optional[str] = None,
    val_json: Optional[str] = None,
    val_images: Optional[str] = None,
    check: Union[bool, str] = True,
    format: str = "auto",
) -> Dict[str, str]:
    """Register the splits of a dataset folder (or of explicit json + image folder pairs).

    Args:
        root: folder in one of the layouts of :func:`find_coco_splits`, or a YOLO or Pascal VOC
            folder (:mod:`dinov2od.d2.data.datasets.formats`: read into a json in the dataset cache).
        name: prefix of the registered names (``<name>_train``, ``<name>_val``, ``<name>_test``).
        train_json, train_images, val_json, val_images: explicit files; they take precedence over
            what ``root`` holds. ``*_images`` defaults to the json's folder.
        check: see :func:`register_coco_dataset`.
        format: "auto" (from the folder), "coco", "yolo" or "voc" (dataset.format / DATASETS.FORMAT).

    Returns:
        ``{"train": "<name>_train", "val": ...}`` for the splits found; "val" falls back to the
        test split when there is no validation split.
    """
    from .formats import check_format, find_dataset_splits

    format = check_format(format)
    if format not in ("auto", "coco") and not root:
        raise ValueError(f"dataset.format={format} reads a folder: give dataset.root / DATASETS.ROOT.")
    splits = find_dataset_splits(root, format) if root else {}
    for split, json_file, images in (("train", train_json, train_images), ("val", val_json, val_images)):
        if json_file:
            splits[split] = (json_file, images or os.path.dirname(os.path.abspath(json_file)))
    if "train" not in splits:
        raise ValueError("Give a dataset folder (dataset.root / DATASETS.ROOT) or a training json (train_json).")
    names = {}
    for split, (json_file, image_root) in splits.items():
        names[split] = f"{name}_{split}"
        register_coco_dataset(names[split], os.path.abspath(json_file), os.path.abspath(image_root), check)
    if "val" not in names and "test" in names:
        names["val"] = names["test"]
    if names.get("val"):
        train, val = MetadataCatalog.get(names["train"]), MetadataCatalog.get(names["val"])
        if (train.thing_classes, train.thing_dataset_id_to_contiguous_id) != (
            val.thing_classes, val.thing_dataset_id_to_contiguous_id
        ):
            raise DatasetError(
                f"The training split ({train.dinov2od_source_json}: {train.thing_classes}, ids "
                f"{list(train.thing_dataset_id_to_contiguous_id)}) and the evaluation split "
                f"({val.dinov2od_source_json}: {val.thing_classes}, ids {list(val.thing_dataset_id_to_contiguous_id)}) "
                "list different classes; export them together."
            )
    return names
