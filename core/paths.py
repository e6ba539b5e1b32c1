"""Where quantfarm keeps derived data any process may rebuild: QUANTFARM_CACHE, default ~/.cache/quantfarm
(the fp16 copies of GGUF sources, llama.cpp's tools, GGUF conversions and importance matrices)."""
import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("QUANTFARM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "quantfarm"
    return Path(base).expanduser()
