"""The Detectron2 meta-architecture: DefaultPredictor, config styles, pre/post-processing, losses."""
import os

import numpy as np
import pytest
import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances

from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
from dinov2od.d2.config import check_num_classes
from dinov2od.layers import box_cxcywh_to_xyxy

from tests.helpers import ROOT
from tests.helpers.configs import tiny_model, tiny_yacs_cfg


def test_default_predictor_returns_instances_in_image_coordinates():
    cfg = tiny_yacs_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 112  # the model sees a 112x149 image; outputs must be 480x640
    cfg.INPUT.MAX_SIZE_TEST = 400
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)  # BGR
    inst = predictor(image)["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (480, 640)
    assert len(inst) == min(100, 12 * 3)  # top-k over queries x classes
    assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < 3
    # boxes are the model's normalized boxes scaled to the ORIGINAL size (not the resized one)
    model = predictor.model
    x = predictor.aug.get_transform(image).apply_image(image[:, :, ::-1])  # the predictor's resize
    images, masks = model.preprocess_image([{"image": torch.as_tensor(x.copy()).permute(2, 0, 1)}])
    with torch.no_grad():
        out = model.detector(images.tensor, masks, normalized=True)
    scores = out["pred_logits"].sigmoid().flatten(1)[0]
    top = scores.argsort(descending=True)[0]
    box = box_cxcywh_to_xyxy(out["pred_boxes"][0, top // 3]) * torch.tensor([640.0, 480, 640, 480])
    box[0::2].clamp_(0, 640)
    box[1::2].clamp_(0, 480)
    assert x.shape[:2] == (112, 149)
    assert torch.allclose(inst.pred_boxes.tensor[0], box, atol=1e-3)


def test_batched_inference_equals_one_by_one():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    inputs = [
        {"image": torch.randint(0, 255, (3, 98, 140), generator=g, dtype=torch.uint8), "height": 196, "width": 280},
        {"image": torch.randint(0, 255, (3, 126, 84), generator=g, dtype=torch.uint8)},
    ]
    with torch.no_grad():
        batched = model(inputs)
        single = [model([x])[0] for x in inputs]
    assert batched[0]["instances"].image_size == (196, 280)
    for b, s in zip(batched, single):
        b, s = b["instances"], s["instances"]
        assert torch.allclose(b.scores, s.scores, atol=1e-5)
        assert torch.equal(b.pred_classes, s.pred_classes)
        assert torch.allclose(b.pred_boxes.tensor, s.pred_boxes.tensor, atol=1e-3)


def test_bgr_and_rgb_input_formats_agree():
    rgb_model = tiny_model()
    bgr_model = tiny_model(input_format="BGR", pixel_mean=[103.53, 116.28, 123.675], pixel_std=[57.375, 57.12, 58.395])
    img = torch.randint(0, 255, (3, 70, 84), dtype=torch.uint8)
    with torch.no_grad():
        a = rgb_model([{"image": img}])[0]["instances"]
        b = bgr_model([{"image": img.flip(0)}])[0]["instances"]
    assert torch.allclose(a.scores, b.scores, atol=1e-5)


LEVERS = (  # (lazy key, yacs key, value): the training levers, all away from their defaults
    ("detector.dn_groups", "DN.GROUPS", 3), ("detector.dn_label_noise", "DN.LABEL_NOISE", 0.3),
    ("detector.dn_box_noise", "DN.BOX_NOISE", 0.5), ("detector.o2m_queries", "O2M_QUERIES", 20),
    ("criterion.o2m_repeats", "LOSS.O2M_REPEATS", 4), ("criterion.o2m_weight", "LOSS.O2M_WEIGHT", 0.5),
)


@pytest.mark.parametrize("options", ["default", "spatial_prior", "levers"])
def test_yacs_and_lazy_configs_build_the_same_model(options):
    spatial_prior = 16 if options == "spatial_prior" else 0
    lazy = LazyConfig.load(os.path.join(ROOT, "configs/shapes.py"))
    lazy.model.detector.spatial_prior = spatial_prior
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    cfg.MODEL.DINOV2OD.SPATIAL_PRIOR = spatial_prior
    if options == "levers":
        lazy = LazyConfig.apply_overrides(lazy, [f"model.{k}={v}" for k, _, v in LEVERS])
        cfg.merge_from_list([x for _, k, v in LEVERS for x in (f"MODEL.DINOV2OD.{k}", v)])
    torch.manual_seed(123)
    m_lazy = instantiate(lazy.model)
    torch.manual_seed(123)
    m_yacs = DINOv2DETR(cfg)
    a, b = m_lazy.state_dict(), m_yacs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    assert m_lazy.test_topk == m_yacs.test_topk and m_lazy.input_format == m_yacs.input_format
    assert m_lazy.criterion.weight_dict["loss_giou"] == m_yacs.criterion.weight_dict["loss_giou"]
    for attr in ("class_loss", "enc_loss", "dense_topk", "o2m_repeats", "o2m_weight"):
        assert getattr(m_lazy.criterion, attr) == getattr(m_yacs.criterion, attr), attr
    assert m_lazy.criterion.class_loss == "quality_focal"  # what the demo trains with
    dec_lazy, dec_yacs = m_lazy.detector.decoder, m_yacs.detector.decoder
    for attr in ("two_stage_nms", "dn_groups", "dn_queries", "dn_label_noise", "dn_box_noise", "o2m_queries"):
        assert getattr(dec_lazy, attr) == getattr(dec_yacs, attr), attr
    assert (m_yacs.detector.spatial_prior is not None) == bool(spatial_prior)
    if options == "levers":
        assert (dec_yacs.dn_groups, dec_yacs.o2m_queries, m_yacs.criterion.o2m_weight) == (3, 20, 0.5)
        assert "detector.decoder.dn_label_embed.weight" in b and "detector.decoder.o2m_query_embed.weight" in b


def _train_inputs(with_boxes=True, cls=1):
    inst = Instances((84, 112))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12, 50, 60], [60, 20, 100, 80]]) if with_boxes else torch.zeros(0, 4))
    inst.gt_classes = torch.tensor([0, cls]) if with_boxes else torch.zeros(0, dtype=torch.long)
    return [{"image": torch.randint(0, 255, (3, 84, 112), dtype=torch.uint8), "instances": inst, "file_name": "x.jpg"}]


def test_training_returns_weighted_losses_and_handles_empty_targets():
    model = tiny_model().train()
    inputs = _train_inputs() + _train_inputs(with_boxes=False)  # 2nd image: no objects
    losses = model(inputs)
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_giou_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    images, masks = model.preprocess_image(inputs)
    targets = model.prepare_targets(inputs, images.image_sizes)
    raw = model.criterion(model.detector(images.tensor, masks, normalized=True), targets)
    w = model.criterion.weight_dict
    for k, v in losses.items():
        assert torch.allclose(v, raw[k] * w[k]), k
    assert w["loss_bbox"] == 5.0 and w["loss_giou_0"] == 2.0


def test_training_with_denoising_and_one_to_many_queries():
    """The meta-arch hands the targets to the detector (denoising queries are built from them) and
    weights the ``_dn``/``_o2m`` losses; inference is unchanged."""
    cfg = tiny_yacs_cfg(**{"MODEL.DINOV2OD.DN.GROUPS": 2, "MODEL.DINOV2OD.O2M_QUERIES": 6,
                           "MODEL.DINOV2OD.LOSS.O2M_WEIGHT": 0.5})
    torch.manual_seed(0)
    model = DINOv2DETR(cfg).train()
    inputs = _train_inputs() + _train_inputs(with_boxes=False)
    losses = model(inputs)
    assert {"loss_class_dn", "loss_bbox_dn_0", "loss_giou_o2m", "loss_class_o2m_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    w = model.criterion.weight_dict
    assert (w["loss_bbox_dn_0"], w["loss_bbox_o2m"], w["loss_class_o2m_0"]) == (5.0, 2.5, 1.0)
    sum(losses.values()).backward()
    torch.manual_seed(0)
    plain = DINOv2DETR(tiny_yacs_cfg()).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        a, b = model.eval()(inputs[:1])[0]["instances"], plain(inputs[:1])[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


def test_class_id_outside_model_is_a_clear_error():
    model = tiny_model().train()
    with pytest.raises(ValueError, match=r"x\.jpg has class id 7 outside \[0, num_classes=3\); set num_classes"):
        model(_train_inputs(cls=7))


def test_dataset_and_model_class_counts_must_agree():
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("four_class_t").set(thing_classes=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"'four_class_t' has 4 classes .* num_classes=3.*num_classes=4"):
        check_num_classes(tiny_model(), "four_class_t")
    check_num_classes(tiny_model(), "shapes_val")  # 3 == 3


def test_num_classes_set_in_one_place_is_checked():
    from dinov2od.modeling import SetCriterion

    model = tiny_model()
    with pytest.raises(ValueError, match="criterion has num_classes=5"):
        DINOv2DETR(detector=model.detector, criterion=SetCriterion(num_classes=5), num_classes=3)


def test_backbone_registry_builder_gives_a_detectron2_backbone():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = tiny_yacs_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_dinov2_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    shapes = backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p0": 7, "p1": 14, "p2": 28}
    feats = backbone(torch.randn(2, 3, 112, 140))
    for k, f in feats.items():
        assert f.shape == (2, 32, 112 // shapes[k].stride, 140 // shapes[k].stride), (k, f.shape)


def test_bfloat16_autocast_training_step_on_cpu():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_train_inputs())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
