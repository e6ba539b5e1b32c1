"""Shared test helpers."""
import os
import pathlib

import pytest
import torch
from quantizers.scheme import Scheme


def require_shared_data(relpath: str) -> pathlib.Path:
    """The shared data file `relpath`: skip with the reason when it is absent, but fail instead when
    QUANTFARM_REQUIRE_SHARED_DATA=1 (CI sets it, so missing data cannot silently skip real-data tests)."""
    from calibration import shared_file  # lazy: a broken calibration package must not break collection
    from core.errors import CalibrationError

    try:
        path = shared_file(relpath)
        why = f"shared data file {relpath} not found (set QUANTFARM_DATA to the shared data folder)"
    except CalibrationError as e:
        path, why = None, str(e)
    if path is None:
        if os.environ.get("QUANTFARM_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{why}; QUANTFARM_REQUIRE_SHARED_DATA=1 requires it")
        pytest.skip(why)
    return path


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers) worker i of n runs, with every process it starts, on
    its own share of the cores (cores i, i+n, ...): torch, llama.cpp and vLLM size their thread pools by the
    cores a process may use, and two workers each running two threads on two cores slow each other down
    several-fold (BENCHMARKS.md)."""
    wid, n = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    cpus = sorted(os.sched_getaffinity(0))
    if wid and n > 1 and len(cpus) >= n:
        mine = cpus[int(wid.removeprefix("gw")) % n::n]
        os.sched_setaffinity(0, mine)
        os.environ["OMP_NUM_THREADS"] = str(len(mine))
        torch.set_num_threads(len(mine))


# pytest-xdist work units: a module each, except the modules that share the session's SmolLM2 artifacts (the
# AWQ one takes minutes), which run on one worker so that none waits for another's. The longest units go
# first (`--no-loadscope-reorder` keeps this order): they start together on the two workers and the short
# modules fill in around them. (xdist's own `--dist loadgroup` marks cannot do it under pytest 9.2, whose
# node ids xdist can no longer suffix with the group.)
SMOL_GROUP = ("test_smollm2.py", "test_serving.py", "test_vllm.py", "test_report.py")
LONGEST_FIRST = (*SMOL_GROUP, "test_gguf.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return "smollm2" if module in SMOL_GROUP else module
    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))       # stable: the rest keep their order


def shared_dir(tmp_path_factory, name: str) -> pathlib.Path:
    """A folder every pytest-xdist worker of this run sees (the run's base temp folder; each worker's own is
    below it): what a session fixture builds once for all of them, under a lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    (root / name).mkdir(parents=True, exist_ok=True)
    return root / name


@pytest.fixture(autouse=True, scope="session")
def _private_home(tmp_path_factory):
    """Commands run by tests (and their subprocesses) keep their baseline cache and tokens in a temporary
    QUANTFARM_HOME, never in the user's ~/.quantfarm."""
    if "QUANTFARM_HOME" not in os.environ:
        os.environ["QUANTFARM_HOME"] = str(tmp_path_factory.mktemp("quantfarm-home"))
    yield


# --------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M, loaded once per session, and each of its artifacts quantized once per session:
# the quality, reader, report and runtime tests share them instead of quantizing again.

SMOL_SAMPLES, SMOL_SEQ = 8, 512      # C4 calibration of every SmolLM2 test (peer ceilings measured at it)
SMOL_WINDOWS = 8                     # WikiText-2 validation windows of 512 tokens for perplexity


@pytest.fixture(scope="session")
def smol():
    """fp16 SmolLM2 (rounded to its storage dtype, computed in float32), tokenizer, held-out tokens,
    the shared calibration blocks and the fp16 perplexity."""
    from types import SimpleNamespace

    from calibration import build_calibration, eval_tokens
    from evaluation.text_metrics import perplexity
    from service.job.models import resolve_model
    from service.job.steps import load_rounded

    require_shared_data("c4/c4_en_train_first1000.jsonl")
    require_shared_data("wikitext2/wiki.valid.tokens")
    model, tok = load_rounded(resolve_model("smollm2-135m"))
    ev, _ = eval_tokens("wikitext2", tok)
    calib = build_calibration("c4", tok, n_samples=SMOL_SAMPLES, seq_len=SMOL_SEQ, seed=0)
    return SimpleNamespace(model=model, tok=tok, ev=ev, calib=calib,
                           fp16=perplexity(model, ev, 512, max_windows=SMOL_WINDOWS))


def smol_recipes():
    """name -> (QuantConfig, format): the SmolLM2 artifacts tests may ask for."""
    from quantizers.config import QuantConfig
    return {
        "gptq-g64": (QuantConfig(scheme=Scheme(group_size=64, act_order="static")), "gptq"),
        "gptq-g128": (QuantConfig(scheme=Scheme(group_size=128, act_order="static")), "gptq"),   # 576-wide inputs: ragged
        "awq-g64": (QuantConfig(scheme=Scheme(group_size=64, sym=False), algorithm="awq"), "awq"),
        "rtn-g64": (QuantConfig(scheme=Scheme(group_size=64), algorithm="rtn"), None),
        "rtn-g64-asym": (QuantConfig(scheme=Scheme(group_size=64, sym=False), algorithm="rtn"), None),
        "rtn-g128": (QuantConfig(scheme=Scheme(group_size=128), algorithm="rtn"), None),
        "rtn-w8a8": (QuantConfig(scheme=Scheme(8, -1, named="W8A8"), algorithm="rtn"), "compressed-tensors"),
        "rtn-fp8-dynamic": (QuantConfig(scheme=Scheme(8, -1, named="FP8_DYNAMIC"), algorithm="rtn"), "compressed-tensors"),
    }


@pytest.fixture(scope="session")
def smol_quantized(smol, tmp_path_factory):
    """smol_quantized(name) -> namespace(folder, quantized, reports, ppl), built on first use, once per run: the
    first worker to ask builds it under a lock and leaves it for the others. With a format the artifact is
    written and its perplexity is that of the artifact as our reader loads it; without one (RTN references)
    it is the in-memory model's."""
    import copy
    from types import SimpleNamespace

    from filelock import FileLock

    from evaluation.text_metrics import perplexity
    from quantizers.artifact import load_artifact
    from quantizers.walk import quantize_model
    from quantizers.artifact import save, with_scale_dtype

    built, root = {}, shared_dir(tmp_path_factory, "smol-artifacts")

    def build(name: str, cfg, fmt) -> dict:
        model = copy.deepcopy(smol.model)
        tokens = smol.calib.tokens if cfg.algorithm != "rtn" else None
        quantized, reports = quantize_model(model, tokens, cfg, "cpu")
        folder = None
        if fmt:
            folder = save(root / name, model, smol.tok, quantized, cfg, fmt,
                          {"quantizer": ["quantfarm:test"], "algorithm": cfg.algorithm})
            model, _, _ = load_artifact(folder, with_tokenizer=False)
        return {"folder": folder, "quantized": quantized, "reports": reports,
                "ppl": perplexity(model, smol.ev, 512, max_windows=SMOL_WINDOWS)}

    def get(name: str):
        if name not in built:
            cfg, fmt = smol_recipes()[name]
            if fmt:
                cfg = with_scale_dtype(cfg, fmt, smol.model)
            made = root / f"{name}.pt"              # our own objects, written by this run: trusted to unpickle
            with FileLock(str(root / f"{name}.lock")):
                if not made.exists():
                    torch.save(build(name, cfg, fmt), made)
                built[name] = SimpleNamespace(cfg=cfg, fmt=fmt, **torch.load(made, weights_only=False))
        return built[name]
    return get


# The README's main job (`make demo`), scaled down to seconds: run once through the CLI; tests that
# change the artifact (eval, report) work on a copy.
DEMO_ARGS = ["quantize", "smollm2-135m", "--group-size", "64", "--samples", "8", "--seq-len", "128",
             "--eval-windows", "2", "--serving"]       # serving: measured in vLLM CPU (tests/test_serving.py)


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """namespace(folder, stdout, home) of the scaled-down demo job, run once per run (under a lock, for every
    pytest-xdist worker) with its own QUANTFARM_HOME (whose baseline cache then holds exactly the demo's fp16
    evaluation)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from filelock import FileLock
    require_shared_data("wikitext2/wiki.valid.tokens")
    base = shared_dir(tmp_path_factory, "demo")
    out, home, stdout = base / "smollm2-135m-gptq-w4g64", base / "home", base / "stdout.txt"
    with FileLock(str(base / "run.lock")):
        if not stdout.exists():
            r = subprocess.run([sys.executable, "-m", "service.cli", *DEMO_ARGS, "--out", str(out)],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                    "QUANTFARM_HOME": str(home)},
                               cwd=pathlib.Path(__file__).resolve().parent.parent, timeout=900)
            assert r.returncode == 0, r.stderr[-3000:]
            stdout.write_text(r.stdout)
    return SimpleNamespace(folder=out, stdout=stdout.read_text(), home=home)
