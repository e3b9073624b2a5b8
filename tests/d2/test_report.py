"""The end-of-run summary: loss curve from metrics.json, wall time with the CPU, outputs."""
import json

from dinov2od.d2.evaluation.report import cpu_description, loss_curve, run_summary


def test_loss_curve_samples_the_logged_losses_evenly(tmp_path):
    rows = [{"iteration": i, "total_loss": 10.0 - i / 100, "loss_class": 1.0, "loss_bbox": 0.5, "loss_giou": 0.25}
            for i in range(19, 420, 20)]  # 21 logged iterations
    rows.insert(3, {"iteration": 70, "bbox/AP": 1.0})  # an evaluation line: not a training loss
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    curve = loss_curve(str(tmp_path / "metrics.json"), rows=5).splitlines()
    assert curve[0].split() == ["iter", "total_loss", "loss_class", "loss_bbox", "loss_giou"]
    assert [int(line.split()[0]) for line in curve[1:]] == [20, 120, 220, 320, 420]
    assert float(curve[1].split()[1]) == 9.81 and float(curve[-1].split()[1]) == 5.81
    assert curve[1].count("#") > curve[-1].count("#")  # the bar follows the loss
    assert loss_curve(str(tmp_path / "missing.json")) == ""


def test_run_summary_reports_wall_time_cpu_and_outputs(tmp_path):
    (tmp_path / "model_final.pth").write_bytes(b"x")
    text = run_summary(str(tmp_path), started=100.0, now=220.0)
    assert "Wall time: 120 s (2.0 min) on " in text and cpu_description() in text
    assert "model_final.pth" in text and "metrics.json" not in text
    flags = cpu_description().split(", ")[-1].split()
    assert flags and all(f.islower() for f in flags)
