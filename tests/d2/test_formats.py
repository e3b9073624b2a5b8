"""YOLO and Pascal VOC folders beside COCO (dinov2od.d2.data.datasets.formats): the readers, the layouts
they accept, the errors naming the file and line, auto-detection and ``dataset.format``, and
tools/convert_dataset.py.

Negative controls, run by hand when these tests were written (each test failed, then the change
was undone):
- names as a dict read in key order reversed (``keys[::-1]``): test_yolo_names_as_list_or_dict
  failed (category names swapped);
- a missing label file made an error instead of an empty image: test_missing_and_empty_label_files
  failed;
- the line counter starting at 0: test_yolo_bad_lines_name_file_and_line failed ("line 2");
- the ``../`` fallback of Roboflow's ``train: ../train/images`` removed: test_yolo_layouts_read_alike
  failed (not a folder of images);
- Ultralytics' images->labels rule replaced by "labels beside the image": the same test failed
  (no label file found);
- ``difficult`` ignored (iscrowd 0): test_voc_difficult_objects_are_ignore_regions failed;
- VOC's ``xmin - 1`` dropped: test_voc_reads_like_detectron2s_loader failed (boxes differ by 1);
- the hash split replaced by "all for training": test_voc_without_imagesets_splits_by_name_hash failed;
- detection order YOLO before COCO, or VOC before YOLO, or ``format`` not passed on by
  resolve_dataset: test_auto_detection_and_forced_format failed;
- an empty label file raising: test_missing_and_empty_label_files_are_images_without_objects failed;
- the near-duplicate pass with IoU >= 0.99: test_check_warns_about_one_object_annotated_twice failed.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances

from tests.helpers import ROOT
from tests.helpers.user_data import unique_dataset_name
from dinov2od.d2.config import load_config
from dinov2od.d2.data.datasets import DatasetError, check_coco_dataset, register_coco_folder
from dinov2od.d2.data.datasets.check import near_duplicates
from dinov2od.d2.data.datasets.formats import detect_format, find_dataset_splits
from dinov2od.d2.data.datasets.voc import read_voc
from dinov2od.d2.data.datasets.yolo import read_yolo

SIZES = {"a": (64, 48), "b": (80, 60), "c": (48, 64)}
# the offline configs for your data (configs/custom.py before they came); loading one builds no model
LAZY = next(p for p in (os.path.join(ROOT, "configs", n) for n in ("custom_tiny.py", "custom.py")) if os.path.isfile(p))
YACS = next(p for p in (os.path.join(ROOT, "configs/yaml", n) for n in ("custom_tiny.yaml", "custom.yaml"))
            if os.path.isfile(p))


def _image(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def _yolo(root, names=("cat", "dog"), layout="split_first", labels=None, yaml_text=None):
    """A YOLO folder: images a, b (train) and c (val); labels per stem (default: one box each)."""
    labels = labels if labels is not None else {"a": "0 0.5 0.5 0.5 0.5\n", "b": "1 0.25 0.5 0.5 1.0\n",
                                                "c": "0 0.5 0.5 1 1\n"}
    for split, stems in (("train", "ab"), ("valid", "c")):
        for stem in stems:
            img_dir = f"{split}/images" if layout == "split_first" else f"images/{split}"
            lab_dir = f"{split}/labels" if layout == "split_first" else f"labels/{split}"
            _image(os.path.join(root, img_dir, stem + ".jpg"), SIZES[stem])
            if labels.get(stem) is not None:
                os.makedirs(os.path.join(root, lab_dir), exist_ok=True)
                with open(os.path.join(root, lab_dir, stem + ".txt"), "w") as f:
                    f.write(labels[stem])
    if yaml_text is None:
        train, val = ("../train/images", "../valid/images") if layout == "split_first" else ("images/train", "images/valid")
        yaml_text = f"train: {train}\nval: {val}\nnc: {len(names)}\nnames: {list(names)}\n"
    with open(os.path.join(root, "data.yaml"), "w") as f:
        f.write(yaml_text)
    return str(root)


VOC_XML = """<annotation>
  <filename>{stem}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJECT = """  <object>
    <name>{name}</name>
    <difficult>{difficult}</difficult>
    <bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>
  </object>
"""


def _voc(root, objects=None, imagesets=True):
    """A VOC folder: a, b (train), c (val); objects per stem as (name, (xmin, ymin, xmax, ymax), difficult)."""
    objects = objects if objects is not None else {
        "a": [("zebra", (5, 6, 30, 40), 0), ("ant", (1, 1, 64, 48), 0)],
        "b": [("ant", (10, 10, 20, 20), 1)],
        "c": [("zebra", (2, 3, 40, 50), 0)],
    }
    for stem, objs in objects.items():
        w, h = SIZES[stem]
        _image(os.path.join(root, "JPEGImages", stem + ".jpg"), (w, h))
        os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
        text = "".join(VOC_OBJECT.format(name=n, b=b, difficult=d) for n, b, d in objs)
        with open(os.path.join(root, "Annotations", stem + ".xml"), "w") as f:
            f.write(VOC_XML.format(stem=stem, w=w, h=h, objects=text))
    if imagesets:
        os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
        for split, stems in (("train", "ab"), ("val", "c")):
            with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
                f.write("".join(s + "\n" for s in stems))
    return str(root)


def _boxes(data):
    return [(a["category_id"], [round(v, 6) for v in a["bbox"]]) for a in data["annotations"]]


# ---------------------------------------------------------------------------- YOLO
def test_yolo_names_as_list_or_dict(tmp_path):
    as_list = read_yolo(_yolo(tmp_path / "l"))
    as_dict = read_yolo(_yolo(tmp_path / "d", yaml_text="train: ../train/images\nval: ../valid/images\n"
                                                        "names:\n  1: dog\n  0: cat\n"))
    for splits in (as_list, as_dict):
        data, image_root = splits["train"]
        assert data["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
        assert [i["file_name"] for i in data["images"]] == ["train/images/a.jpg", "train/images/b.jpg"]
        # normalised cx cy w h -> absolute x y w h; class index = category id
        assert _boxes(data) == [(0, [16.0, 12.0, 32.0, 24.0]), (1, [0.0, 0.0, 40.0, 60.0])]
        assert os.path.isfile(os.path.join(image_root, data["images"][0]["file_name"]))
    assert _boxes(as_list["val"][0]) == [(0, [0.0, 0.0, 48.0, 64.0])]
    with pytest.raises(DatasetError, match=r"class indices 0\.\.1 as keys"):
        read_yolo(_yolo(tmp_path / "bad", yaml_text="train: ../train/images\nnames: {1: cat, 2: dog}\n"))
    with pytest.raises(DatasetError, match=r"nc: 3 but 'names' has 2"):
        read_yolo(_yolo(tmp_path / "nc", yaml_text="train: ../train/images\nnc: 3\nnames: [cat, dog]\n"))


def test_missing_and_empty_label_files_are_images_without_objects(tmp_path):
    root = _yolo(tmp_path / "y", labels={"a": "0 0.5 0.5 0.5 0.5\n", "b": "", "c": None})
    splits = read_yolo(root)
    train, val = splits["train"][0], splits["val"][0]
    assert [i["file_name"] for i in train["images"]] == ["train/images/a.jpg", "train/images/b.jpg"]
    assert [a["image_id"] for a in train["annotations"]] == [1]  # b.txt is empty
    assert len(val["images"]) == 1 and val["annotations"] == []  # c has no label file
    # no label file for any training image: the layout is wrong, not the data
    bare = _yolo(tmp_path / "bare", labels={"a": None, "b": None, "c": None})
    with pytest.raises(DatasetError, match=r"none of the 2 training images has a label file.*train/labels/a\.txt"):
        read_yolo(bare)


def test_yolo_bad_lines_name_file_and_line(tmp_path):
    root = _yolo(tmp_path / "y", labels={
        "a": "0 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.1 0.1\n",  # class 2 of 2 names
        "b": "\n1 0.5 0.5 0.2\n1 320 240 100 80\n",  # a line of 4 numbers; pixels, not fractions
        "c": "0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n",  # a segment: its bounding box
    })
    with pytest.raises(DatasetError) as e:
        read_yolo(root)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "train/labels/a.txt line 2: class index 2 is not one of the 2 names" in msg
    assert "train/labels/b.txt line 2: '1 0.5 0.5 0.2' is not 'class cx cy w h'" in msg
    assert "train/labels/b.txt line 3: coordinates ['320', '240', '100', '80'] are not normalised" in msg
    # the segment alone reads as its box
    shutil.rmtree(os.path.join(root, "train"))
    _yolo(tmp_path / "y", labels={"a": "", "b": "", "c": "0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n"})
    assert _boxes(read_yolo(root)["val"][0]) == [(0, [4.8, 6.4, 9.6, 19.2])]


def test_yolo_layouts_read_alike(tmp_path):
    """train/images + train/labels (Roboflow, data.yaml says ../train/images) and images/train +
    labels/train (Ultralytics), a .txt list of images, and a `path:` that moved."""
    a = read_yolo(_yolo(tmp_path / "split_first", layout="split_first"))
    b = read_yolo(_yolo(tmp_path / "images_first", layout="images_first"))
    for split in ("train", "val"):
        assert _boxes(a[split][0]) == _boxes(b[split][0])
        assert [os.path.basename(i["file_name"]) for i in a[split][0]["images"]] == \
            [os.path.basename(i["file_name"]) for i in b[split][0]["images"]]
    assert b["train"][0]["images"][0]["file_name"] == "images/train/a.jpg"
    root = tmp_path / "images_first"
    (root / "train.txt").write_text("./images/train/a.jpg\n./images/train/b.jpg\n")
    (root / "data.yaml").write_text("path: /nowhere/moved\ntrain: train.txt\nval: images/valid\nnames: [cat, dog]\n")
    c = read_yolo(str(root))
    assert _boxes(c["train"][0]) == _boxes(b["train"][0])


def test_yolo_registration_predicts_yolo_indices(tmp_path):
    name = unique_dataset_name("yolo")
    names = register_coco_folder(_yolo(tmp_path / "y"), name=name)
    assert names == {"train": f"{name}_train", "val": f"{name}_val"}
    meta = MetadataCatalog.get(names["train"])
    assert meta.thing_classes == ["cat", "dog"] and meta.thing_dataset_id_to_contiguous_id == {0: 0, 1: 1}
    assert meta.json_file.startswith(os.environ["DINOV2OD_CACHE"])  # never beside the user's files
    dicts = DatasetCatalog.get(names["train"])
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["a.jpg", "b.jpg"]
    assert [[a["category_id"] for a in d["annotations"]] for d in dicts] == [[0], [1]]


# ---------------------------------------------------------------------------- VOC
def test_voc_reads_like_detectron2s_loader(tmp_path):
    root = _voc(tmp_path / "v")
    splits = read_voc(root)
    assert set(splits) == {"train", "val"}
    data, image_root = splits["train"]
    assert data["categories"] == [{"id": 0, "name": "ant"}, {"id": 1, "name": "zebra"}]  # sorted names
    ours = [(os.path.join(image_root, i["file_name"]), [(a["category_id"], [a["bbox"][0], a["bbox"][1],
             a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]) for a in data["annotations"]
             if a["image_id"] == i["id"]]) for i in data["images"]]
    theirs = [(d["file_name"], [(a["category_id"], a["bbox"]) for a in d["annotations"]])
              for d in load_voc_instances(root, "train", ["ant", "zebra"])]
    assert ours == theirs


def test_voc_difficult_objects_are_ignore_regions(tmp_path, caplog):
    root = _voc(tmp_path / "v")
    data, image_root = read_voc(root)["train"]
    assert [(a["category_id"], a["iscrowd"]) for a in data["annotations"]] == [(1, 0), (0, 0), (0, 1)]
    name = unique_dataset_name("vocd")
    names = register_coco_folder(root, name=name)
    with caplog.at_level(logging.WARNING, logger="dinov2od"):
        meta = MetadataCatalog.get(names["train"])
        summary = check_coco_dataset(meta.json_file, meta.image_root)
    assert summary.num_crowd == 1 and summary.num_boxes == 2
    assert "Annotations/b.xml line" in caplog.text and "iscrowd" in caplog.text


def test_voc_without_imagesets_splits_by_name_hash(tmp_path):
    root = _voc(tmp_path / "v", imagesets=False, objects={
        s: [("ant", (1, 1, 10, 10), 0)] for s in "abc"})
    for k in range(3, 25):  # more images, so both splits get some
        stem = f"img{k:02d}"
        _image(os.path.join(root, "JPEGImages", stem + ".jpg"), (32, 32))
        with open(os.path.join(root, "Annotations", stem + ".xml"), "w") as f:
            f.write(VOC_XML.format(stem=stem, w=32, h=32, objects=VOC_OBJECT.format(name="ant", b=(1, 1, 9, 9), difficult=0)))
    first = read_voc(root)
    files = {s: [i["file_name"] for i in d["images"]] for s, (d, _) in first.items()}
    assert set(files) == {"train", "val"} and files["train"] and files["val"]
    assert sorted(files["train"] + files["val"]) == sorted(os.listdir(os.path.join(root, "JPEGImages")))
    assert not set(files["train"]) & set(files["val"])
    assert {s: [i["file_name"] for i in d["images"]] for s, (d, _) in read_voc(root).items()} == files  # fixed
    # adding an image moves no other one
    _image(os.path.join(root, "JPEGImages", "zz.jpg"), (32, 32))
    with open(os.path.join(root, "Annotations", "zz.xml"), "w") as f:
        f.write(VOC_XML.format(stem="zz", w=32, h=32, objects=""))
    again = {s: [i["file_name"] for i in d["images"] if i["file_name"] != "zz.jpg"] for s, (d, _) in read_voc(root).items()}
    assert again == files


def test_voc_bad_xml_names_file_and_line(tmp_path):
    root = _voc(tmp_path / "v")
    xml = os.path.join(root, "Annotations", "b.xml")
    with open(xml) as f:
        lines = f.read().splitlines()
    lines[5] = lines[5].replace("</difficult>", "")  # line 6: an unclosed tag
    with open(xml, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(root, "Annotations", "a.xml")) as f:
        text = f.read()
    with open(os.path.join(root, "Annotations", "a.xml"), "w") as f:
        f.write(text.replace("<xmin>5</xmin>", "<xmin>five</xmin>"))
    os.remove(os.path.join(root, "JPEGImages", "c.jpg"))
    with pytest.raises(DatasetError) as e:
        read_voc(root)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "Annotations/b.xml line 8: not well-formed XML (mismatched tag: line 8, column 4)" in msg  # where expat finds it
    assert "Annotations/a.xml line 4 (object 1): <bndbox> needs the numbers xmin, ymin, xmax, ymax, found ['five'" in msg
    assert "Annotations/c.xml: no image JPEGImages/c.jpg" in msg


# ---------------------------------------------------------------------------- detection and dataset.format
def test_auto_detection_and_forced_format(tmp_path):
    from tests.helpers.user_data import write_roboflow_dataset

    coco = write_roboflow_dataset(str(tmp_path / "coco"), num_train=2, num_valid=1)
    yolo, voc = _yolo(tmp_path / "yolo"), _voc(tmp_path / "voc")
    assert (detect_format(coco), detect_format(yolo), detect_format(voc)) == ("coco", "yolo", "voc")
    both = _voc(_yolo(tmp_path / "both"))  # data.yaml and Annotations/ in one folder: YOLO first
    assert detect_format(both) == "yolo"
    assert detect_format(_yolo(coco)) == "coco"  # a COCO json first
    name = unique_dataset_name("fmt")
    cfg = load_config(LAZY,
                      [f"dataset.root={both}", "dataset.format=voc", f"dataset.name={name}"])
    assert cfg.model.num_classes == 2
    assert MetadataCatalog.get(f"{name}_train").thing_classes == ["ant", "zebra"]  # VOC's, not data.yaml's
    yname = unique_dataset_name("yfmt")
    cfg = load_config(YACS,
                      ["DATASETS.ROOT", both, "DATASETS.FORMAT", "yolo", "DATASETS.NAME", yname])
    assert cfg.DATASETS.TRAIN == (f"{yname}_train",) and MetadataCatalog.get(f"{yname}_train").thing_classes == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="not a Pascal VOC folder"):
        find_dataset_splits(yolo, "voc")
    with pytest.raises(FileNotFoundError, match="No YOLO dataset yaml"):
        find_dataset_splits(voc, "yolo")
    with pytest.raises(ValueError, match=r"must be one of \['auto', 'coco', 'yolo', 'voc'\].*'pascal'"):
        find_dataset_splits(voc, "pascal")


def test_a_folder_of_no_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "photos").mkdir()
    _image(str(tmp_path / "photos" / "images" / "x.jpg"), (32, 32))
    with pytest.raises(FileNotFoundError) as e:
        detect_format(str(tmp_path / "photos"))
    msg = str(e.value)
    for expected in ("_annotations.coco.json", "instances_train*.json", "data.yaml", "Annotations/*.xml",
                     "JPEGImages/", "dataset.format=coco|yolo|voc"):
        assert expected in msg
    with pytest.raises(FileNotFoundError, match="data.yaml"):
        load_config(LAZY, [f"dataset.root={tmp_path / 'photos'}"])


# ---------------------------------------------------------------------------- the check and the converter
def test_check_warns_about_one_object_annotated_twice(tmp_path, caplog):
    root = _voc(tmp_path / "v", objects={
        "a": [("ant", (5, 5, 45, 45), 0), ("ant", (6, 6, 46, 46), 0), ("zebra", (5, 5, 45, 45), 0)],
        "b": [("ant", (1, 1, 20, 20), 0), ("ant", (30, 30, 50, 50), 0)],
        "c": [("ant", (1, 1, 20, 20), 0)],
    })
    data, image_root = read_voc(root)["train"]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="dinov2od"):
        summary = check_coco_dataset(str(path), image_root)
    assert len([w for w in summary.warnings if "annotated twice" in w]) == 1
    assert "1 pair(s) of boxes of one class in one image overlap with IoU >= 0.9" in caplog.text
    assert "Annotations/a.xml line 4 (object 1)) and annotation id 2" in caplog.text
    # the pass: neighbours by (image, class, x0); another class or image is no duplicate
    rows = [(1, 0, 0, 0, 10, 10, "p"), (1, 0, 0.2, 0, 10.2, 10, "q"), (1, 1, 0, 0, 10, 10, "r"), (2, 0, 0, 0, 10, 10, "s")]
    assert near_duplicates(rows) == ["p and q"]


def test_convert_dataset_writes_coco_that_registers_alike(tmp_path):
    voc = _voc(tmp_path / "v")
    out = tmp_path / "coco"
    tool = os.path.join(ROOT, "tools", "convert_dataset.py")
    run = subprocess.run([sys.executable, tool, "--input", voc, "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(out)) == ["train", "valid"] and sorted(os.listdir(out / "train")) == [
        "_annotations.coco.json", "a.jpg", "b.jpg"]
    a, b = unique_dataset_name("cv"), unique_dataset_name("cc")
    register_coco_folder(voc, name=a)
    register_coco_folder(str(out), name=b)
    for split in ("train", "val"):
        da, db = DatasetCatalog.get(f"{a}_{split}"), DatasetCatalog.get(f"{b}_{split}")
        assert [os.path.basename(d["file_name"]) for d in da] == [os.path.basename(d["file_name"]) for d in db]
        assert [d["annotations"] for d in da] == [d["annotations"] for d in db]
    assert MetadataCatalog.get(f"{b}_train").thing_dataset_id_to_contiguous_id == {0: 0, 1: 1}
    # nothing is overwritten; the output never lies inside the input
    again = subprocess.run([sys.executable, tool, "--input", voc, "--output", str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "is not an empty folder" in again.stderr
    inside = subprocess.run([sys.executable, tool, "--input", voc, "--output", os.path.join(voc, "coco")],
                            capture_output=True, text=True)
    assert inside.returncode != 0 and "lies inside the input" in inside.stderr
