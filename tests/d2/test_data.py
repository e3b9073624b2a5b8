"""The shapes dataset, its registration, and the DETR dataset mapper's handling of bad input."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from dinov2od.d2 import DetrDatasetMapper, build_detr_augmentation, register_shapes
from dinov2od.d2.data.datasets import SHAPES_CLASSES, ensure_shapes_split, generate_shapes_image


def test_shapes_images_are_deterministic_and_varied():
    a_img, a_ann = generate_shapes_image(7)
    b_img, b_ann = generate_shapes_image(7)
    assert np.array_equal(a_img, b_img) and a_ann == b_ann
    counts, areas, classes = [], [], set()
    for seed in range(60):
        img, annos = generate_shapes_image(seed)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.shape[2] == 3
        counts.append(len(annos))
        for a in annos:
            x, y, bw, bh = a["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and bw > 0 and bh > 0
            assert a["area"] <= bw * bh
            areas.append(a["area"])
            classes.add(a["category_id"])
    areas = np.array(areas)
    assert min(counts) >= 1 and max(counts) <= 8 and len(set(counts)) >= 5
    assert classes == set(range(1, len(SHAPES_CLASSES) + 1))
    # COCO small / medium / large ranges are all populated
    assert (areas < 32**2).sum() > 10 and ((areas >= 32**2) & (areas < 96**2)).sum() > 10
    assert (areas >= 96**2).sum() >= 3


def test_shapes_split_is_cached_and_registered(tmp_path):
    json_file, image_root = ensure_shapes_split("val", str(tmp_path), num_images=6)
    mtime = os.path.getmtime(json_file)
    assert ensure_shapes_split("val", str(tmp_path), num_images=6) == (json_file, image_root)
    assert os.path.getmtime(json_file) == mtime  # not regenerated
    register_shapes(str(tmp_path), prefix="shapes_t1", num_images={"train": 4, "val": 6})
    dicts = DatasetCatalog.get("shapes_t1_val")
    assert len(dicts) == 6 and all(os.path.isfile(d["file_name"]) for d in dicts)
    meta = MetadataCatalog.get("shapes_t1_val")
    assert meta.thing_classes == list(SHAPES_CLASSES) and meta.evaluator_type == "coco"
    assert os.path.samefile(meta.json_file, json_file)


def _write_dataset(tmp_path, images, annotations, categories=None):
    """Write a COCO json for images given as {file_name: PIL image or raw bytes}."""
    entries = []
    for i, (name, img) in enumerate(images.items()):
        path = tmp_path / name
        if isinstance(img, bytes):
            path.write_bytes(img)
            w, h = 64, 48
        else:
            img.save(path)
            w, h = img.size
        entries.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    coco = {
        "images": entries,
        "annotations": annotations,
        "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    json_file = tmp_path / "anno.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file)


def _mapper():
    return DetrDatasetMapper(
        is_train=True,
        augmentations=build_detr_augmentation(True, min_size_train=(48,), max_size_train=100, crop_resize=()),
        image_format="BGR",
    )


def _anno(image_id, bbox, cat=1, i=1):
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": cat, "iscrowd": 0, "area": 1.0}


def test_mapper_converts_gray_and_rgba_and_keeps_empty_images(tmp_path):
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 255, (48, 64, 4), dtype=np.uint8), mode="RGBA")
    json_file = _write_dataset(
        tmp_path,
        {"gray.png": gray, "rgba.png": rgba, "empty.png": gray.convert("RGB")},
        [_anno(1, [4, 4, 20, 10], i=1), _anno(2, [10, 10, 30, 30], cat=2, i=2)],
    )
    dicts = load_coco_json(json_file, str(tmp_path), "bad_input_t1")
    mapper = _mapper()
    out = [mapper(d) for d in dicts]
    for o in out:
        assert o["image"].shape == (3, 48, 64) and o["image"].dtype == torch.uint8
    assert out[0]["instances"].gt_classes.tolist() == [0]
    assert out[1]["instances"].gt_classes.tolist() == [1]
    assert len(out[2]["instances"]) == 0  # no annotations: an empty target, not an error


def test_mapper_rejects_undecodable_image_naming_it(tmp_path):
    json_file = _write_dataset(tmp_path, {"broken.jpg": b"this is not a JPEG"}, [])
    (d,) = load_coco_json(json_file, str(tmp_path), "bad_input_t2")
    with pytest.raises(ValueError, match=r"Cannot decode image file .*broken\.jpg"):
        _mapper()(d)


def test_mapper_skips_zero_area_box_with_warning(tmp_path, caplog):
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    json_file = _write_dataset(
        tmp_path, {"a.png": img}, [_anno(1, [5, 5, 0, 10], i=1), _anno(1, [5, 5, 20, 10], i=2)]
    )
    (d,) = load_coco_json(json_file, str(tmp_path), "bad_input_t3")
    with caplog.at_level(logging.WARNING):
        out = _mapper()(d)
    assert len(out["instances"]) == 1
    assert "degenerate box" in caplog.text and "a.png" in caplog.text


def test_category_outside_dataset_is_a_clear_error(tmp_path):
    img = Image.new("RGB", (64, 48))
    # an id missing from the json's categories: Detectron2's loader names the id
    json_file = _write_dataset(tmp_path, {"a.png": img}, [_anno(1, [5, 5, 20, 10], cat=9)])
    with pytest.raises(KeyError, match="category_id=9"):
        load_coco_json(json_file, str(tmp_path), "bad_input_t4")
    # (a contiguous id the model does not have is caught by the loss, naming the file:
    # d2/test_model.py::test_class_id_outside_model_is_a_clear_error)
