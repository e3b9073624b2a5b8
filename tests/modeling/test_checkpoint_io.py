"""Weights files are data, never code: :mod:`dinov2od.modeling.checkpoint_io` (no Detectron2).

A malicious checkpoint (real tensors, plus an object whose ``__reduce__`` runs ``exec`` to write a
marker file) must be refused by every reader, with a message naming the file, what the unpickler
refused and the opt-in; the marker must never appear. Negative control: a plain
``torch.load(weights_only=False)`` in another process does write the marker, so the payload is real.
The opt-in by name does unpickle it (and the payload runs). The safetensors export round-trips
predictions exactly. The Detectron2 entry points: tests/d2/test_checkpoint_trust.py.
"""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from dinov2od.modeling import DINOv2ObjectDetector
from dinov2od.modeling.checkpoint_io import (
    TRUSTED_ENV,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    export_for_inference,
    load_state,
    not_weights_only,
    plain_state,
)

from tests.helpers.checkpoints import assert_refused, write_malicious

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_detector(**kw):
    torch.manual_seed(0)
    model = DINOv2ObjectDetector(
        num_classes=3, backbone=dict(arch="tiny", arch_overrides=TINY_VIT, num_taps=2, lora_rank=4,
                                     pretrained=None),
        hidden_dim=32, num_queries=12, num_decoder_layers=2, num_heads=4, num_points=2, dim_feedforward=64, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.set_classes(["ring", "box", "wedge"], [7, 11, 42])
    return model.eval()


@pytest.fixture
def evil(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    marker = tmp_path / "marker"
    return write_malicious(tmp_path / "evil.pth", marker), str(marker)


def test_the_payload_is_real_full_unpickling_runs_it(evil):
    """Negative control for every refusal below: torch.load(weights_only=False) runs the payload."""
    path, marker = evil
    code = f"import torch; torch.load({path!r}, map_location='cpu', weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert open(marker).read() == "payload ran"


def test_load_state_refuses_a_pickle_that_runs_code(evil, tmp_path):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state(path)
    assert_refused(e, path, marker)
    assert e.value.path == path and "exec" in e.value.reason
    pkl = write_malicious(tmp_path / "evil.pkl", marker, {"model": {"w": [1.0]}})  # Detectron2's .pkl: the same rule
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state(pkl)
    assert_refused(e, pkl, marker)
    with open(tmp_path / "plain.pkl", "wb") as f:  # a .pkl of plain data needs no opt-in
        pickle.dump({"model": {"w": [1.0, 2.0]}, "__author__": "me"}, f)
    assert load_state(str(tmp_path / "plain.pkl"))["model"]["w"] == [1.0, 2.0]


def test_the_plain_api_refuses_it(evil):
    path, marker = evil
    model = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        model.load_checkpoint(path)
    assert isinstance(e.value, UnsafeCheckpointError)
    assert_refused(e, path, marker)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_opt_in_by_name_unpickles_it_in_full(evil, tmp_path, monkeypatch, caplog):
    path, marker = evil
    other = write_malicious(tmp_path / "other.pth", marker)
    spelled = os.path.join(str(tmp_path), "sub", "..", "evil.pth")  # compared after resolving
    os.makedirs(tmp_path / "sub")
    monkeypatch.setenv(TRUSTED_ENV, os.pathsep.join([str(tmp_path / "unrelated.pth"), spelled]))
    with pytest.raises(UnsafeCheckpointError):  # only the file named is trusted
        load_state(other)
    assert not os.path.exists(marker)
    with caplog.at_level("WARNING", logger="dinov2od"):
        obj = load_state(path)
    assert torch.equal(obj["model"]["w"], torch.ones(3))
    assert open(marker).read() == "payload ran"  # the opt-in really unpickles
    assert any("in full" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    os.remove(marker)
    monkeypatch.delenv(TRUSTED_ENV)
    load_state(other, trusted=True)  # the Python API's opt-in
    assert os.path.exists(marker)


def test_corrupt_files_are_unreadable_not_unsafe(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name in ("half.pth", "junk.safetensors"):
        with pytest.raises(UnreadableCheckpointError, match="truncated or corrupt"):
            load_state(str(tmp_path / name))


def test_plain_state_makes_config_containers_weights_only_loadable(tmp_path):
    np = pytest.importorskip("numpy")
    state = {"betas": _Seq([0.9, 0.999]), "lr": np.float64(0.1), "t": torch.ones(2), "s": torch.Size([2])}
    assert not_weights_only(state)  # negative control: the sequence type is not plain data
    plain = plain_state(state)
    assert plain["betas"] == [0.9, 0.999] and type(plain["lr"]) is float and plain["t"] is state["t"]
    assert not_weights_only(plain) == []
    torch.save(plain, tmp_path / "p.pth")
    assert torch.load(tmp_path / "p.pth", weights_only=True)["betas"] == [0.9, 0.999]


class _Seq(list):
    """Stands for omegaconf's ListConfig (a sequence type of its own)."""

    __module__ = "omegaconf.listconfig"


def test_safetensors_export_round_trip_gives_identical_predictions(tmp_path):
    model = tiny_detector()
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    st, js = export_for_inference(model, str(tmp_path / "m.safetensors"))
    info = json.load(open(js))
    assert info["class_names"] == ["ring", "box", "wedge"] and info["category_ids"] == [7, 11, 42]
    assert info["detector_kwargs"]["backbone"]["arch"] == "tiny" and info["detector_kwargs"]["num_queries"] == 12
    assert info["detector_kwargs_note"].startswith("checked")
    images = [torch.rand(3, 61, 75, generator=torch.Generator().manual_seed(1)), torch.rand(3, 40, 52)]
    expected = model.predict(images)
    rebuilt = DINOv2ObjectDetector.from_exported(st)  # constructor arguments from the JSON
    loaded = tiny_detector()
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    loaded.load_checkpoint(st)
    for other in (rebuilt, loaded, DINOv2ObjectDetector(**info["detector_kwargs"]).load_checkpoint(
            str(tmp_path / "plain.pth")).eval()):
        for a, b in zip(expected, other.predict(images)):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
            assert a["names"] == b["names"] and torch.equal(a["category_ids"], b["category_ids"])
    os.remove(js)  # the file's header carries the same JSON
    assert DINOv2ObjectDetector.from_exported(st).num_queries == 12


def test_a_detector_built_from_modules_has_no_constructor_arguments(tmp_path):
    from dinov2od.modeling import DINOv2Backbone

    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY_VIT, num_taps=2, lora_rank=0)
    model = DINOv2ObjectDetector(num_classes=2, backbone=backbone, hidden_dim=32, num_queries=4,
                                 num_decoder_layers=1, num_heads=4, num_points=2, dim_feedforward=32)
    assert model.constructor_args is None
    st, js = export_for_inference(model, str(tmp_path / "m.safetensors"))
    assert json.load(open(js))["detector_kwargs"] is None
    with pytest.raises(ValueError, match="carries no detector constructor arguments"):
        DINOv2ObjectDetector.from_exported(st)
