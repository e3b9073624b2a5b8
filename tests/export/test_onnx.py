"""ONNX export (dinov2od.export) of the plain detector checked with onnxruntime on the CPU (no
Detectron2: the modern environment runs these too; the Detectron2 graph and predict.py:
d2/test_export_onnx.py).

Every graph is exported once per module and run at sizes other than its tracing example, so a
size frozen into the graph as a constant would show up as a mismatch.
"""
import os

import numpy as np
import pytest
import torch

from dinov2od.export import DetectorGraph, OnnxDetector, check_exportable, export_detector, onnx_metadata
from dinov2od.modeling import DINOv2Backbone, DINOv2ObjectDetector

from tests.helpers.detector import TINY_VIT, perturb, tiny_detector

ATOL = 1e-4  # logits and normalized boxes


def assert_parity(model, graph, sizes, topk=20, atol=ATOL, seed=0):
    """onnxruntime == PyTorch on a zero-padded batch of ``sizes`` (random values under the padding);
    ``graph``: an OnnxDetector (one session per graph: each takes 0.4-0.5 s to create)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    batch, hw = OnnxDetector.batch(images)
    batch[:] = np.where(batch == 0, np.random.default_rng(seed).random(batch.shape, np.float32), batch)
    out = graph(batch, hw)
    with torch.no_grad():
        ref = model(images)  # the plain API, padding the list itself
        dets = model.predict(images, topk=topk)
    np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"].numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes"].numpy(), rtol=0, atol=atol)
    for i, d in enumerate(dets):
        np.testing.assert_array_equal(out["labels"][i], d["labels"].numpy())
        np.testing.assert_allclose(out["scores"][i], d["scores"].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(out["boxes"][i], d["boxes"].numpy(), rtol=0, atol=atol * max(sizes[i]))
    return out, batch, hw


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny model with the options the ViT-S test leaves out: registers (antialiased position
    resize), windowed attention, LoRA, two-stage queries, a conv spatial prior, an encoder layer."""
    torch.manual_seed(0)
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY_VIT, registers=True, num_taps=1, lora_rank=4,
                              window_size=2)  # block 0 windowed, block 1 tapped
    model = DINOv2ObjectDetector(num_classes=3, backbone=backbone, hidden_dim=32, num_queries=12,
                                 num_decoder_layers=2, num_heads=4, num_points=2, dim_feedforward=64,
                                 two_stage=True, spatial_prior=8, num_encoder_layers=1).eval()
    perturb(model)
    path = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    export_detector(model, path, image_size=(61, 75), batch_size=2, topk=20)
    return model, path


def test_tiny_graph_matches_pytorch_at_other_sizes_and_in_padded_batches(tiny_onnx):
    model, path = tiny_onnx
    assert model.backbone.window_blocks == (0,)
    meta = onnx_metadata(path)
    assert meta["dinov2od.graph"] == "detector" and meta["topk"] == "20"
    import onnx

    assert onnx.load(path).opset_import[0].version >= 17
    graph = OnnxDetector(path)
    assert_parity(model, graph, [(70, 98)])  # non-square, not the tracing size, batch 1
    assert_parity(model, graph, [(61, 75), (30, 44)])  # padded batch of two sizes
    out, batch, hw = assert_parity(model, graph, [(100, 43), (56, 28), (99, 30)])  # batch 3, other sizes
    # negative control: the graph reads image_sizes; claiming the padding is image changes the result
    wrong = graph(batch, np.full_like(hw, 100))
    assert np.abs(wrong["pred_boxes"][1] - out["pred_boxes"][1]).max() > 1e-2


def test_vit_small_graph_matches_pytorch(tmp_path):
    """The ViT-S/14 architecture (random init, LoRA on query/value) with the default one-stage
    deformable decoder (2 layers). Taps at blocks 2 and 4, so that 4 of the 12 blocks (all alike)
    run: the exporter's time grows with the graph."""
    torch.manual_seed(0)
    model = DINOv2ObjectDetector(num_classes=80, backbone=DINOv2Backbone(arch="small", out_indices=(1, 3)),
                                 num_queries=50, num_decoder_layers=2).eval()
    config = model.backbone.vit.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (384, 6, 12)  # ViT-S
    perturb(model, 0.02)
    graph = OnnxDetector(export_detector(model, str(tmp_path / "vits.onnx"), image_size=(126, 182), topk=30))
    assert_parity(model, graph, [(140, 98)], topk=30)  # non-square, portrait where the export was landscape
    assert_parity(model, graph, [(126, 182), (98, 140)], topk=30)


def test_unexportable_options_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="two_stage_nms=0.5 cannot be exported"):
        export_detector(tiny_detector(two_stage=True, two_stage_nms=0.5), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="opset=16"):
        export_detector(tiny_detector(), str(tmp_path / "x.onnx"), opset=16)
    with pytest.raises(ValueError, match="DINOv2ObjectDetector"):
        check_exportable(torch.nn.Linear(2, 2))
    assert not os.path.exists(tmp_path / "x.onnx")  # refused before anything is written
    with pytest.raises(ValueError, match="not a dinov2od detector graph"):
        import onnx

        onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
            opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "id.onnx"))
        OnnxDetector(str(tmp_path / "id.onnx"))


def test_graph_module_equals_the_plain_api_in_eager_mode(tiny_onnx):
    """DetectorGraph (what is traced) computes what DINOv2ObjectDetector + topk_detections compute."""
    model, _ = tiny_onnx
    images = [torch.rand(3, 61, 75), torch.rand(3, 30, 44)]
    batch, hw = OnnxDetector.batch(images)
    with torch.no_grad():
        logits, boxes, xyxy, scores, labels = DetectorGraph(model, 20)(torch.from_numpy(batch), torch.from_numpy(hw))
        ref = model(images)
    torch.testing.assert_close(logits, ref["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(boxes, ref["pred_boxes"], rtol=0, atol=1e-6)
