"""Evaluation suites, the cached fp16 baseline, and recovery (quantized against fp16).

A suite is a list of parts: `perplexity` and `kld` on held-out text (one pass serves both), and the six
leaderboard tasks. `quick` = perplexity + kld; `leaderboard` = the six tasks. The fp16 baseline of each
part is cached under its own key (model revision, compute dtype, part, limit, data hash, harness
version), so a second format of the same model, or a suite sharing parts with an earlier one, reuses it.
"""
import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from safetensors.torch import load_file, save_file

from core.errors import EvaluationError
from core.paths import atomic_file, write_atomic
from core.version import quantfarm_version

from . import leaderboard, text_metrics
from .task_data import TASKS, data_hash, task_folder

TEXT_PARTS = ("perplexity", "kld")
SUITES = {"quick": TEXT_PARTS, "leaderboard": tuple(TASKS), "none": ()}
PARTS = TEXT_PARTS + tuple(TASKS)


PATH_MAX = 1024          # a request may name a file; nothing unbounded is stored
Part = Annotated[str, StringConstraints(max_length=64)]


class Evaluation(BaseModel):
    """What to evaluate and on what data; not part of the recipe key (the artifact does not depend on it)."""
    model_config = ConfigDict(extra="forbid")
    suite: Part | Annotated[list[Part], Field(max_length=32)] = Field(
        "quick", description="quick (perplexity + KLD) | leaderboard (the six Open LLM Leaderboard v1 tasks) | "
                             "none | a list of parts: perplexity, kld, " + ", ".join(TASKS))
    text: str | None = Field(None, max_length=PATH_MAX,
                             description="held-out text source; default WikiText-2 validation when present")
    windows: int = Field(32, ge=1, le=100_000)
    window_len: int = Field(512, ge=16, le=131_072)
    stride: int | None = Field(None, ge=1, le=131_072, description="window step; default window_len (no overlap)")
    limit: int | None = Field(None, ge=1, le=1_000_000, description="at most this many text windows, and items per "
                              "task (for MMLU spread over its subjects), for quick runs")
    data_dir: str | None = Field(None, max_length=PATH_MAX,
                                 description="folder with the task data; default the shared data folder")
    batch_size: int = Field(8, ge=1, le=512)
    serving: bool = Field(False, description="also serve the artifact and the fp16 model in vLLM on the worker's "
                                             "device and report memory, time to first token, prefill and decode speed")

    @field_validator("suite")
    @classmethod
    def _suite(cls, v):
        parts(v)
        return v

    @property
    def n_windows(self) -> int:
        return min(self.windows, self.limit) if self.limit else self.windows

    @property
    def parts(self) -> list[str]:
        return parts(self.suite)


def parts(suite) -> list[str]:
    """The parts a suite names, in report order. `perplexity` alone (the pre-report default) is a suite too."""
    names = [suite] if isinstance(suite, str) else list(suite)
    out = []
    for n in names:
        for p in SUITES.get(n, (n,)):
            if p not in PARTS:
                raise ValueError(f"unknown suite or part {p!r}: use quick, leaderboard, none or parts of "
                                 f"{', '.join(PARTS)}")
            if p not in out:
                out.append(p)
    return sorted(out, key=PARTS.index)


def versions() -> dict:
    return {"quantfarm": quantfarm_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "lm_eval": leaderboard.lm_eval_version()}


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class BaselineCache:
    """fp16 results on disk, one JSON per part (+ safetensors of hidden states for kld); writes are atomic."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None

    def get(self, key: str):
        if self.root is None or not (self.root / f"{key}.json").is_file():
            return None
        entry = json.loads((self.root / f"{key}.json").read_text())
        h = self.root / f"{key}.hidden.safetensors"
        return entry, (load_file(h)["hidden"] if h.is_file() else None)

    def put(self, key: str, entry: dict, hidden: torch.Tensor | None = None):
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if hidden is not None:
            with atomic_file(self.root / f"{key}.hidden.safetensors") as tmp:
                save_file({"hidden": hidden.contiguous()}, tmp)
        write_atomic(self.root / f"{key}.json", json.dumps(entry, indent=1))


class EvaluationPlan:
    """The parts to run for one (source model, settings), with their cache keys."""

    def __init__(self, ev: Evaluation, model_id: str, revision: str, dtype: torch.dtype, device: torch.device,
                 text_tokens: Callable[[], tuple[torch.Tensor, str]] | None = None):
        self.ev, self.parts = ev, ev.parts
        self.tasks = [p for p in self.parts if p in TASKS]
        self.text = [p for p in self.parts if p in TEXT_PARTS]
        self.folder = task_folder(ev.data_dir) if self.tasks else None
        base = {"model": model_id, "revision": revision, "dtype": str(dtype), "device": device.type}
        self.tokens, self.text_desc = text_tokens() if self.text else (None, None)
        self.keys = {}
        if self.text:
            text_hash = hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()
            self.keys["text"] = _key({**base, "part": "text", "text": text_hash, "window": ev.window_len,
                                      "stride": ev.stride or ev.window_len, "windows": ev.n_windows,
                                      "hidden": "kld" in self.text})
        lm_eval = leaderboard.lm_eval_version() if self.tasks else None
        for t in self.tasks:
            self.keys[t] = _key({**base, "part": t, "limit": ev.limit, "data": data_hash([t], self.folder),
                                 "lm_eval": lm_eval, "fewshot_seed": leaderboard.FEWSHOT_SEED})

    def _text(self, model, **kw):
        ev = self.ev
        return text_metrics.text_pass(model, self.tokens, ev.window_len, ev.stride, ev.n_windows, ev.batch_size, **kw)

    def baseline(self, cache: BaselineCache, load_fp16: Callable[[], tuple]) -> dict:
        """fp16 results per part, from the cache or computed (the model is loaded only on a miss)."""
        out, hidden, loaded = {"cache": {}}, None, None
        for part, key in self.keys.items():
            hit = cache.get(key)
            if hit is not None:
                out[part], out["cache"][part] = hit[0]["result"], "hit"
                hidden = hit[1] if part == "text" else hidden
                continue
            loaded = loaded or load_fp16()
            model, tokenizer = loaded
            t = time.perf_counter()
            if part == "text":
                p = self._text(model, keep_hidden="kld" in self.text)
                result = {"perplexity": p.perplexity, "tokens": p.count, "text": self.text_desc,
                          "head": text_metrics.head_hash(model)}
                hidden = p.hidden
            else:
                lm = leaderboard.lm_for(model, tokenizer, self.ev.batch_size)
                result = leaderboard.run(lm, [part], self.folder, self.ev.limit)[part]
            result["seconds"] = time.perf_counter() - t
            cache.put(key, {"result": result, "created": time.time()}, hidden if part == "text" else None)
            out[part], out["cache"][part] = result, "miss"
        self._hidden, self._baseline_head = hidden, out.get("text", {}).get("head")
        return out

    def quantized(self, model, tokenizer) -> dict:
        """The same parts on the model loaded back from the artifact (after `baseline`)."""
        out = {}
        if self.text:
            t = time.perf_counter()
            kld = "kld" in self.text
            if kld and self._baseline_head != text_metrics.head_hash(model):
                raise EvaluationError("the artifact's output head differs from the fp16 model's, so KLD cannot be "
                                      "computed from the cached hidden states; evaluate without kld")
            p = self._text(model, reference=self._hidden if kld else None)
            out["text"] = {"perplexity": p.perplexity, "tokens": p.count, "seconds": time.perf_counter() - t,
                           **({"kld": text_metrics.kld_summary(p.kld, p.top1)} if kld else {})}
        if self.tasks:
            lm = leaderboard.lm_for(model, tokenizer, self.ev.batch_size)
            t = time.perf_counter()
            out.update(leaderboard.run(lm, self.tasks, self.folder, self.ev.limit))
            out["tasks_seconds"] = time.perf_counter() - t
        return out

    def run(self, cache: BaselineCache, load_fp16, load_quantized) -> dict:
        base = self.baseline(cache, load_fp16)
        quant = self.quantized(*load_quantized())
        return compare(self, base, quant)


def compare(plan: EvaluationPlan, base: dict, quant: dict) -> dict:
    """The recovery table. Tasks: quantized / fp16 score; perplexity: fp16 / quantized (both: 1 = no loss).
    The gated `recovery` is that of the task average when tasks ran, else perplexity's."""
    ev, rows = plan.ev, []
    if "perplexity" in plan.parts:
        b, q = base["text"]["perplexity"], quant["text"]["perplexity"]
        rows.append({"name": "perplexity", "metric": "perplexity (lower is better)", "shots": None,
                     "n": quant["text"]["tokens"], "fp16": b, "quantized": q, "recovery": b / q})
    for t in plan.tasks:
        b, q = base[t]["score"], quant[t]["score"]
        rows.append({"name": t, "metric": quant[t]["metric"],
                     "shots": quant[t]["shots"], "n": quant[t]["n"], "fp16": b, "quantized": q,
                     "recovery": q / b if b > 0 else None, **({"substitute": quant[t]["substitute"]}
                                                              if "substitute" in quant[t] else {})})
    average = None
    if plan.tasks:
        fb = sum(base[t]["score"] for t in plan.tasks) / len(plan.tasks)
        fq = sum(quant[t]["score"] for t in plan.tasks) / len(plan.tasks)
        average = {"fp16": fb, "quantized": fq, "recovery": fq / fb if fb > 0 else None}
    if average is not None:
        recovery, basis = average["recovery"], "average of the task scores, quantized / fp16"
    elif "perplexity" in plan.parts:
        recovery, basis = rows[0]["recovery"], "perplexity, fp16 / quantized"
    else:
        recovery, basis = None, None
    return {"parts": plan.parts, "settings": ev.model_dump(), "text": plan.text_desc, "rows": rows,
            "average": average, "kld": quant.get("text", {}).get("kld"), "recovery": recovery,
            "recovery_basis": basis, "baseline_cache": base["cache"], "baseline_keys": plan.keys,
            "seconds": {"quantized_text": quant.get("text", {}).get("seconds"),
                        "quantized_tasks": quant.get("tasks_seconds"),
                        "baseline": {p: base[p]["seconds"] for p in plan.keys if base["cache"][p] == "miss"}},
            "versions": versions()}
