"""tools/train_net.py and tools/predict.py end to end on a tiny model and a 16/8-image shapes copy (CPU).

Covers: ``--eval-only`` reproduces the detections of the evaluation at the end of training (lazy
with EMA, yacs, and yacs ``--eval-only --resume``), with a negative control (the non-EMA weights
give other detections); ``predict.py`` on a folder with a corrupt file, through both config
styles, against ``DefaultPredictor``; the non-finite loss stop; a 2-process DDP run (shared with
d2/test_distributed.py) whose ranks end identical and equal to a 1-process run of the same micro-batches;
DDP options reaching DDP.
"""
import importlib
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.configs import TINY, TINY_YACS

YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")


def detections(out_dir):
    with open(os.path.join(out_dir, "inference", "coco_instances_results.json")) as f:
        return json.load(f)


def test_lazy_eval_only_reproduces_the_training_detections_with_ema(tiny_config, train_net, tmp_path):
    out = str(tmp_path / "run")
    common = [*TINY, "train.ema.enabled=True", "train.ema.decay=0.9"]
    train_net.run(tiny_config, *common, f"train.output_dir={out}", "train.max_iter=8", "train.visualize.num_images=2")
    for name in ("model_final.pth", "model_final_ema.pth", "metrics.json", "log.txt"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert len(os.listdir(os.path.join(out, "predictions"))) == 2
    trained = detections(out)
    assert len(trained) == 8 * 10 * 3  # 8 val images x top-k (queries x classes)
    with open(os.path.join(out, "metrics.json")) as f:
        printed = [json.loads(line) for line in f if "bbox/AP" in line][-1]
    assert {"bbox/AP", "bbox/AP50", "bbox/APs", "bbox/AP-circle", "bbox/AP-triangle"} <= set(printed)

    def eval_only(name, *extra):
        train_net.run(tiny_config, *common, *extra, f"train.output_dir={tmp_path / name}",
                      f"train.init_checkpoint={out}/model_final.pth", flags=["--eval-only"])
        return detections(tmp_path / name)

    assert eval_only("eval") == trained
    # negative control: the same checkpoint without its EMA weights detects differently
    assert eval_only("eval_raw", "train.ema.enabled=False") != trained


@pytest.fixture(scope="module")
def yacs_run(tiny_config, train_net, tmp_path_factory):
    """A finished 4-iteration yacs run (EMA on, as in shapes.yaml) and its training detections."""
    out = str(tmp_path_factory.mktemp("yrun"))
    opts = [*TINY_YACS, "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "OUTPUT_DIR", out]
    train_net.run(YAML, *opts)
    return out, opts, detections(out)


def test_yacs_eval_only_reproduces_the_training_detections(yacs_run, train_net, tmp_path):
    out, opts, trained = yacs_run
    assert os.path.isfile(os.path.join(out, "model_final_ema.pth"))
    ev = [*opts[:-2], "OUTPUT_DIR", str(tmp_path / "ev")]
    train_net.run(YAML, *ev, "MODEL.WEIGHTS", f"{out}/model_final.pth", flags=["--eval-only"])
    assert detections(tmp_path / "ev") == trained
    # the exported EMA weights, loaded as plain weights (what DefaultPredictor does), detect the same
    train_net.run(YAML, *ev, "MODEL.WEIGHTS", f"{out}/model_final_ema.pth", "SOLVER.EMA.ENABLED", "False",
                  flags=["--eval-only"])
    assert detections(tmp_path / "ev") == trained
    # negative control: the raw weights of the same checkpoint detect differently
    train_net.run(YAML, *ev, "MODEL.WEIGHTS", f"{out}/model_final.pth", "SOLVER.EMA.ENABLED", "False",
                  flags=["--eval-only"])
    assert detections(tmp_path / "ev") != trained


def test_eval_only_int8_evaluates_a_quantized_copy(yacs_run, train_net, tmp_path):
    """TEST.QUANTIZE int8 (train.eval_quantize): the same evaluation on an int8 copy: other numbers
    (so the copy ran), close scores; a bad value names the key. Its accuracy on a trained model: docs/speed.md."""
    out, opts, trained = yacs_run
    ev = [*opts[:-2], "OUTPUT_DIR", str(tmp_path / "q"), "MODEL.WEIGHTS", f"{out}/model_final.pth"]
    train_net.run(YAML, *ev, "TEST.QUANTIZE", "int8", flags=["--eval-only"])
    quantized = detections(tmp_path / "q")
    assert len(quantized) == len(trained) and quantized != trained
    by_image = lambda dets, i: sorted((d["score"] for d in dets if d["image_id"] == i), reverse=True)  # noqa: E731
    for image_id in {d["image_id"] for d in trained}:
        assert np.abs(np.array(by_image(quantized, image_id)) - np.array(by_image(trained, image_id))).max() < 0.05
    with pytest.raises(ValueError, match="TEST.QUANTIZE = 'int4'"):
        train_net.run(YAML, *ev, "TEST.QUANTIZE", "int4", flags=["--eval-only"])


def test_yacs_eval_only_resume_loads_the_last_checkpoint(yacs_run, train_net, tmp_path):
    out, opts, trained = yacs_run
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    for name in ("model_final.pth", "last_checkpoint"):
        with open(os.path.join(out, name), "rb") as src, open(os.path.join(copy, name), "wb") as dst:
            dst.write(src.read())
    train_net.run(YAML, *opts[:-2], "OUTPUT_DIR", copy, "MODEL.WEIGHTS", "", flags=["--eval-only", "--resume"])
    assert detections(copy) == trained


def test_predict_folder_through_both_config_styles_matches_default_predictor(
    yacs_run, tiny_config, tmp_path, caplog
):
    from detectron2.config import get_cfg
    from detectron2.data import detection_utils as utils
    from detectron2.engine import DefaultPredictor

    from dinov2od.d2 import add_dinov2od_config

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import predict

    out, opts, _ = yacs_run
    weights = os.path.join(out, "model_final_ema.pth")
    folder = tmp_path / "images"
    folder.mkdir()
    val = os.path.join(os.path.dirname(tiny_config), "shapes", "val")
    for name in ("000000.jpg", "000001.jpg"):
        with open(os.path.join(val, name), "rb") as src:
            (folder / name).write_bytes(src.read())
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file either; ignored by extension")

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(YAML)
    cfg.merge_from_list([*opts[:-2], "MODEL.WEIGHTS", weights])
    reference = DefaultPredictor(cfg)

    def expected(path):
        inst = reference(utils.read_image(path, format="BGR"))["instances"]
        return inst.pred_boxes.tensor.numpy(), inst.scores.numpy()

    lazy_args = ["--config-file", tiny_config, "--weights", weights, "--input", str(folder), "--score-threshold", "0"]
    yacs_args = ["--config-file", YAML, "--weights", weights, "--input", str(folder), "--score-threshold", "0"]
    for style, argv in (("lazy", [*lazy_args, "--output", str(tmp_path / "lazy"), *TINY]),
                        ("yacs", [*yacs_args, "--output", str(tmp_path / "yacs"), *opts[:-2]])):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            results = predict.main(argv)
        assert "broken.jpg" in caplog.text, style  # skipped with a warning naming it
        pred_dir = tmp_path / style
        assert sorted(os.listdir(pred_dir)) == [predict.MARKER, predict.LOCK, "000000.jpg.jpg", "000001.jpg.jpg",
                                                "predictions.json", "predictions.jsonl"], style
        with open(pred_dir / "predictions.json") as f:
            assert json.load(f) == results
        for name in ("000000.jpg", "000001.jpg"):
            path = str(folder / name)
            mine = [r for r in results if r["file_name"] == path]
            boxes, scores = expected(path)
            assert len(mine) == len(scores) == 10 * 3, style
            xywh = np.array([r["bbox"] for r in mine])
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            assert np.allclose(xyxy, boxes, atol=1e-3), style
            assert np.allclose([r["score"] for r in mine], scores, atol=1e-6), style
        assert {r["category_id"] for r in results} <= {1, 2, 3}  # the json's own category ids
        assert {r["category_name"] for r in results} <= {"circle", "square", "triangle"}


def test_predict_int8_draws_close_detections(yacs_run, tiny_config, tmp_path):
    """predict.py --int8: the int8 copy's detections on the same files (other numbers, close scores);
    --int8 with --onnx is refused."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import predict

    out, opts, _ = yacs_run
    val = os.path.join(os.path.dirname(tiny_config), "shapes", "val")
    args = ["--config-file", YAML, "--weights", os.path.join(out, "model_final_ema.pth"), "--device", "cpu",
            "--input", os.path.join(val, "000000.jpg"), "--score-threshold", "0"]
    fp32 = predict.main([*args, "--output", str(tmp_path / "fp32"), *opts[:-2]])
    int8 = predict.main([*args, "--int8", "--output", str(tmp_path / "int8"), *opts[:-2]])
    assert len(int8) == len(fp32) and int8 != fp32
    scores = lambda rs: np.sort([r["score"] for r in rs])  # noqa: E731
    assert np.abs(scores(int8) - scores(fp32)).max() < 0.05
    assert os.path.isfile(tmp_path / "int8" / "000000.jpg.jpg")
    with pytest.raises(SystemExit, match="--int8 quantizes the PyTorch model"):
        predict.main(["--config-file", YAML, "--onnx", "model.onnx", "--int8", "--input", val])


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_config, train_net, tmp_path, monkeypatch):
    from dinov2od.modeling import SetCriterion

    calls = {"n": 0}
    forward = SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = forward(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th training step (iteration 3)
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss_giou=nan"):
        train_net.run(tiny_config, *TINY, "train.max_iter=10", "train.checkpointer.period=2", f"train.output_dir={out}")
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000001.pth"
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    ckpt = torch.load(os.path.join(out, "model_0000001.pth"), map_location="cpu")
    assert ckpt["iteration"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_net_leaves_omp_wait_policy_to_the_user(train_net, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    importlib.reload(train_net)
    assert "OMP_WAIT_POLICY" not in os.environ


# ---------------------------------------------------------------------------- DDP
def test_ddp_options_reach_distributed_data_parallel(tmp_path, monkeypatch):
    """``train.ddp`` is passed to Detectron2's ``create_ddp_model`` (fp16 compression included)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from dinov2od.d2.engine.trainer import wrap_model_for_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        monkeypatch.setattr(comm, "get_world_size", lambda: 2)  # wrap although this group has one rank
        model = torch.nn.Linear(3, 2)
        ddp = wrap_model_for_ddp(model, "cpu", broadcast_buffers=False, fp16_compression=True)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.device_ids is None
        assert [h.__name__ for h, _ in ddp._comm_hooks] == ["fp16_compress_hook"]
        plain = wrap_model_for_ddp(torch.nn.Linear(3, 2), "cpu", fp16_compression=False)
        assert plain._comm_hooks == []
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_each_other_and_one_process(launch_job, tiny_config, train_net, tmp_path):
    """Two ranks (Detectron2's launch(), conftest's shared ``launch_job``: 1 image/GPU x 2 GPUs x 2
    accumulation) end bit-identical; a 1-process run of the same micro-batches (2 images x 1 GPU x 2
    accumulation) ends allclose. (The DETR loss is normalized per micro-batch, so the 1-process run
    must cut the 4 images of a step into the same two micro-batches: at 1 image x 4 accumulation or
    4 images x 1 it ends 2e-3 away, far outside the tolerance.)"""
    from tests.helpers.ddp_jobs import JOB_OPTS

    out = launch_job
    with open(os.path.join(out, "log.txt")) as f:
        assert "World size: 2" in f.read()
    r0 = torch.load(os.path.join(out, "rank0.pth"))
    r1 = torch.load(os.path.join(out, "rank1.pth"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    single = str(tmp_path / "single")
    train_net.run(tiny_config, *JOB_OPTS, "train.images_per_gpu=2", f"train.output_dir={single}")
    with open(os.path.join(single, "log.txt")) as f:
        assert "2 images/GPU x 1 GPU x 2 accumulation = 4" in f.read()
    one = torch.load(os.path.join(single, "model_final.pth"), map_location="cpu")["model"]
    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")["model"]
    initial = torch.load(os.path.join(out, "init.pth"))
    assert set(one) == set(r0)
    assert sum(not torch.equal(r0[k], initial[k]) for k in r0) > 10  # it trained: not two untrained models
    for k in r0:
        assert torch.allclose(r0[k], one[k], rtol=1e-4, atol=1e-5), (k, (r0[k] - one[k]).abs().max())
        assert torch.equal(saved[k], r0[k]), k  # rank 0's checkpoint holds the same weights
