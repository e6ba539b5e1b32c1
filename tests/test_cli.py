"""Bad input to the CLI fails fast with a message that names the problem, before any model loads."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def quantfarm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--group-size", "0"], "group_size"),
    (["--damp", "2"], "damp_percent"),
    (["--samples", "0"], "calibration.samples"),
    (["--algorithm", "awq", "--sym"], "sym: AWQ quantizes with zero points"),
])
def test_invalid_settings_exit_2_with_the_field(tmp_path, args, message):
    r = quantfarm("quantize", "smollm2-135m", *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_unsupported_bits_are_refused_by_the_parser(tmp_path):
    r = quantfarm("quantize", "smollm2-135m", "--bits", "5", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--bits" in r.stderr


def test_unknown_model_reference(tmp_path):
    r = quantfarm("quantize", "not a model!", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "quantfarm: error:" in r.stderr and "Traceback" not in r.stderr


def test_existing_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "x").mkdir()
    r = quantfarm("quantize", "smollm2-135m", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_cuda_requested_without_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = quantfarm("quantize", "smollm2-135m", "--device", "cuda", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no CUDA device" in r.stderr


def test_inspect_of_a_folder_that_is_no_artifact(tmp_path):
    r = quantfarm("inspect", str(tmp_path))
    assert r.returncode == 2 and "no config.json" in r.stderr
