"""tools/benchmark.py --section model runs and prints its Markdown rows (a smoke test: no timing is
asserted; speed targets are read from the benchmark's own output, never from unit tests)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def test_model_section_prints_rows_with_flops_parts_and_memory(capsys):
    import benchmark

    threads = torch.get_num_threads()
    try:
        benchmark.main(["--section", "model", "--presets", "demo", "--runtimes", "torch", "--dtypes", "fp32", "bf16",
                        "--train-batch", "1", "--model-repeats", "1", "--demo-size", "84", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "fp32 linear yardstick" in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| demo |")]
    infer = [r for r in rows if r[3].startswith("torch")]
    assert [r[4] for r in infer] == ["fp32", "bf16"] or "refused" in out  # bf16: this CPU may lack it
    fp32 = infer[0]
    e2e, parts = float(fp32[5]), [float(v) for v in fp32[6:11]]
    assert float(fp32[12]) > 0 and float(fp32[13]) > 0  # GFLOP (attention included) and GFLOP/s
    assert sum(parts) <= e2e * 3  # the parts are one call's stages, e2e another call's total
    train = [r for r in rows if len(r) == 13]
    assert len(train) == 1 and float(train[0][3]) > 0 and float(train[0][10]) > 0  # iteration ms, GFLOP
