"""Your data trains on DINOv2 by default: ``configs/custom.py`` / ``configs/yaml/custom.yaml`` are Meta's
DINOv2 ViT-S/14 (``facebook/dinov2-small``, frozen, LoRA), ``configs/custom_tiny.py`` /
``custom_tiny.yaml`` the offline tiny model, and ``tools/train_net.py`` stops at once, before the data,
when the hub id cannot be had (``HF_HUB_OFFLINE=1`` or no answer, and not cached), naming the id, the
config key for a ``save_pretrained`` folder or Meta's ``.pth``, and the offline config.

Nothing here downloads: the ViT-S is transformers' ``Dinov2Model`` of ViT-S/14's shape (384 wide,
12 blocks, 6 heads, patch 14, 37 x 37 position grid) with random weights, written by
``save_pretrained`` (the files ``huggingface-cli download facebook/dinov2-small`` gives) and read by
the real loaders; hub look-ups are replaced by stand-ins or stopped by ``HF_HUB_OFFLINE=1``.

Negative controls (each made by hand, each failed the named tests):
- the ``check_backbone_weights`` call taken out of ``load_config``: the offline command fails on the
  data instead (the dataset folder "does not exist"), the yacs check raises nothing;
- ``cached_hub_folder`` returning None: the cached-id test asks the (stand-in) hub, which fails it;
- custom.py's ``pretrained`` set back to the tiny glyph weights, or custom.yaml's ``NUM_QUERIES: 100``: the
  recipe test fails;
- ``_ask_hub`` waiting for its thread without a limit: the hanging look-up test waits 30 s and gets
  no reason back;
- the local-folder run with ``pretrained=None``: its ViT tensors differ from the saved ones.
"""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg
from omegaconf import OmegaConf

from tests.helpers import ROOT
from dinov2od.d2.config import (WeightsUnavailableError, add_dinov2od_config, check_backbone_weights, load_config,
                                model_arguments)
from dinov2od.modeling.backbones import loading
from tests.helpers.user_data import unique_dataset_name, write_roboflow_dataset

CUSTOM_PY = os.path.join(ROOT, "configs/custom.py")
CUSTOM_YAML = os.path.join(ROOT, "configs/yaml/custom.yaml")
CUSTOM_TINY = os.path.join(ROOT, "configs/custom_tiny.py")
CUSTOM_TINY_YAML = os.path.join(ROOT, "configs/yaml/custom_tiny.yaml")
HUB_ID = "facebook/dinov2-small"
VITS = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, mlp_ratio=4, image_size=518)
PRETRAINED = "model.detector.backbone.pretrained"
DATA_ERROR = r"no_dataset_here"  # what reading dataset.root / DATASETS.ROOT fails on: the folder, named
# one iteration of the recipe on 112-px images (the ViT-S's compute at 224-256 px is in README.md)
SMALL_IMAGES = ["dataloader.train.mapper.augmentations.min_size_train=[112]",
                "dataloader.train.mapper.augmentations.max_size_train=160",
                "dataloader.train.mapper.augmentations.crop_resize=[]",
                "dataloader.test.mapper.augmentations.min_size_test=112",
                "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]


@pytest.fixture(scope="module")
def vits_folder(tmp_path_factory):
    """A ``save_pretrained`` folder of a random-weight DINOv2 ViT-S/14 (seed 0)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vits") / "dinov2-small"
    Dinov2Model(Dinov2Config(**VITS)).eval().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def saved_vits(vits_folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(vits_folder, "model.safetensors"))


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return write_roboflow_dataset(str(tmp_path_factory.mktemp("toys")), num_train=8, num_valid=2)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    return tmp_path


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No offline flag, an empty cache, and a stand-in for the hub's answer (``hub.answer``)."""
    from huggingface_hub import HfApi, constants

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))

    class Hub:
        calls = []
        answer = None  # an exception to raise, a callable to run, or None: "the hub has it"

    def model_info(self, repo_id, timeout=None, **kwargs):
        Hub.calls.append((repo_id, timeout))
        if isinstance(Hub.answer, BaseException):
            raise Hub.answer
        if callable(Hub.answer):
            return Hub.answer()
        return object()

    monkeypatch.setattr(HfApi, "model_info", model_info)
    return Hub


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---------------------------------------------------------------------------- the recipe
def test_custom_configs_are_dinov2_vits_and_the_tiny_ones_keep_the_demo_model():
    lazy = LazyConfig.load(CUSTOM_PY)
    bb = lazy.model.detector.backbone
    assert (bb.family, bb.arch, bb.registers, bb.pretrained) == ("dinov2", "small", False, HUB_ID)
    assert (bb.freeze, bb.lora_rank, tuple(bb.lora_targets), bb.lora_blocks) == (True, 8, ("query", "value"), None)
    assert not bb.arch_overrides and lazy.model.num_classes is None and lazy.train.epochs == 50
    assert lazy.dataset.root is None and lazy.dataloader.train.total_batch_size == 8
    # the yacs file is the same recipe: every model argument, the sizes and the solver
    yacs = get_cfg()
    add_dinov2od_config(yacs)
    yacs.merge_from_file(CUSTOM_YAML)
    for key, value in _leaves(model_arguments(yacs)):
        expected = OmegaConf.select(lazy.model, key)
        expected = None if key == "num_classes" else expected  # yacs 0 = from the data
        value = None if key == "num_classes" else value
        if isinstance(expected, (list, tuple)) or OmegaConf.is_list(expected):
            expected, value = list(expected), list(value)
        assert value == expected or (key.endswith("arch_overrides") and not value and not expected), key
    aug = lazy.dataloader.train.mapper.augmentations
    assert tuple(yacs.INPUT.MIN_SIZE_TRAIN) == tuple(aug.min_size_train)
    assert yacs.INPUT.MAX_SIZE_TRAIN == aug.max_size_train
    assert list(yacs.INPUT.CROP.SIZE_RESIZE) == list(aug.crop_resize) and list(yacs.INPUT.CROP.SIZE) == list(aug.crop_size)
    test_aug = lazy.dataloader.test.mapper.augmentations
    assert (yacs.INPUT.MIN_SIZE_TEST, yacs.INPUT.MAX_SIZE_TEST) == (test_aug.min_size_test, test_aug.max_size_test)
    assert (yacs.SOLVER.BASE_LR, yacs.SOLVER.IMS_PER_BATCH, yacs.SOLVER.MAX_EPOCHS) == (lazy.optimizer.lr, 8, 50)
    assert (yacs.SOLVER.EMA.DECAY, yacs.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) == (lazy.train.ema.decay,
                                                                           lazy.train.clip_grad.max_norm)
    assert yacs.MODEL.DEVICE == lazy.train.device == "cpu"
    # the offline configs: the demo's model on the project's own weights, as configs/custom.py was
    tiny = LazyConfig.load(CUSTOM_TINY)
    shapes = LazyConfig.load(os.path.join(ROOT, "configs/shapes.py"))
    assert OmegaConf.to_container(tiny.model.detector) == OmegaConf.to_container(shapes.model.detector)
    assert tiny.model.detector.backbone.pretrained == "weights/dinov2od_tiny_glyphs.pth"
    assert tiny.model.num_classes is None and tiny.train.epochs == 50
    assert OmegaConf.to_container(tiny.dataset) == OmegaConf.to_container(lazy.dataset)
    tiny_yacs = get_cfg()
    add_dinov2od_config(tiny_yacs)
    tiny_yacs.merge_from_file(CUSTOM_TINY_YAML)
    assert tiny_yacs.MODEL.DINOV2OD.BACKBONE.PRETRAINED == "weights/dinov2od_tiny_glyphs.pth"
    assert (tiny_yacs.MODEL.DINOV2OD.NUM_CLASSES, tiny_yacs.SOLVER.MAX_EPOCHS) == (0, 50)


# ---------------------------------------------------------------------------- a local ViT-S folder
def test_custom_py_loads_a_local_vits_folder_and_trains_an_iteration(vits_folder, saved_vits, toys, train_net,
                                                                     tmp_path, monkeypatch):
    """`train_net.py --config-file configs/custom.py model.detector.backbone.pretrained=<folder>`: no hub
    look-up, the folder's weights in the model, one training iteration, a checkpoint."""
    def no_hub(*args, **kwargs):
        raise AssertionError("a local folder needs no hub look-up")

    monkeypatch.setattr(loading, "_ask_hub", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing else may try either
    out = tmp_path / "out"
    train_net.run(CUSTOM_PY, f"dataset.root={toys}", f"dataset.name={unique_dataset_name('vits')}", f"{PRETRAINED}={vits_folder}",
                  "train.max_iter=1", "train.eval_after_train=False", "train.visualize.num_images=0",
                  f"train.output_dir={out}", *SMALL_IMAGES)
    sd = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    vit = {k[len("detector.backbone.vit."):].replace(".base_layer", ""): v for k, v in sd.items()
           if k.startswith("detector.backbone.vit.") and "lora_" not in k}
    assert sum(k.endswith("attention.attention.query.weight") for k in vit) == 12  # ViT-S's 12 blocks ...
    assert vit["embeddings.cls_token"].shape[-1] == 384  # ... 384 wide
    for name in ("embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
                 "encoder.layer.0.attention.attention.query.weight", "encoder.layer.11.mlp.fc2.weight",
                 "layernorm.weight"):
        assert torch.equal(vit[name], saved_vits[name]), name  # the folder's weights, frozen through the step
    assert any("lora_B" in k and sd[k].abs().sum() > 0 for k in sd)  # LoRA trained (B starts at zero)
    from dinov2od.modeling.classes import decode_class_metadata

    assert decode_class_metadata(sd["detector.class_metadata"]) == (["apple", "brick", "kite"], [1, 5, 9])


# ---------------------------------------------------------------------------- offline
def _hf_env(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"))
    return env


def test_offline_default_command_stops_before_the_data_naming_the_ways_on(tmp_path):
    """The documented command, offline with nothing cached, on a folder that holds no dataset: the
    message is ours and comes before the data would have failed; nothing is written."""
    out = tmp_path / "out"
    started = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", CUSTOM_PY,
         f"dataset.root={tmp_path / 'no_dataset_here'}", f"train.output_dir={out}"],
        cwd=str(tmp_path), env=_hf_env(tmp_path), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()
    message = "\n".join(last[next(i for i, line in enumerate(last) if "WeightsUnavailableError:" in line):])
    assert message.startswith(f"dinov2od.d2.config.WeightsUnavailableError: The backbone's weights '{HUB_ID}' "
                              f"({PRETRAINED} in {CUSTOM_PY}) cannot be loaded here: HF_HUB_OFFLINE=1 is set and "
                              f"'{HUB_ID}' is not in the Hugging Face cache"), message
    assert f"huggingface-cli download {HUB_ID} --local-dir dinov2-small" in message
    assert "save_pretrained" in message and f"{PRETRAINED}=/path/to/dinov2-small" in message
    assert f"{PRETRAINED}=/path/to/dinov2_vits14_pretrain.pth" in message
    assert "--config-file configs/custom_tiny.py" in message
    assert "no_dataset_here' does not exist" not in text and "site-packages/transformers" not in text
    assert not out.exists()
    assert time.time() - started < 120


def test_offline_checks_in_both_styles_and_the_tiny_configs_need_no_hub(offline, vits_folder, monkeypatch):
    missing = str(offline / "no_dataset_here")
    with pytest.raises(WeightsUnavailableError) as err:
        load_config(CUSTOM_YAML, ["DATASETS.ROOT", missing], check_weights=True)
    msg = str(err.value)
    assert f"'{HUB_ID}' (MODEL.DINOV2OD.BACKBONE.PRETRAINED in {CUSTOM_YAML})" in msg
    assert "MODEL.DINOV2OD.BACKBONE.PRETRAINED /path/to/dinov2-small" in msg
    assert "--config-file configs/yaml/custom_tiny.yaml" in msg and "HF_HUB_OFFLINE=1 is set" in msg
    # negative controls: each reaches the data (a missing folder) instead
    with pytest.raises(FileNotFoundError, match=DATA_ERROR):  # a local folder: no hub needed
        load_config(CUSTOM_YAML, ["DATASETS.ROOT", missing, "MODEL.DINOV2OD.BACKBONE.PRETRAINED", vits_folder],
                    check_weights=True)
    for path, opts in ((CUSTOM_TINY, [f"dataset.root={missing}"]), (CUSTOM_TINY_YAML, ["DATASETS.ROOT", missing])):
        with pytest.raises(FileNotFoundError, match=DATA_ERROR):  # the offline configs
            load_config(path, opts, check_weights=True)
    with pytest.raises(FileNotFoundError, match=DATA_ERROR):  # the check is asked for (train_net)
        load_config(CUSTOM_PY, [f"dataset.root={missing}"])
    # TRANSFORMERS_OFFLINE=1 counts too
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(loading, "_ask_hub", lambda *a: pytest.fail("offline: the hub must not be asked"))
    assert loading.hub_weights_problem(HUB_ID).startswith("TRANSFORMERS_OFFLINE=1 is set")


def test_hub_lookup_when_not_flagged_offline(online):
    cfg = LazyConfig.load(CUSTOM_PY)
    import requests

    online.answer = requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'")
    with pytest.raises(WeightsUnavailableError, match=r"the Hugging Face hub did not answer \(ConnectionError: "
                                                      r"Failed to resolve 'huggingface.co'\), and 'facebook/dinov2-small' "
                                                      r"is not in the Hugging Face cache"):
        check_backbone_weights(cfg, "configs/custom.py")
    assert online.calls == [(HUB_ID, loading.HUB_PROBE_TIMEOUT)]
    from huggingface_hub.errors import RepositoryNotFoundError

    online.answer = RepositoryNotFoundError("404 Client Error: Repository Not Found")
    assert "has no model 'facebook/dinov2-small'" in loading.hub_weights_problem(HUB_ID)
    online.answer = None  # the hub has it: the loader will download it, nothing is refused
    check_backbone_weights(cfg, "configs/custom.py")
    assert loading.hub_weights_problem(HUB_ID) is None
    # a look-up that hangs (a DNS query that never returns) is given up after the timeout
    release = threading.Event()
    online.answer = lambda: release.wait(30)
    started = time.time()
    try:
        from huggingface_hub import constants

        assert loading.hub_weights_problem(HUB_ID, timeout=0.2) == (
            f"the Hugging Face hub did not answer within 0.2 s, and '{HUB_ID}' is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})")
        assert time.time() - started < 2.0
    finally:
        release.set()


def test_a_cached_hub_id_loads_without_asking_the_hub(online, vits_folder, saved_vits, monkeypatch, tmp_path):
    """The hub id read from the Hugging Face cache (as a first online run leaves it): no look-up, and
    the loader reads it offline."""
    from huggingface_hub import constants

    from dinov2od.modeling import build_backbone

    cache = tmp_path / "hf_cache"
    repo = cache / "models--facebook--dinov2-small"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(vits_folder, name), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    online.answer = AssertionError("a cached id needs no hub look-up")
    assert loading.hub_weights_problem(HUB_ID) is None and online.calls == []
    assert loading.cached_hub_folder(HUB_ID) == str(snapshot)
    check_backbone_weights(LazyConfig.load(CUSTOM_PY))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the loader reads the cache, never the hub
    backbone = build_backbone(family="dinov2", arch="small", pretrained=HUB_ID, lora_rank=0)  # the loader's own path
    assert torch.equal(backbone.vit.embeddings.patch_embeddings.projection.weight,
                       saved_vits["embeddings.patch_embeddings.projection.weight"])
    # a snapshot without weights is not "cached"
    os.remove(snapshot / "model.safetensors")
    assert loading.cached_hub_folder(HUB_ID) is None


def test_what_counts_as_a_hub_id(tmp_path):
    (tmp_path / "folder").mkdir()
    for local in (None, "", "None", "null", str(tmp_path / "folder"), "missing/dinov2_vits14_pretrain.pth",
                  "./dinov2-small", "/abs/dinov2-small", "~/dinov2-small", "weights/dinov2od_tiny_glyphs.pth"):
        assert loading.hub_id(local) is None, local
    for repo in (HUB_ID, "facebook/dinov3-vits16-pretrain-lvd1689m", "me/my-dinov2"):
        assert loading.hub_id(repo) == repo
