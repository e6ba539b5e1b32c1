"""What a farm job may touch beyond its own folders: remote model code, pickle weights, the server's files.

A submit token belongs to a colleague, a script or a leaked CI secret, so these are the server's decision
(`serve --allow-remote-code`, `--allow-pickle`, `--model-root`, `--data-root`), never the spec's: the API
checks them before queueing and the worker again before running, with the same functions.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from .auth import Forbidden
from core.errors import CalibrationError

NAMED_SOURCES = ("auto", "c4", "wikitext2", "model")


@dataclass(frozen=True)
class Policy:
    allow_remote_code: bool = False
    allow_pickle: bool = False
    model_roots: tuple[Path, ...] = ()
    data_roots: tuple[Path, ...] = ()

    def worker_args(self) -> list[str]:
        """The same policy as `quantfarm worker` arguments."""
        out = ["--allow-remote-code"] * self.allow_remote_code + ["--allow-pickle"] * self.allow_pickle
        for r in self.model_roots:
            out += ["--model-root", str(r)]
        for r in self.data_roots:
            out += ["--data-root", str(r)]
        return out


def from_args(a) -> Policy:
    return Policy(bool(a.allow_remote_code), bool(a.allow_pickle),
                  tuple(Path(r).expanduser().resolve() for r in a.model_root or ()),
                  tuple(Path(r).expanduser().resolve() for r in a.data_root or ()))


def add_arguments(p):
    p.add_argument("--allow-remote-code", action="store_true",
                   help="let admin tokens submit trust_remote_code jobs (the model's own Python runs in the worker)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let admin tokens submit allow_pickle jobs (pickle weights can run code when loaded)")
    p.add_argument("--model-root", action="append", metavar="DIR",
                   help="a folder whose local models (folders, .gguf files) jobs may name; repeatable "
                        "(default: none, only the demo model and Hub ids)")
    p.add_argument("--data-root", action="append", metavar="DIR",
                   help="a folder whose .txt/.jsonl calibration and evaluation files and task data jobs may name; "
                        "repeatable (default: none, only the named sources and the shared data folder)")


def check_trust(spec, policy: Policy, admin: bool) -> None:
    """Remote code and pickle weights: off unless the server allows them, and then for admin tokens only."""
    for asked, allowed, setting, flag in ((spec.trust_remote_code, policy.allow_remote_code, "trust_remote_code",
                                           "--allow-remote-code"),
                                          (spec.allow_pickle, policy.allow_pickle, "allow_pickle", "--allow-pickle")):
        if not asked:
            continue
        if not allowed:
            raise Forbidden(f"{setting} is off on this server (the server's `serve {flag}` setting); submit without "
                            f"it, or ask the farm's administrator")
        if not admin:
            raise Forbidden(f"{setting} needs an admin token: this server allows it ({flag}) for admins only")


def local_path(source: str | None) -> str | None:
    """The file a calibration or evaluation text source names, if it names one (mirrors
    calibration.sources.resolve_text_source: file:PATH, a .txt/.jsonl name, or anything with a slash)."""
    if source is None or source in NAMED_SOURCES or source.startswith("hf:"):
        return None
    raw = source[5:] if source.startswith("file:") else source
    if source.startswith("file:") or raw.lower().endswith((".txt", ".jsonl")) or os.sep in raw:
        return raw
    return None


def check_local_files(spec, policy: Policy) -> None:
    """Calibration and evaluation files and the task data folder of a JobSpec: only under the data roots,
    with one answer for everything outside them (nothing is looked at there)."""
    from service.job.models import is_under, outside_roots_message   # torch: not for the client commands
    named = [("calibration file", local_path(spec.calibration.source)),
             ("evaluation text", local_path(spec.evaluation.text)),
             ("task data folder", spec.evaluation.data_dir)]
    for what, path in named:
        if path is None:
            continue
        if not is_under(path, policy.data_roots):
            raise CalibrationError(outside_roots_message(what, path, policy.data_roots, "--data-root"))
        exists = Path(path).expanduser().is_dir() if what == "task data folder" else \
            Path(path).expanduser().is_file()
        if not exists:
            raise CalibrationError(f"{what} {path} does not exist under the data roots")
