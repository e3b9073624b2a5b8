"""tools/predict.py with lazy configs, on a real 2-iteration lazy run of the tiny model: the run's
saved ``config.yaml`` predicts as the config it was made from, with the training data's ids and
names from the checkpoint (the config's datasets need not be registered), and ``configs/custom_tiny.py``
(``model.num_classes=None``: from the data) takes the class count from the checkpoint."""
import json
import logging
import os
import shutil
import sys

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.configs import TINY

sys.path.insert(0, os.path.join(ROOT, "tools"))


@pytest.fixture(scope="module")
def lazy_run(tiny_config, train_net, tmp_path_factory):
    """A finished 2-iteration lazy run (EMA on) and a folder of two of its validation images."""
    root = tmp_path_factory.mktemp("lazy_predict")
    out = str(root / "run")
    train_net.run(tiny_config, *TINY, f"train.output_dir={out}", "train.max_iter=2", "train.eval_after_train=False",
                  "train.ema.enabled=True", "train.ema.decay=0.5", "train.checkpointer.period=100")
    images = root / "images"
    images.mkdir()
    from detectron2.data import DatasetCatalog

    for d in DatasetCatalog.get("shapes_tiny_val")[:2]:  # generates the split's images
        shutil.copy(d["file_name"], images / os.path.basename(d["file_name"]))
    return out, str(images)


def _predict(config, weights, images, output, *opts):
    import predict

    return predict.main(["--config-file", config, "--weights", weights, "--input", images, "--output", output,
                         "--score-threshold", "0", *opts])


def test_a_lazy_runs_saved_config_yaml_predicts_as_its_source_config(lazy_run, tiny_config, tmp_path):
    from detectron2.data import MetadataCatalog

    out, images = lazy_run
    saved = os.path.join(out, "config.yaml")
    weights = os.path.join(out, "model_final.pth")
    assert os.path.isfile(saved)
    from_yaml = _predict(saved, weights, images, str(tmp_path / "yaml"),
                         "dataloader.test.dataset.names=not_registered_anywhere")  # the data is not needed
    from_py = _predict(tiny_config, weights, images, str(tmp_path / "py"), *TINY)
    assert len(from_yaml) == 2 * 10 * 3 and from_yaml == from_py
    with open(MetadataCatalog.get("shapes_tiny_train").json_file) as f:
        cats = {c["id"]: c["name"] for c in json.load(f)["categories"]}
    assert {(r["category_id"], r["category_name"]) for r in from_yaml} == set(cats.items())
    # the EMA weights of the training checkpoint, as exported beside it
    ema = _predict(saved, os.path.join(out, "model_final_ema.pth"), images, str(tmp_path / "ema"))
    assert ema == from_yaml
    # negative control: the raw (non-EMA) weights of the same checkpoint predict otherwise
    raw = torch.load(weights, map_location="cpu", weights_only=False)
    torch.save({"model": raw["model"]}, tmp_path / "raw.pth")
    assert _predict(saved, str(tmp_path / "raw.pth"), images, str(tmp_path / "raw")) != from_yaml


def test_lazy_config_leaving_num_classes_to_the_data_takes_it_from_the_checkpoint(lazy_run, tmp_path, caplog):
    out, images = lazy_run
    weights = os.path.join(out, "model_final_ema.pth")
    custom = os.path.join(ROOT, "configs/custom_tiny.py")  # the tiny model that TINY shrinks
    reference = _predict(os.path.join(out, "config.yaml"), weights, images, str(tmp_path / "ref"))
    with caplog.at_level(logging.INFO):
        results = _predict(custom, weights, images, str(tmp_path / "custom"), *TINY)
    assert "model.num_classes=3 from" in caplog.text
    assert results == reference
    # negative control: weights saved before models stored their classes cannot give the count
    sd = torch.load(weights, map_location="cpu", weights_only=False)
    sd["model"]["detector.class_metadata"] = torch.zeros_like(torch.as_tensor(sd["model"]["detector.class_metadata"]))
    torch.save(sd, tmp_path / "old.pth")
    with pytest.raises(SystemExit, match="holds no class names.*model.num_classes="):
        _predict(custom, str(tmp_path / "old.pth"), images, str(tmp_path / "old"), *TINY)
    assert len(_predict(custom, str(tmp_path / "old.pth"), images, str(tmp_path / "old3"), *TINY,
                        "model.num_classes=3")) == len(reference)


def test_a_hub_backbone_that_is_not_cached_is_not_needed_to_predict(lazy_run, tmp_path, caplog):
    """A DINOv2 run's config names its backbone by hub id (configs/custom.py: facebook/dinov2-small);
    predicting with its checkpoint offline (conftest sets HF_HUB_OFFLINE=1, and the id is not cached)
    builds the backbone without those weights, since the checkpoint holds every backbone tensor, and
    predicts as with the local weights. Negative control: without ``_backbone_from_weights`` the
    backbone's hub load fails offline (an error naming facebook/dinov2-small)."""
    out, images = lazy_run
    saved, weights = os.path.join(out, "config.yaml"), os.path.join(out, "model_final_ema.pth")
    local = _predict(saved, weights, images, str(tmp_path / "local"))
    with caplog.at_level(logging.INFO, logger="dinov2od"):
        hub = _predict(saved, weights, images, str(tmp_path / "hub"),
                       "model.detector.backbone.pretrained=facebook/dinov2-small")
    assert hub == local and len(hub) > 0
    assert any("'facebook/dinov2-small' are not in the Hugging Face cache and not needed" in r.getMessage()
               for r in caplog.records)
