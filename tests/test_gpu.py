"""The CUDA fast path against the CPU reference: the Triton column loop, the tensor-core Hessian
and the driver on the GPU. The kernel's logic is also checked on CPU through Triton's interpreter;
everything else here is skipped where there is no CUDA (CI). bench/gpu.py measures speed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantizers import gptq
from quantizers.gptq import relative_error
from quantizers.scheme import ActOrder, Scheme

from test_gptq import problem
from tiny import calib, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [  # bits, group size, sym, desc_act, static_groups, shape
    (4, 128, True, False, False, (512, 1024)),
    (4, 64, False, False, False, (384, 640)),
    (4, -1, True, False, False, (256, 512)),
    (4, 128, True, False, False, (192, 576)),      # ragged last group
    (4, 48, False, False, False, (128, 480)),      # a group that is not a power of two
    (4, 128, True, True, False, (256, 1024)),      # dynamic act-order
    (4, 128, True, True, True, (256, 1024)),       # static act-order
    (3, 64, True, False, False, (256, 512)),
    (8, 256, False, False, False, (256, 1024)),
    (4, 512, True, False, False, (128, 1024)),     # a group spanning several kernel blocks
]


INTERPRETED = """
import json, sys
import torch
sys.path[:0] = [{root!r}, {tests!r}]
from quantizers import gptq
from quantizers.scheme import ActOrder, Scheme
from test_gptq import problem
out = []
for bits, gs, sym, desc, static, shape in {cases!r}:
    W, H = problem(out_f=shape[0] // 8, in_f=shape[1], n=2048)
    q = Scheme(bits, gs, sym, ActOrder.of(desc, static))
    ref, rs = gptq.quantize_weight(W, H, q, kernel="torch")
    fast, fs = gptq.quantize_weight(W, H, q, kernel="triton")
    out.append({{"codes": torch.equal(fast.codes, ref.codes), "scales": torch.equal(fast.scales, ref.scales),
                "g_idx": torch.equal(fast.g_idx, ref.g_idx), "rel": [fs.rel_error, rs.rel_error]}})
print("RESULT " + json.dumps(out))
"""


def test_triton_kernel_logic_under_interpreter():
    """On CPU the interpreter runs the kernel in numpy float32, each operation rounded once, no FMA.
    The torch loop does the same operations in the same order (one block partition, the rank-1
    update as a product and a subtraction, the between-block update as the same matrix product),
    so the two must agree bit for bit on any CPU: same codes, scales, groups and error. (With
    torch's addr_, contracted into an FMA on AVX2/AVX-512 builds, and 128-column torch blocks they
    differed in a few float16 scales on an AMX machine.)"""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    cases = [c[:5] + ((c[5][0], min(c[5][1], 640)),) for c in CASES]
    code = INTERPRETED.format(root=str(root), tests=str(root / "tests"), cases=cases)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for case, r in zip(cases, results):
        assert r["codes"] and r["scales"] and r["g_idx"], (case, r)
        assert r["rel"][0] == r["rel"][1], (case, r)


@cuda
@pytest.mark.parametrize("bits,gs,sym,desc,static,shape", CASES)
def test_triton_loop_matches_reference(bits, gs, sym, desc, static, shape):
    W, H = problem(out_f=shape[0], in_f=shape[1], n=4096)
    W, H = W.cuda(), H.cuda()
    ref, ref_stats = gptq.quantize_weight(W, H, Scheme(bits=bits, group_size=gs, sym=sym, act_order=ActOrder.of(desc, static)), kernel="torch")
    fast, stats = gptq.quantize_weight(W, H, Scheme(bits=bits, group_size=gs, sym=sym, act_order=ActOrder.of(desc, static)))
    assert torch.equal(fast.g_idx, ref.g_idx)
    assert fast.scales.shape == ref.scales.shape
    same = (fast.codes == ref.codes).float().mean().item()
    assert same > 0.97, same                        # rounding-order differences only
    assert stats.rel_error == pytest.approx(ref_stats.rel_error, rel=0.01)
    assert stats.rel_error == pytest.approx(relative_error(W, fast.dequantize(), H), rel=1e-4)
    assert fast.codes.max().item() <= 2 ** bits - 1


@cuda
def test_tensor_core_hessian_equals_float32():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(8, 512, 1024, device="cuda", generator=g) * 3).to(torch.bfloat16)
    fast, ref = gptq.HessianAccumulator(1024, "cuda"), gptq.HessianAccumulator(1024, "cuda")
    fast.add(x)
    ref.add(x.float())
    exact = 2 / 4096 * x.reshape(-1, 1024).double().t() @ x.reshape(-1, 1024).double()
    assert ((fast.result().double() - exact).norm() / exact.norm()).item() < 1e-6
    assert ((ref.result().double() - exact).norm() / exact.norm()).item() < 1e-6


@cuda
def test_driver_on_cuda_matches_cpu():
    from quantizers.config import QuantConfig
    from quantizers.walk import quantize_model
    tokens = calib()
    cfg = QuantConfig(scheme=Scheme(group_size=32))
    cpu_model, gpu_model = tiny_model("llama"), tiny_model("llama").cuda()
    _, cpu_rep = quantize_model(cpu_model, tokens, cfg, "cpu")
    res, gpu_rep = quantize_model(gpu_model, tokens.cuda(), cfg, "cuda")
    assert all(q.codes.device.type == "cpu" for q in res.values())
    for a, b in zip(cpu_rep, gpu_rep):
        for n in a.modules:
            assert b.modules[n]["rel_error"] == pytest.approx(a.modules[n]["rel_error"], rel=0.05), n
