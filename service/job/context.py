"""JobContext: where and how one job runs, one object instead of long argument lists. The front ends
(the CLI, a release, a farm worker) each make one; the pipeline and the format makers read it.

Timings are not in it: every step returns what it made, and `pipeline.run` times the steps it calls.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core.errors import SpecError

from .shared import Shared


def _noop(*_a, **_k):
    pass


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def compute_dtype(dev: torch.device) -> torch.dtype:
    """float32 on CPU (bfloat16 matmuls there are slow and lossy), bfloat16 on accelerators."""
    return torch.float32 if dev.type == "cpu" else torch.bfloat16


@dataclass
class JobContext:
    """out_dir: where the artifact lands (with its report files); state_dir: per-layer resume state (None:
    no resume); cache_dir: the fp16 baseline cache (None: not cached); model_roots: the only folders local
    models may come from (a farm's policy; None: anywhere); shared: the work a release's variants share;
    on_step(name) / on_layer(LayerReport, total): progress; should_stop(): asked at every step and layer
    boundary (True cancels the job there)."""
    out_dir: Path
    device: str = "auto"
    state_dir: Path | None = None
    overwrite: bool = False
    cache_dir: Path | None = None
    model_roots: tuple | None = None
    shared: Shared = field(default_factory=Shared)
    on_step: Callable[[str], None] = _noop
    on_layer: Callable = _noop
    should_stop: Callable[[], bool] | None = None

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.model_roots = None if self.model_roots is None else tuple(self.model_roots)
        self.dev = pick_device(self.device)
        self.dtype = compute_dtype(self.dev)

    def stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()


class Clock:
    """The seconds of each step `pipeline.run` calls, in the order they ran."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), its seconds recorded under `name` (added to any earlier ones)."""
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.t0}
