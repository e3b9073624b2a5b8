"""In the reference environment a Detectron2 that cannot be imported fails the suite; elsewhere
the Detectron2 tests skip with the reason (see tests/conftest.py)."""
import os
import subprocess
import sys

from tests.helpers import ROOT


def _pytest_without_detectron2(tmp_path, expect, *more_tests):
    fake = tmp_path / "fake" / "detectron2"
    fake.mkdir(parents=True, exist_ok=True)
    # what a venv without Detectron2 raises (pytest.importorskip turned it into a skip)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError('simulated broken Detectron2', name='detectron2')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), ROOT]))
    env.pop("DINOV2OD_EXPECT_DETECTRON2", None)
    if expect is not None:
        env["DINOV2OD_EXPECT_DETECTRON2"] = expect
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/d2/test_yacs.py", *more_tests]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_detectron2_fails_where_it_is_expected(tmp_path):
    for expect in ("1", None if sys.version_info[:2] == (3, 10) else "1"):
        proc = _pytest_without_detectron2(tmp_path, expect)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "1 error" in proc.stdout and "simulated broken Detectron2" in proc.stdout, proc.stdout[-2000:]


def test_missing_detectron2_skips_with_the_reason_elsewhere(tmp_path):
    proc = _pytest_without_detectron2(
        tmp_path, "0", "tests/d2/test_amp_cuda.py::test_amp_module_imports_only_torch_and_the_standard_library")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed, 1 skipped" in proc.stdout, proc.stdout[-2000:]  # the Detectron2-free test still runs
    assert "Detectron2 is not installed (ModuleNotFoundError: simulated broken Detectron2)" in proc.stdout
