"""Calibration sources and sample building: seeded, hashed token windows for quantization, and
held-out tokens for perplexity."""
from .data import CalibrationSet, build_calibration, content_hash, eval_tokens
from .sources import data_dir, shared_file

__all__ = ["CalibrationSet", "build_calibration", "content_hash", "eval_tokens", "data_dir", "shared_file"]
