"""Loss normalisation under DDP: a 2-rank run of the set criterion gives the losses of a 1-rank run.

DETR divides every loss by the number of target boxes *averaged* over the processes (Deformable
DETR: ``all_reduce(num_boxes) / world_size``). Then the rank-mean of the losses, which is what
Detectron2 logs (``SimpleTrainer.write_metrics`` averages every rank's loss dict) and whose
gradient DDP's gradient averaging applies, equals the loss of one process that sees the whole
batch. A box count summed over ranks would halve both with 2 ranks, and the DDP training test
cannot see that (AdamW and gradient clipping ignore a constant loss scale).

Two real processes (fork, gloo over a file store in the test's folder: nothing leaves the
machine), bounded in time.
"""
import multiprocessing
import os
import queue as queue_lib
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dinov2od.modeling import SetCriterion

NUM_CLASSES = 4
TIMEOUT_S = 60

# per image: target (class, cx, cy, w, h) and the offset of the matched query's box from it
IMAGES = [
    [(1, 0.30, 0.40, 0.20, 0.10, (0.010, -0.020, 0.005, 0.000)),
     (3, 0.60, 0.50, 0.10, 0.30, (0.000, 0.015, -0.010, 0.020)),
     (0, 0.45, 0.70, 0.25, 0.15, (-0.030, 0.000, 0.000, 0.010))],
    [(2, 0.50, 0.35, 0.30, 0.20, (0.020, 0.010, -0.015, 0.005))],
]
QUERIES = 5


def _image(spec):
    """One image's outputs (B=1) and targets: query j predicts target j (class logit +4, the others
    -4) with the given offset; the remaining queries are confident background far away."""
    n = len(spec)
    labels = torch.tensor([s[0] for s in spec])
    boxes = torch.tensor([s[1:5] for s in spec], dtype=torch.float32)
    offsets = torch.tensor([s[5] for s in spec], dtype=torch.float32)
    logits = torch.full((1, QUERIES, NUM_CLASSES), -6.0)
    logits[0, torch.arange(n)] = -4.0
    logits[0, torch.arange(n), labels] = 4.0
    pred = torch.tensor([[0.95, 0.95, 0.04, 0.04]]).repeat(QUERIES, 1)
    pred[:n] = boxes + offsets
    return {"pred_logits": logits, "pred_boxes": pred[None]}, [{"labels": labels, "boxes": boxes}]


def _criterion():
    return SetCriterion(NUM_CLASSES, num_aux_layers=0, two_stage=False)


def _rank(rank, world, store, results):
    """One rank: its image's losses and its box counts (1 and 3 groups), sent to the parent."""
    try:
        torch.set_num_threads(1)  # (forked from a process whose thread pool ran: stay single-threaded)
        if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in {n for _, n in socket.if_nameindex()}:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S // 2))
        try:
            outputs, targets = _image(IMAGES[rank])
            crit = _criterion()
            losses = {k: float(v) for k, v in crit(outputs, targets).items()}
            counts = [crit._num_boxes(targets, g, torch.device("cpu")) for g in (1, 3)]
            results.put((rank, losses, counts))
            results.close()
            results.join_thread()  # in the pipe: the parent has it even if the teardown below hangs
        finally:
            dist.destroy_process_group()  # (now and then hangs in a forked child: the parent kills it)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which fails the test)
        results.put((rank, f"{type(e).__name__}: {e}", None))


def _two_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the children inherit the imports: no start-up cost
    results = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_rank, args=(r, 2, store, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            rank, losses, counts = results.get(timeout=TIMEOUT_S)
            assert counts is not None, f"rank {rank} failed: {losses}"
            got[rank] = (losses, counts)
    except queue_lib.Empty:
        pytest.fail(f"the 2-rank run gave no result in {TIMEOUT_S} s")
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
    return got


@pytest.mark.skipif(not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed (gloo) and fork")
def test_two_ranks_log_the_losses_of_one_rank(tmp_path):
    got = _two_ranks(tmp_path)
    n0, n1 = len(IMAGES[0]), len(IMAGES[1])

    # the number of boxes: the mean over the ranks, (3 + 1) / 2 = 2 (times the groups), on both ranks
    for rank in (0, 1):
        assert got[rank][1] == [(n0 + n1) / 2, 3 * (n0 + n1) / 2], (rank, got[rank][1])

    # each rank's L1 loss by hand: its summed |offset| over the global mean count
    for rank in (0, 1):
        l1 = sum(abs(o) for s in IMAGES[rank] for o in s[5])
        assert got[rank][0]["loss_bbox"] == pytest.approx(l1 / ((n0 + n1) / 2), rel=1e-5)

    # what Detectron2 logs (and DDP's averaged gradient follows): the rank mean == one process, whole batch
    (o0, t0), (o1, t1) = _image(IMAGES[0]), _image(IMAGES[1])
    both = {k: torch.cat([o0[k], o1[k]]) for k in o0}
    single = {k: float(v) for k, v in _criterion()(both, t0 + t1).items()}
    assert set(single) == set(got[0][0]) == set(got[1][0]) == {"loss_class", "loss_bbox", "loss_giou"}
    for key, value in single.items():
        logged = (got[0][0][key] + got[1][0][key]) / 2
        assert logged == pytest.approx(value, rel=1e-5), (key, logged, value)
    total_l1 = sum(abs(o) for image in IMAGES for s in image for o in s[5])
    assert single["loss_bbox"] == pytest.approx(total_l1 / (n0 + n1), rel=1e-5)
