"""The train set parsed once per machine and memory-mapped by every rank (dinov2od.d2.data.data_cache).

Small synthetic COCO files (tools/make_coco_like.py, 40 images); every cache lives in tmp_path.
Parses are counted at Detectron2's ``load_coco_json`` (what ``register_coco_instances`` calls).
Negative controls: with the cache off every call parses; a damaged cache is rebuilt, not read.
The two-process test runs two gloo ranks on localhost in a subprocess with a timeout.
"""
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import detectron2.data.datasets.coco as d2coco
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances

from dinov2od.d2.data import data_cache
from dinov2od.d2.data.data_cache import SerializedDatasetDicts, cache_key, cached_dataset_dicts, train_dataset

from tests.helpers import ROOT

TIMEOUT = 150


def _make_coco_like():
    spec = importlib.util.spec_from_file_location("dd_make_coco_like", os.path.join(ROOT, "tools", "make_coco_like.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_coco_like


@pytest.fixture
def coco(tmp_path, request):
    """A registered 40-image COCO-like dataset; yields (name, json path)."""
    folder = tmp_path / "data"
    json_path = _make_coco_like()(str(folder), num_images=40, seed=1)
    name = f"dd_cache_{request.node.name}".replace("[", "_").replace("]", "_")
    register_coco_instances(name, {}, json_path, str(folder / "images"))
    yield name, json_path
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.fixture
def parses(monkeypatch):
    """Counts Detectron2's COCO json parses."""
    calls = []
    real = d2coco.load_coco_json

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(d2coco, "load_coco_json", counted)
    return calls


def test_cached_items_equal_detectron2s_list(coco, tmp_path, parses):
    name, _ = coco
    expected = get_detection_dataset_dicts(name, filter_empty=True)
    got = cached_dataset_dicts(name, filter_empty=True, cache_dir=str(tmp_path / "cache"))
    assert isinstance(got, SerializedDatasetDicts) and len(got) == len(expected) > 0
    assert [got[i] for i in range(len(got))] == expected and list(got) == expected and got[-1] == expected[-1]
    with pytest.raises(IndexError):
        got[len(got)]
    got[0]["annotations"].clear()  # each access is a fresh dict
    assert got[0] == expected[0]
    # filter_empty is part of the key: without it the empty images come back
    unfiltered = cached_dataset_dicts(name, filter_empty=False, cache_dir=str(tmp_path / "cache"))
    assert list(unfiltered) == get_detection_dataset_dicts(name, filter_empty=False) and len(unfiltered) >= len(got)
    # pickles by file name (a spawned worker) and Detectron2's train loader takes it as a dataset
    again = pickle.loads(pickle.dumps(got))
    assert len(pickle.dumps(got)) < 1000 and list(again) == expected
    loader = build_detection_train_loader(got, mapper=lambda d: d["image_id"], total_batch_size=4,
                                          aspect_ratio_grouping=False, num_workers=0)
    batch = next(iter(loader))
    assert len(batch) == 4 and set(batch) <= {d["image_id"] for d in expected}


def test_second_call_does_not_parse_and_the_key_follows_the_json(coco, tmp_path, parses):
    name, json_path = coco
    cache = str(tmp_path / "cache")
    first = list(cached_dataset_dicts(name, cache_dir=cache))
    assert len(parses) == 1
    second = cached_dataset_dicts(name, cache_dir=cache)
    assert len(parses) == 1 and list(second) == first  # read from the cache
    key = cache_key([name], True)
    # a fresh process (metadata without what parsing sets) reading the cache gets the class ids too
    meta = MetadataCatalog.get(name)
    id_map, classes = meta.thing_dataset_id_to_contiguous_id, meta.thing_classes
    assert len(id_map) == 80 and 90 in id_map and 12 not in id_map  # COCO's ids with gaps
    json_file, image_root = meta.json_file, meta.image_root
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    assert list(cached_dataset_dicts(name, cache_dir=cache)) == first and len(parses) == 1
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == id_map
    assert MetadataCatalog.get(name).thing_classes == classes
    # negative control: the cache off parses every time
    train_dataset(name, cache=False)
    train_dataset(name, cache=False)
    assert len(parses) == 3
    # the json changes (one more image, with a box): a new key, parsed again, new content
    _make_coco_like()(os.path.dirname(json_path), num_images=41, seed=1)
    assert cache_key([name], True) != key
    third = cached_dataset_dicts(name, cache_dir=cache)
    assert len(parses) == 4 and list(third) == get_detection_dataset_dicts(name) and list(third) != first
    # the same bytes with another mtime (a rewrite): a new key too
    key41 = cache_key([name], True)
    st = os.stat(json_path)
    os.utime(json_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key([name], True) not in (key, key41)
    assert sorted(os.listdir(cache)) == sorted(f"{k}.{e}" for k in (key, key41) for e in ("bin", "idx"))


@pytest.mark.parametrize("damage", ["truncated_bin", "garbage_idx", "bin_without_idx", "other_key"])
def test_a_damaged_cache_is_rebuilt_not_trusted(coco, tmp_path, parses, damage):
    name, _ = coco
    cache = str(tmp_path / "cache")
    expected = list(cached_dataset_dicts(name, cache_dir=cache))
    key = cache_key([name], True)
    bin_path, idx_path = os.path.join(cache, f"{key}.bin"), os.path.join(cache, f"{key}.idx")
    if damage == "truncated_bin":
        with open(bin_path, "r+b") as f:
            f.truncate(os.path.getsize(bin_path) - 7)
    elif damage == "garbage_idx":
        with open(idx_path, "wb") as f:
            f.write(b"not an index")
    elif damage == "bin_without_idx":  # a writer killed between the two files
        os.remove(idx_path)
    else:  # another dataset's index under this name
        data_cache.write_serialized(expected[:3], bin_path, idx_path, "0" * 40)
    assert len(parses) == 1
    got = cached_dataset_dicts(name, cache_dir=cache)
    assert len(parses) == 2 and list(got) == expected  # parsed again and rewritten
    assert list(cached_dataset_dicts(name, cache_dir=cache)) == expected and len(parses) == 2


WORKER = textwrap.dedent(
    """
    import json, os, sys, pickle
    from detectron2.engine import launch
    out, json_path, cache = sys.argv[1:4]

    def main():
        import detectron2.data.datasets.coco as d2coco
        from detectron2.data.datasets import register_coco_instances
        from detectron2.utils import comm
        from dinov2od.d2.data import data_cache
        parses, writes = [], []
        real_load, real_write = d2coco.load_coco_json, data_cache.write_serialized
        d2coco.load_coco_json = lambda *a, **k: (parses.append(1), real_load(*a, **k))[1]
        data_cache.write_serialized = lambda *a, **k: (writes.append(1), real_write(*a, **k))[1]
        register_coco_instances("dd_two_ranks", {}, json_path, os.path.join(os.path.dirname(json_path), "images"))
        ds = data_cache.cached_dataset_dicts("dd_two_ranks", cache_dir=cache)
        from detectron2.data import MetadataCatalog
        rank = comm.get_rank()
        with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"local_rank": comm.get_local_rank(), "parses": len(parses), "writes": len(writes),
                         "id_map": MetadataCatalog.get("dd_two_ranks").get("thing_dataset_id_to_contiguous_id", None),
                         "type": type(ds).__name__, "items": list(ds)}, f)
        comm.synchronize()

    if __name__ == "__main__":
        launch(main, 2, num_machines=1, machine_rank=0, dist_url="auto")
    """
)


def test_two_ranks_get_the_same_items_and_only_local_rank_0_parses_and_writes(coco, tmp_path):
    name, json_path = coco
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    worker = tmp_path / "worker.py"  # a file: launch() spawns, and the children import main from it
    worker.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(worker), str(out), json_path, str(tmp_path / "cache")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [pickle.load(open(out / f"rank{r}.pkl", "rb")) for r in (0, 1)]
    expected = get_detection_dataset_dicts(name)
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert [(r["parses"], r["writes"]) for r in ranks] == [(1, 1), (0, 0)]
    assert all(r["type"] == "SerializedDatasetDicts" and r["items"] == expected for r in ranks)
    # rank 1 never parsed, yet has the class id map that parsing sets (a model's class_metadata needs it)
    assert ranks[1]["id_map"] == ranks[0]["id_map"] == MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
