"""tools/train_net.py end to end on a tiny model and a 16-image shapes copy (CPU).

Covers: evaluation at the end of training == ``--eval-only`` on the saved checkpoint (lazy
with EMA, and yacs), resume == uninterrupted run, non-finite loss stop with the last
checkpoint intact, and a 2-process DDP (gloo) smoke run through ``launch()``.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.engine import default_argument_parser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_net  # noqa: E402

TINY = [
    "model.detector.backbone.arch_overrides.hidden_size=48",
    "model.detector.backbone.arch_overrides.num_hidden_layers=2",
    "model.detector.backbone.arch_overrides.num_attention_heads=2",
    "model.detector.backbone.arch_overrides.intermediate_size=96",
    "model.detector.hidden_dim=32",
    "model.detector.num_queries=10",
    "model.detector.num_decoder_layers=2",
    "model.detector.dim_feedforward=64",
    "dataloader.train.dataset.names=shapes_tiny_train",
    "dataloader.test.dataset.names=shapes_tiny_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.min_size_train=[112,126]",
    "dataloader.test.mapper.augmentations.min_size_test=112",
    "train.visualize.num_images=2",
    "train.log_period=2",
    "train.eval_period=0",
]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A lazy config file: configs/shapes.py plus a registered 16/8-image shapes copy."""
    root = tmp_path_factory.mktemp("data")
    path = root / "tiny_shapes.py"
    path.write_text(
        "from detectron2.config import LazyConfig\n"
        "from dinov2od.d2 import register_shapes\n"
        f"register_shapes({str(root)!r}, prefix='shapes_tiny', num_images={{'train': 16, 'val': 8}})\n"
        f"_base = LazyConfig.load({os.path.join(ROOT, 'configs/shapes.py')!r})\n"
        "model, dataloader, optimizer, train = _base.model, _base.dataloader, _base.optimizer, _base.train\n"
        "lr_multiplier = _base.lr_multiplier\n"
    )
    return str(path)


def run(config, *opts, flags=()):
    args = default_argument_parser().parse_args(["--config-file", config, *flags, *opts])
    return train_net.main(args)


def last_eval(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return {k[len("bbox/"):]: v for k, v in [r for r in rows if "bbox/AP" in r][-1].items() if k.startswith("bbox/")}


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def test_lazy_train_then_eval_only_reproduces_ap_with_ema(tiny_config, tmp_path):
    out = str(tmp_path / "run")
    common = [*TINY, f"train.output_dir={out}", "train.ema.enabled=True", "train.ema.decay=0.9"]
    run(tiny_config, *common, "train.max_iter=8")
    for name in ("model_final.pth", "metrics.json", "inference/coco_instances_results.json", "log.txt"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert len(os.listdir(os.path.join(out, "predictions"))) == 2
    assert "ema" in torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")
    assert os.path.isfile(os.path.join(out, "model_final_ema.pth"))
    printed = last_eval(out)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-circle", "AP-square", "AP-triangle"} <= set(printed)
    again = run(
        tiny_config, *common, f"train.init_checkpoint={out}/model_final.pth", f"train.output_dir={tmp_path}/eval",
        flags=["--eval-only"],
    )["bbox"]
    assert all(same(again[k], v) for k, v in printed.items()), (printed, again)
    assert os.path.isfile(tmp_path / "eval" / "inference" / "coco_instances_results.json")
    # tools/predict.py on two images and an undecodable file (skipped with a warning)
    import predict

    images = os.path.join(os.path.dirname(tiny_config), "shapes", "val")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    results = predict.main([
        "--config-file", tiny_config, "--weights", f"{out}/model_final.pth",
        "--input", f"{images}/000000.jpg", f"{images}/000001.jpg", str(bad),
        "--output", str(tmp_path / "pred"), "--score-threshold", "0", *TINY,
    ])
    assert sorted(os.listdir(tmp_path / "pred")) == ["000000.jpg", "000001.jpg", "predictions.json"]
    with open(tmp_path / "pred" / "predictions.json") as f:
        saved = json.load(f)
    assert saved == results and len(saved) == 2 * 10 * 3  # top-k = queries x classes per image
    assert {r["category_id"] for r in saved} <= {1, 2, 3}  # the json's own category ids
    assert {r["category_name"] for r in saved} <= {"circle", "square", "triangle"}


def test_yacs_train_then_eval_only_reproduces_ap(tiny_config, tmp_path):
    from detectron2.config import LazyConfig

    LazyConfig.load(tiny_config)  # registers shapes_tiny_* in this process
    yaml = os.path.join(ROOT, "configs/yaml/shapes.yaml")
    opts = [
        "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.hidden_size", "48",
        "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_hidden_layers", "2",
        "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_attention_heads", "2",
        "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.intermediate_size", "96",
        "MODEL.DINOV2OD.HIDDEN_DIM", "32", "MODEL.DINOV2OD.NUM_QUERIES", "10",
        "MODEL.DINOV2OD.DEC_LAYERS", "2", "MODEL.DINOV2OD.DIM_FEEDFORWARD", "64",
        "DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "('shapes_tiny_val',)",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(112,)", "INPUT.MIN_SIZE_TEST", "112",
        "OUTPUT_DIR", str(tmp_path / "yrun"),
    ]
    run(yaml, *opts)
    printed = last_eval(str(tmp_path / "yrun"))
    assert os.path.isfile(tmp_path / "yrun" / "model_final_ema.pth")  # shapes.yaml enables EMA
    again = run(yaml, *opts, "MODEL.WEIGHTS", str(tmp_path / "yrun" / "model_final.pth"), flags=["--eval-only"])
    assert all(same(again["bbox"][k], v) for k, v in printed.items()), (printed, again)


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = [*TINY, "train.max_iter=6", "train.checkpointer.period=3", "train.visualize.num_images=0",
              "train.eval_after_train=False", "model.detector.dropout=0.1"]
    run(tiny_config, *common, f"train.output_dir={full}")
    # an "interrupted" run: only the iteration-3 checkpoint exists, then --resume
    os.makedirs(resumed)
    shutil.copy(os.path.join(full, "model_0000002.pth"), resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    run(tiny_config, *common, f"train.output_dir={resumed}", flags=["--resume"])
    a = torch.load(os.path.join(full, "model_final.pth"), map_location="cpu")
    b = torch.load(os.path.join(resumed, "model_final.pth"), map_location="cpu")
    assert a["iteration"] == b["iteration"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    c = torch.load(os.path.join(full, "model_0000002.pth"), map_location="cpu")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # it did train


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_config, tmp_path, monkeypatch):
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
        run(tiny_config, *TINY, "train.max_iter=10", "train.checkpointer.period=2", f"train.output_dir={out}")
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000001.pth"
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    ckpt = torch.load(os.path.join(out, "model_0000001.pth"), map_location="cpu")
    assert ckpt["iteration"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ddp_two_processes_on_cpu(tiny_config, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", tiny_config, "--num-gpus", "2",
           *TINY, "train.max_iter=3", "dataloader.train.total_batch_size=4", "train.visualize.num_images=0",
           f"train.output_dir={out}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "World size: 2" in log and "batch_size=2" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert "AP50" in proc.stdout + proc.stderr + log
