"""Your own data: folder layouts, registration with classes known at once, the class-count check
before anything is built (both config styles), epochs, the start-up dataset check, 16-bit images,
a lazy run's saved config.yaml, and class names that travel with the weights."""
import json
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import LazyConfig
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data.datasets import register_coco_instances

from tests.helpers import ROOT
from dinov2od.d2.config import check_num_classes, config_style, load_config
from dinov2od.d2.data.dataset_mapper import read_image
from dinov2od.d2.data.datasets import DatasetError, check_coco_dataset, find_coco_splits
from tests.helpers.user_data import unique_dataset_name, write_roboflow_dataset, write_split

CUSTOM_PY = os.path.join(ROOT, "configs/custom.py")
CUSTOM_YAML = os.path.join(ROOT, "configs/yaml/custom.yaml")
CUSTOM_TINY = os.path.join(ROOT, "configs/custom_tiny.py")  # the offline model: builds without the hub


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return write_roboflow_dataset(str(tmp_path_factory.mktemp("toys")), num_train=12, num_valid=4)


# ---------------------------------------------------------------------------- layouts
def test_find_coco_splits_reads_roboflow_and_coco_layouts(tmp_path, toys):
    splits = find_coco_splits(toys)
    assert splits == {
        "train": (os.path.join(toys, "train", "_annotations.coco.json"), os.path.join(toys, "train")),
        "val": (os.path.join(toys, "valid", "_annotations.coco.json"), os.path.join(toys, "valid")),
    }
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (coco / split).mkdir()
        (coco / "annotations" / f"instances_{split}.json").write_text("{}")
    assert find_coco_splits(str(coco)) == {
        "train": (str(coco / "annotations/instances_train2017.json"), str(coco / "train2017")),
        "val": (str(coco / "annotations/instances_val2017.json"), str(coco / "val2017")),
    }
    with pytest.raises(FileNotFoundError, match=r"(?s)No COCO training split found.*_annotations\.coco\.json"):
        find_coco_splits(str(tmp_path / "coco" / "train2017"))


# ---------------------------------------------------------------------------- both config styles
def test_yacs_config_trains_on_a_folder_with_classes_from_the_json(toys):
    name = unique_dataset_name("yfold")
    cfg = load_config(CUSTOM_YAML, ["DATASETS.ROOT", toys, "DATASETS.NAME", name])
    assert cfg.DATASETS.TRAIN == (f"{name}_train",) and cfg.DATASETS.TEST == (f"{name}_val",)
    assert cfg.MODEL.DINOV2OD.NUM_CLASSES == 3
    meta = MetadataCatalog.get(f"{name}_train")  # filled at registration, before any json load
    assert meta.thing_classes == ["apple", "brick", "kite"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 5: 1, 9: 2}


def test_unregistered_dataset_in_a_yacs_config_names_the_fix():
    with pytest.raises(KeyError, match=r"'toys_train' \(DATASETS\.TRAIN\) is not registered.*DATASETS\.ROOT"):
        load_config(CUSTOM_YAML, ["DATASETS.TRAIN", "('toys_train',)"])
    with pytest.raises(ValueError, match=r"names no dataset.*DATASETS\.ROOT"):
        load_config(CUSTOM_YAML, [])  # custom.yaml without its folder


@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_class_count_that_disagrees_with_the_data_fails_at_config_time(toys, style):
    def opts(name, num_classes):
        if style == "lazy":
            return [f"dataset.root={toys}", f"dataset.name={name}", f"model.num_classes={num_classes}"]
        return ["DATASETS.ROOT", toys, "DATASETS.NAME", name, "MODEL.DINOV2OD.NUM_CLASSES", str(num_classes)]

    path = CUSTOM_PY if style == "lazy" else CUSTOM_YAML
    with pytest.raises(ValueError, match=r"has 3 classes \(\['apple', 'brick', 'kite'\]\) but the model has "
                                         r"num_classes=2\. Set num_classes=3"):
        load_config(path, opts(unique_dataset_name(f"cnt{style}"), 2))
    # negative control: the matching count loads (the error is about the number, not the route)
    cfg = load_config(path, opts(unique_dataset_name(f"cnt{style}"), 3))
    assert (cfg.model.num_classes if style == "lazy" else cfg.MODEL.DINOV2OD.NUM_CLASSES) == 3


def test_class_count_check_runs_for_detectron2s_own_registration(toys):
    """register_coco_instances fills thing_classes only when the json is loaded, after the model is
    built; the check reads the json's categories itself."""
    name = unique_dataset_name("d2reg")
    register_coco_instances(name + "_train", {}, os.path.join(toys, "train/_annotations.coco.json"),
                            os.path.join(toys, "train"))
    assert MetadataCatalog.get(name + "_train").get("thing_classes", None) is None
    with pytest.raises(ValueError, match=r"has 3 classes .* num_classes=80"):
        check_num_classes(80, [name + "_train"])
    check_num_classes(3, [name + "_train"])


@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_epochs_become_iterations_from_the_training_images_with_boxes(toys, style):
    data = json.load(open(os.path.join(toys, "train/_annotations.coco.json")))
    with_boxes = len({a["image_id"] for a in data["annotations"]})  # counted here from the json itself
    assert 0 < with_boxes < len(data["images"])  # the generator made images without boxes
    name = unique_dataset_name(f"ep{style}")
    if style == "lazy":
        cfg = load_config(CUSTOM_PY, [f"dataset.root={toys}", f"dataset.name={name}", "train.epochs=7",
                                      "dataloader.train.total_batch_size=4", "train.accumulate_steps=2"])
        assert cfg.train.max_iter == math.ceil(7 * with_boxes / 8)
    else:
        # STEPS are scaled from the file's MAX_ITER (shapes.yaml: 400, STEPS (320,)); MAX_ITER typed
        # with MAX_EPOCHS would be an error (tests/d2/test_overrides.py)
        cfg = load_config(CUSTOM_YAML, ["DATASETS.ROOT", toys, "DATASETS.NAME", name, "SOLVER.MAX_EPOCHS", "7",
                                        "SOLVER.IMS_PER_BATCH", "4"])
        expected = math.ceil(7 * with_boxes / 4)
        assert cfg.SOLVER.MAX_ITER == expected and cfg.SOLVER.STEPS == (round(0.8 * expected),)


# ---------------------------------------------------------------------------- the start-up check
def test_dataset_check_lists_every_problem_with_the_file(tmp_path, caplog):
    folder = str(tmp_path / "bad")
    data = write_split(folder, 8, seed=3, empty_every=100)
    check_coco_dataset(os.path.join(folder, "_annotations.coco.json"), folder)  # clean: passes
    imgs = data["images"]
    os.remove(os.path.join(folder, imgs[0]["file_name"]))  # missing
    open(os.path.join(folder, imgs[1]["file_name"]), "wb").write(b"not an image")  # undecodable
    imgs[2]["width"] += 10  # size differs from the file
    data["annotations"][0]["category_id"] = 7  # unknown class id
    data["annotations"][1]["bbox"] = [1, 2, 3]  # malformed box
    data["annotations"][2]["bbox"] = [5, 5, 0, 10]  # degenerate: a warning, not an error
    json_file = os.path.join(folder, "_annotations.coco.json")
    json.dump(data, open(json_file, "w"))
    with pytest.raises(DatasetError) as err:
        check_coco_dataset(json_file, folder)
    msg = str(err.value)
    assert msg.startswith(f"{json_file}: 5 problem(s) found before training")
    assert f"{imgs[0]['file_name']}: file not found" in msg
    assert f"{imgs[1]['file_name']}: cannot be decoded" in msg
    assert f"{imgs[2]['file_name']}: the json says {imgs[2]['width']}x{imgs[2]['height']}" in msg
    assert "category_id 7 is not in 'categories' [1, 5, 9]" in msg and "bbox [1, 2, 3] is not four" in msg
    assert "DATASETS.CHECK False" in msg and "dataset.check=False" in msg
    # only a degenerate box left: passes with a warning naming the json
    data["images"] = imgs[3:]
    kept = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    data["annotations"][0]["bbox"] = [5, 5, 10, 0]
    json.dump(data, open(json_file, "w"))
    caplog.set_level(logging.WARNING, logger="dinov2od")
    summary = check_coco_dataset(json_file, folder)
    assert summary.num_degenerate == 1 and "1 box(es) of zero or negative width/height" in caplog.text


@pytest.mark.parametrize("content", ["", "{\"images\": [], \"annotations\": []", "[1, 2]"])
def test_unreadable_json_names_the_file(tmp_path, content):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=str(path)):
        check_coco_dataset(str(path), str(tmp_path))


def test_training_start_runs_the_check_before_building(toys, tmp_path, train_net):
    root = str(tmp_path / "broken")
    shutil.copytree(toys, root)
    data = json.load(open(os.path.join(root, "train/_annotations.coco.json")))
    os.remove(os.path.join(root, "train", data["images"][4]["file_name"]))
    name = unique_dataset_name("broken")
    with pytest.raises(DatasetError, match=rf"{data['images'][4]['file_name']}: file not found"):
        train_net.run(CUSTOM_TINY, f"dataset.root={root}", f"dataset.name={name}", f"train.output_dir={tmp_path}/o")
    assert not os.path.exists(f"{tmp_path}/o/model_final.pth")
    # the documented skip: dataset.check=False registers the data without the check
    from dinov2od.d2.config import check_datasets

    cfg = load_config(CUSTOM_PY, [f"dataset.root={root}", f"dataset.name={name}x", "dataset.check=False"])
    check_datasets([cfg.dataloader.train.dataset.names])


# ---------------------------------------------------------------------------- images
def test_16_bit_grayscale_png_reads_scaled_not_white(tmp_path):
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0..65535 in 256 steps
    path = str(tmp_path / "wide.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = read_image(path, "RGB")
    expected = (values.astype(np.float64) * 255 / 65535).round().astype(np.uint8)  # = values / 257
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    # negative control: Detectron2's reader clips everything above 255 (the bug users saw)
    assert (d2_utils.read_image(path, "RGB") == 255).mean() > 0.99
    # 8-bit files read as Detectron2 reads them
    Image.fromarray(expected).save(str(tmp_path / "narrow.png"))
    assert np.array_equal(read_image(str(tmp_path / "narrow.png"), "BGR"),
                          d2_utils.read_image(str(tmp_path / "narrow.png"), "BGR"))


# ---------------------------------------------------------------------------- configs
def test_config_style_recognises_a_lazy_runs_saved_yaml(tmp_path):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/shapes.py"))
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    assert config_style(str(tmp_path / "config.yaml")) == "lazy"
    assert config_style(os.path.join(ROOT, "configs/yaml/shapes.yaml")) == "yacs"
    loaded = load_config(str(tmp_path / "config.yaml"), ["model.num_classes=3"], resolve_data=False)
    assert loaded.model.detector.hidden_dim == cfg.model.detector.hidden_dim


def test_demo_backbone_path_works_from_any_directory(tmp_path, monkeypatch):
    from dinov2od.modeling.backbones.loading import resolve_local_path

    monkeypatch.chdir(tmp_path)
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/shapes.py"))
    path = resolve_local_path(cfg.model.detector.backbone.pretrained)
    assert os.path.isfile(path) and os.path.samefile(path, os.path.join(ROOT, "weights/dinov2od_tiny_glyphs.pth"))
    assert resolve_local_path("weights/no_such_file.pth") == "weights/no_such_file.pth"  # reported as given


# ---------------------------------------------------------------------------- classes in the weights
def _tiny_detector(num_classes=3):
    from tests.helpers.detector import tiny_detector

    torch.manual_seed(0)
    return tiny_detector(num_classes=num_classes)


def test_class_names_and_ids_travel_in_the_state_dict_and_predict():
    det = _tiny_detector().eval()
    assert det.class_names is None and "category_ids" not in det.predict(torch.rand(1, 3, 56, 56))[0]
    det.set_classes(["apple", "brick", "kite"], [1, 5, 9])
    fresh = _tiny_detector()
    fresh.load_state_dict(det.state_dict())
    assert fresh.class_names == ["apple", "brick", "kite"] and fresh.class_ids == [1, 5, 9]
    out = fresh.eval().predict(torch.rand(2, 3, 56, 56), topk=12)
    table = {0: (1, "apple"), 1: (5, "brick"), 2: (9, "kite")}
    for r in out:
        assert r["category_ids"].tolist() == [table[i][0] for i in r["labels"].tolist()]
        assert r["names"] == [table[i][1] for i in r["labels"].tolist()]
    with pytest.raises(ValueError, match="num_classes=3 but was given 2 class names"):
        det.set_classes(["a", "b"])


def test_class_names_survive_detectron2s_checkpointer(tmp_path):
    """DefaultPredictor loads weights with Detectron2's DetectionCheckpointer, which skips tensors of
    another shape: the fixed-size buffer must load through it."""
    from detectron2.checkpoint import DetectionCheckpointer

    det = _tiny_detector()
    det.set_classes(["a" * 40, "b", "ç"], [3, 1, 2])
    DetectionCheckpointer(det, save_dir=str(tmp_path)).save("m")
    fresh = _tiny_detector()
    DetectionCheckpointer(fresh).load(str(tmp_path / "m.pth"))
    assert fresh.class_names == ["a" * 40, "b", "ç"] and fresh.class_ids == [3, 1, 2]


def test_plain_predict_warns_on_a_very_large_image(caplog, monkeypatch):
    det = _tiny_detector().eval()
    monkeypatch.setattr(type(det), "LARGE_IMAGE_SIDE", 60)
    caplog.set_level(logging.WARNING, logger="dinov2od")
    det.predict(torch.rand(1, 3, 56, 56))
    assert "predict() got an image" not in caplog.text  # negative control: under the limit
    det.predict(torch.rand(1, 3, 56, 70))
    assert "predict() got an image of 70 px on its longer side" in caplog.text
