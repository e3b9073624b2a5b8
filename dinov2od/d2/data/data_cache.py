"""Parse a training set's annotations once per machine and share them, memory-mapped, with every rank.

Without it each rank (``launch()``, torchrun, srun) calls Detectron2's
``get_detection_dataset_dicts`` itself: on COCO train that is ~15 s of JSON parsing, ~30 s of
building and ~4.4 GiB of peak memory per rank before the first batch, and Detectron2 then pickles
the list once more per rank (``DatasetFromList``). :func:`cached_dataset_dicts` instead:

1. computes a key from the datasets (names, ``json_file`` and ``image_root`` of their metadata,
   the size, mtime and SHA-1 of the first and last MiB of each json file), ``filter_empty`` and the
   dinov2od and Detectron2 versions (:func:`cache_key`). Hashing the ends, not the whole file,
   keeps a restart fast (COCO's 450 MB json would take ~1 s per rank); an edit that keeps the
   size, the mtime and both ends of the file is not seen, so delete the cache after one;
2. on the machine's local rank 0 only: when ``<cache_dir>/<key>.bin`` / ``.idx`` are missing or
   fail their checks, calls ``get_detection_dataset_dicts`` and writes the items the way
   Detectron2's ``NumpySerializedList`` keeps them (each dict pickled, concatenated in one uint8
   buffer; int64 end offsets), each file written atomically (``.bin`` first, then ``.idx``, which
   names the ``.bin``'s size and so commits it); the ``.idx`` also keeps the metadata fields that
   parsing set (``load_coco_json``'s ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``),
   which every rank that reads the cache sets where its metadata lacks them;
3. every rank waits on a barrier, then opens the files as :class:`SerializedDatasetDicts`, a
   read-only sequence backed by ``np.memmap``: the pages live once in the OS page cache, shared by
   the ranks of a machine and their dataloader workers. ``build_detection_train_loader`` takes it
   as a map-style dataset without copying or serializing it again.

Cache folder: ``cache_dir``, else ``$DINOV2OD_CACHE/datasets``, else ``~/.cache/dinov2od/datasets``.
Off switch: lazy ``dataloader.train.dataset.cache=False``, yacs ``DATALOADER.CACHE_DATASET False``.
A dataset without a ``json_file`` in its metadata (or whose file does not exist) is not cached:
every rank parses it, as Detectron2 does. After changing a dataset's registration code (not its
json), delete the cache folder: the key does not see code.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset

import detectron2
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.utils import comm

import dinov2od
from dinov2od.modeling.checkpoint_io import atomic_write

__all__ = ["SerializedDatasetDicts", "cache_key", "cached_dataset_dicts", "default_cache_dir", "train_dataset"]

logger = logging.getLogger(__name__)

_MAGIC = b"D2ODIDX1"
_FORMAT = 1
_END_BYTES = 1 << 20  # bytes hashed at each end of a json file


def default_cache_dir() -> str:
    """``$DINOV2OD_CACHE/datasets``, else ``~/.cache/dinov2od/datasets``."""
    root = os.environ.get("DINOV2OD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dinov2od")
    return os.path.join(root, "datasets")


def _file_fingerprint(path: str) -> dict:
    st = os.stat(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(_END_BYTES))
        if st.st_size > _END_BYTES:
            f.seek(max(_END_BYTES, st.st_size - _END_BYTES))
            h.update(f.read(_END_BYTES))
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1_ends": h.hexdigest()}


def cache_key(names: Sequence[str], filter_empty: bool) -> Optional[str]:
    """The cache key of these datasets, or None when one of them has no existing ``json_file``."""
    parts = []
    for name in names:
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file", None)
        if not json_file or not os.path.isfile(json_file):
            return None
        parts.append({"name": name, "json": _file_fingerprint(json_file), "image_root": meta.get("image_root", None)})
    desc = {
        "format": _FORMAT,
        "datasets": parts,
        "filter_empty": bool(filter_empty),
        "dinov2od": dinov2od.__version__,
        "detectron2": detectron2.__version__,
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()


class SerializedDatasetDicts(Dataset):
    """Dataset dicts read from a ``.bin`` / ``.idx`` pair written by :func:`write_serialized`.

    A read-only sequence (``len``, indexing, iteration) whose items are unpickled on access from an
    ``np.memmap`` of the ``.bin``: every access returns a fresh dict, so a mapper may change it.
    Pickling it (a spawned dataloader worker) sends the file names only; the worker maps them again.
    """

    def __init__(self, bin_path: str, idx_path: str):
        self.bin_path, self.idx_path = bin_path, idx_path
        header, addr = _read_index(idx_path)
        size = os.path.getsize(bin_path)
        if size != header["nbytes"] or len(addr) != header["count"] or (len(addr) and addr[-1] != size):
            raise ValueError(f"{bin_path}: {size} bytes, the index {idx_path} expects {header['nbytes']}")
        self.key = header["key"]
        self.metadata = pickle.loads(base64.b64decode(header["metadata"])) if header.get("metadata") else {}
        self._addr = addr
        self._buf = np.memmap(bin_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, idx: int) -> dict:
        n = len(self._addr)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} dataset dicts")
        start = 0 if idx == 0 else int(self._addr[idx - 1])
        return pickle.loads(memoryview(self._buf[start : int(self._addr[idx])]))

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        return {"bin_path": self.bin_path, "idx_path": self.idx_path}

    def __setstate__(self, state):
        self.__init__(state["bin_path"], state["idx_path"])

    def __repr__(self) -> str:
        return f"SerializedDatasetDicts({len(self)} items, {self.bin_path})"


def _read_index(idx_path: str):
    with open(idx_path, "rb") as f:
        data = f.read()
    if data[:8] != _MAGIC:
        raise ValueError(f"{idx_path} is not a dinov2od dataset index")
    hlen = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + hlen].decode())
    addr = np.frombuffer(data, dtype=np.int64, offset=16 + hlen)
    if header.get("format") != _FORMAT or len(addr) != header["count"]:
        raise ValueError(f"{idx_path}: format {header.get('format')}, {len(addr)} of {header['count']} offsets")
    if len(addr) and (np.any(np.diff(addr) <= 0) or addr[0] <= 0):
        raise ValueError(f"{idx_path}: offsets not increasing")
    return header, addr


def write_serialized(items: Sequence[dict], bin_path: str, idx_path: str, key: str, metadata: Optional[dict] = None) -> None:
    """Pickle each item, concatenated into ``bin_path`` (atomically), then the int64 end offsets
    and a header naming the ``.bin``'s size into ``idx_path`` (atomically; it commits the pair).
    ``metadata``: {dataset name: {field: value}} that parsing set (restored by :func:`_apply_metadata`)."""
    os.makedirs(os.path.dirname(os.path.abspath(bin_path)), exist_ok=True)
    addr = np.empty(len(items), dtype=np.int64)
    end = 0
    with atomic_write(bin_path, "wb") as f:
        for i, item in enumerate(items):
            b = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            f.write(b)
            end += len(b)
            addr[i] = end
    meta = base64.b64encode(pickle.dumps(metadata or {}, protocol=pickle.HIGHEST_PROTOCOL)).decode()
    header = json.dumps({"format": _FORMAT, "key": key, "count": len(items), "nbytes": end, "metadata": meta}).encode()
    with atomic_write(idx_path, "wb") as f:
        f.write(_MAGIC + len(header).to_bytes(8, "little") + header + addr.tobytes())


def _open_valid(bin_path: str, idx_path: str, key: str) -> Optional[SerializedDatasetDicts]:
    """The cache if both files exist, agree and hold ``key`` (the first and last items unpickle),
    else None (logged when present but broken)."""
    if not (os.path.exists(bin_path) and os.path.exists(idx_path)):
        return None
    try:
        ds = SerializedDatasetDicts(bin_path, idx_path)
        if ds.key != key:
            raise ValueError(f"key {ds.key} != {key}")
        if len(ds):
            ds[0], ds[len(ds) - 1]
        return ds
    except Exception as e:  # noqa: BLE001 -- any damage means: rebuild, never trust
        logger.warning(f"Dataset cache {bin_path} is damaged ({type(e).__name__}: {e}); rebuilding it")
        return None


def _parse(names: List[str], filter_empty: bool):
    """Detectron2's list, and the metadata fields parsing set (``load_coco_json`` sets
    ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``): a rank that reads the cache
    instead gets them from it."""
    before = {n: dict(MetadataCatalog.get(n).as_dict()) for n in names}
    dicts = get_detection_dataset_dicts(names, filter_empty=filter_empty)
    added = {}
    for n in names:
        after = MetadataCatalog.get(n).as_dict()
        added[n] = {k: v for k, v in after.items() if k != "name" and (k not in before[n] or before[n][k] != v)}
    return dicts, added


def _apply_metadata(metadata: dict) -> None:
    """Set the fields parsing would have set, where the metadata lacks them."""
    for name, fields in metadata.items():
        meta = MetadataCatalog.get(name)
        missing = {k: v for k, v in fields.items() if meta.get(k, None) is None}
        if missing:
            meta.set(**missing)


def _local_rank() -> int:
    try:
        return comm.get_local_rank()
    except AssertionError:  # a process group without Detectron2's local group
        return int(os.environ.get("LOCAL_RANK", comm.get_rank()))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        comm.synchronize()


def cached_dataset_dicts(
    names: Union[str, Sequence[str]],
    filter_empty: bool = True,
    cache_dir: Optional[str] = None,
) -> Union[SerializedDatasetDicts, List[dict]]:
    """``get_detection_dataset_dicts(names, filter_empty)`` parsed once per machine, memory-mapped.

    Every rank of a job must call it (it holds a barrier). Returns a :class:`SerializedDatasetDicts`
    equal to Detectron2's list item by item, or Detectron2's list itself when the datasets cannot be
    keyed (no ``json_file``). See the module docstring for the key and the files.
    """
    names = [names] if isinstance(names, str) else list(names)
    cache_dir = cache_dir or default_cache_dir()
    writer = _local_rank() == 0
    ds = None
    if writer:
        key = cache_key(names, filter_empty)
        if key is None:  # e.g. a generated dataset whose json does not exist yet: parse, then key
            dicts, added = _parse(names, filter_empty)
            key = cache_key(names, filter_empty)
            if key is not None:
                bin_path, idx_path = _paths(cache_dir, key)
                write_serialized(dicts, bin_path, idx_path, key, added)
                logger.info(f"Cached {len(dicts)} dataset dicts of {names} in {bin_path}")
            del dicts
        else:
            bin_path, idx_path = _paths(cache_dir, key)
            ds = _open_valid(bin_path, idx_path, key)
            if ds is None:
                dicts, added = _parse(names, filter_empty)
                write_serialized(dicts, bin_path, idx_path, key, added)
                logger.info(f"Cached {len(dicts)} dataset dicts of {names} in {bin_path}")
                del dicts
            else:
                logger.info(f"Dataset dicts of {names}: {len(ds)} items from the cache {bin_path}")
    _barrier()
    if ds is None:
        key = cache_key(names, filter_empty)
        if key is not None:
            ds = _open_valid(*_paths(cache_dir, key), key)
    if ds is None:
        logger.warning(f"No dataset cache for {names} (in {cache_dir}); parsing them in this process")
        return get_detection_dataset_dicts(names, filter_empty=filter_empty)
    _apply_metadata(ds.metadata)
    return ds


def _paths(cache_dir: str, key: str):
    return os.path.join(cache_dir, f"{key}.bin"), os.path.join(cache_dir, f"{key}.idx")


def train_dataset(names, filter_empty: bool = True, cache: bool = True, cache_dir: Optional[str] = None):
    """The lazy configs' ``dataloader.train.dataset``: :func:`cached_dataset_dicts` with ``cache``,
    else Detectron2's ``get_detection_dataset_dicts`` (each rank parses)."""
    if cache:
        return cached_dataset_dicts(names, filter_empty=filter_empty, cache_dir=cache_dir)
    return get_detection_dataset_dicts(names, filter_empty=filter_empty)
