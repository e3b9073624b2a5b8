"""COCO-format detection data with DETR augmentation (train) and a fixed resize (test).

Datasets are Detectron2 registered names: ``coco_2017_train`` / ``coco_2017_val`` (under
``$DETECTRON2_DATASETS``), the built-in ``shapes_train`` / ``shapes_val``, or your own
(``register_coco_instances`` / ``dinov2od.d2.register_coco_dataset``), or a COCO folder named by
``dataset.root`` (``dataset`` below; registered by ``dinov2od.d2.config.load_config``, which then
points ``dataloader.train``/``test`` at it).
"""
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator

from dinov2od.d2 import DetrDatasetMapper, build_detr_augmentation
from dinov2od.d2.data.data_cache import train_dataset

# Your own COCO data (docs/your_data.md): root=None leaves the dataloader's names as they are.
dataset = dict(
    root=None,  # a Roboflow / RF-DETR export or COCO's folder layout, a YOLO folder or a Pascal VOC folder
    format="auto",  # root's layout: "auto" (from the folder), "coco", "yolo" or "voc"
    name="custom",  # registered as <name>_train, <name>_val
    train_json=None,  # explicit files instead of (or over) root
    train_images=None,  # default: the json's folder
    val_json=None,
    val_images=None,
    check=True,  # check every image file before training (False: skip)
    check_images="decode",  # "decode" every image (a truncated file is found) or "header" only (~15x faster)
)

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    # cache=True: parsed once per machine, memory-mapped by every rank (dinov2od.d2.data.data_cache;
    # cache_dir None: $DINOV2OD_CACHE/datasets or ~/.cache/dinov2od/datasets); False: every rank parses
    dataset=L(train_dataset)(names="coco_2017_train", filter_empty=True, cache=True, cache_dir=None),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(build_detr_augmentation)(
            is_train=True,
            min_size_train=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
            max_size_train=1333,
            crop_resize=(400, 500, 600),
            crop_size=(384, 600),
            random_flip="horizontal",
        ),
        image_format="RGB",
    ),
    total_batch_size=64,  # over all GPUs; train.images_per_gpu (+ effective_batch) sets it per GPU instead
    num_workers=4,
    aspect_ratio_grouping=True,  # set False for bit-exact resume
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=L(build_detr_augmentation)(is_train=False, min_size_test=800, max_size_test=1333),
        image_format="${...train.mapper.image_format}",
    ),
    batch_size=1,
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir=None,  # None: <train.output_dir>/inference
)
