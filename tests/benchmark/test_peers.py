"""tools/benchmark.py --section peers (dinov2od/benchmark/peers.py) without rfdetr: the message that
says how to get it, the shared rounds' order and reduction (on a fake clock), the equal token grids
and the verdicts against the targets. The RF-DETR measurement itself runs in .venv-peers only
(`make benchmark-peers`; docs/speed.md)."""
import os
import sys

import pytest

from dinov2od.benchmark import measure, peers

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark as bench_cli  # noqa: E402


def test_without_rfdetr_the_section_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(peers, "_rfdetr", lambda: None)
    args = bench_cli.parse_args(["--section", "peers", "--device", "cpu"])
    assert peers.section_peers(args) == []
    out = capsys.readouterr().out
    assert "rfdetr is not installed" in out and "make env-peers" in out


def test_equal_token_grids():
    # RF-DETR's 16-px patches at 384 / 512 / 576 px: 24 / 32 / 36 patches a side; ViT-S/14 gets them at
    # 336 / 448 / 504 px
    assert [(p.grid, peers.equal_grid_px(p.grid)) for p in peers.PEERS.values()] == [(24, 336), (32, 448), (36, 504)]
    assert peers.equal_grid_px(57) == 798  # the COCO recipe's 800 px


def test_shared_rounds_interleave_the_calls_and_reduce_per_call(monkeypatch):
    """Each round calls every model once, in order; warm-up rounds are not timed; the median (or
    min) is per call. A fake clock advances by each call's own cost, which changes per round."""
    now = [0.0]
    monkeypatch.setattr(measure, "CLOCK", {"now": lambda: now[0]})
    order = []
    costs = {"a": [5, 1, 2, 3, 100], "b": [7, 4, 4, 9, 4]}  # seconds, per round (round 0: warm-up)

    def call(name):
        def fn():
            order.append(name)
            now[0] += costs[name][sum(1 for o in order if o == name) - 1]
        return fn

    monkeypatch.setitem(measure.STAT, "name", "median")
    ms = peers.shared_rounds({"a": call("a"), "b": call("b")}, repeats=4, warmup=1, device="cpu")
    assert order == ["a", "b"] * 5
    assert ms == {"a": pytest.approx(2500.0), "b": pytest.approx(4000.0)}  # medians of [1,2,3,100], [4,4,9,4]
    order.clear()
    monkeypatch.setitem(measure.STAT, "name", "min")
    # min of its first two costs (5 s, 1 s)
    assert peers.shared_rounds({"a": call("a")}, repeats=2, warmup=0, device="cpu") == {"a": pytest.approx(1000.0)}


def test_targets_lines_judge_ratios_against_rfdetr_s():
    """The reset targets (issue 32): bf16 efficient >= 1.25x and default >= 1.0x where the CPU has native
    bf16 (else n/a; a dtype not run: no line); fp32 efficient >= 1.0x; fp32 default reported, not targeted; each line with the CPU
    kind and the distance to the matmul rate."""
    rows = [dict(peer="RF-DETR-S", dtype="fp32", model="dinov2od efficient", speed=1.3, of_matmul=0.5,
                 matmul_rate=100.0),
            dict(peer="RF-DETR-S", dtype="bf16", model="dinov2od efficient", speed=1.2),
            dict(peer="RF-DETR-S", dtype="fp32", model="dinov2od default", speed=0.74),
            dict(peer="RF-DETR-N", dtype="fp32", model="dinov2od default", speed=0.1)]
    train = [dict(model="RF-DETR-S", grid=16, speed=1.0), dict(model="dinov2od default", grid=16, speed=0.99)]
    lines = peers.targets_lines(rows, train, native_bf16=True, tag="[CPU X]")
    assert lines == [
        "efficient vs RF-DETR-S, bf16: 1.20x (target >= 1.25x: NOT met) [CPU X]",
        "efficient vs RF-DETR-S, fp32: 1.30x (target >= 1.00x: met); 50% of the fp32 matmul rate 100.0 GFLOP/s [CPU X]",
        "default vs RF-DETR-S, fp32: 0.74x (reported, not targeted: it computes 81 GFLOP against RF-DETR-S's 59.6 "
        "by design) [CPU X]",
        "training, dinov2od default vs RF-DETR-S, 16x16 tokens: 0.99x (target >= 1.00x: NOT met) [CPU X]",
    ]
    fp32_only = [r for r in rows if r["dtype"] == "fp32"]
    lines = peers.targets_lines(fp32_only, [], native_bf16=False, tag="[CPU Y]")
    assert lines[:2] == ["efficient vs RF-DETR-S, bf16: n/a: no native bf16 [CPU Y]",
                         "default vs RF-DETR-S, bf16: n/a: no native bf16 [CPU Y]"]
    assert peers.speed_ratio(300.0, 200.0) == pytest.approx(1.5)  # RF-DETR's time over ours: > 1 is faster


def test_the_targets_are_the_reset_ones():
    from dinov2od.benchmark.targets import PEER_TARGETS

    got = {(t.preset, t.dtype): (t.threshold, t.native_bf16) for t in PEER_TARGETS}
    assert got == {("efficient", "bf16"): (1.25, True), ("default", "bf16"): (1.0, True),
                   ("efficient", "fp32"): (1.0, False), ("default", "fp32"): (None, False)}
