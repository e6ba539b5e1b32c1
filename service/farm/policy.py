"""What a farm job may touch beyond its own folders: remote model code, pickle weights, the server's files.

A submit token belongs to a colleague, a script or a leaked CI secret, so these are the server's decision
(`serve --allow-remote-code`, `--allow-pickle`, `--model-root`, `--data-root`), never the spec's: the API
checks them before queueing and the worker again before running, with the same functions. Every path a
submitter can name (text sources, task data, models, a merge recipe's models) passes `check_paths`.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from .auth import Forbidden
from core.errors import CalibrationError, ModelSourceError, SpecError


@dataclass(frozen=True)
class Policy:
    allow_remote_code: bool = False
    allow_pickle: bool = False
    model_roots: tuple[Path, ...] = ()
    data_roots: tuple[Path, ...] = ()
    publish_targets: tuple[tuple[str, str], ...] = ()     # (name, URL) the administrator set up
    storage: str | None = None          # where state and artifacts live (fsspec URL); None: HOME's own folders
    publish_replace: bool = False       # a publish may overwrite a folder holding another artifact

    def worker_args(self) -> list[str]:
        """The same policy as `quantfarm worker` arguments."""
        out = ["--allow-remote-code"] * self.allow_remote_code + ["--allow-pickle"] * self.allow_pickle
        for r in self.model_roots:
            out += ["--model-root", str(r)]
        for r in self.data_roots:
            out += ["--data-root", str(r)]
        for name, url in self.publish_targets:
            out += ["--publish-target", f"{name}={url}"]
        return out + (["--storage", self.storage] if self.storage else []) + ["--publish-replace"] * self.publish_replace

    def publish_target(self, entry: str, admin: bool = False):
        """The Target a job's publish entry names: local, hub (the server's account) or a name the
        administrator set up (--publish-target NAME=URL). URLs and Hub orgs are an admin's to give (a
        batch file, an admin token): a submitter does not choose where the server writes, or with whose
        credentials."""
        from service.job.publish import HubSettings, parse_target
        named = dict(self.publish_targets)
        if entry in named:
            return parse_target(named[entry], allow_urls=True)
        if "://" in entry or entry.startswith("hub:"):
            return parse_target(entry, allow_urls=admin)     # refused with its own reason unless admin
        if entry not in ("local", "hub"):
            known = ", ".join(["local", "hub", *named])
            raise SpecError(f"publish target {entry!r} is not one this server publishes to; use one of: {known}")
        if entry == "hub" and not HubSettings.from_env().token:
            raise SpecError("publish target 'hub': this server has no Hub token (HF_TOKEN) configured; ask the "
                            "farm's administrator, or publish to local")
        return parse_target(entry, allow_urls=False)


def from_args(a) -> Policy:
    targets = []
    for t in a.publish_target or ():
        name, sep, url = t.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name) or name in ("local", "hub"):
            raise SpecError(f"--publish-target {t!r}: give NAME=URL with a lower-case NAME other than local and hub")
        from service.job.publish import parse_target
        targets.append((name, str(parse_target(url, allow_urls=True))))
    return Policy(bool(a.allow_remote_code), bool(a.allow_pickle),
                  tuple(Path(r).expanduser().resolve() for r in a.model_root or ()),
                  tuple(Path(r).expanduser().resolve() for r in a.data_root or ()), tuple(targets),
                  a.storage.rstrip("/") if getattr(a, "storage", None) else None,
                  publish_replace=bool(getattr(a, "publish_replace", False)))


def check_publish(spec, policy: Policy, admin: bool = False) -> list:
    """The Targets of a JobSpec's or ReleaseSpec's publish list, each one this server allows."""
    return [policy.publish_target(entry, admin) for entry in spec.publish]


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
    p.add_argument("--storage", metavar="URL",
                   help="where per-layer resume state and artifacts live when workers do not share HOME's disk: "
                        "an fsspec URL (file:///shared/farm, s3://bucket/farm with s3fs and AWS_*); workers "
                        "compute in a local scratch folder and mirror it there, the API serves artifacts from it")
    p.add_argument("--publish-target", action="append", metavar="NAME=URL",
                   help="a destination jobs may name in `publish` (file:///..., s3://bucket/prefix, gs://...; "
                        "credentials from the server's environment, e.g. AWS_*); repeatable. Jobs may always name "
                        "local, and hub when HF_TOKEN and QUANTFARM_HUB_ORG are set")
    p.add_argument("--publish-replace", action="store_true",
                   help="let a publish overwrite TARGET/MODEL-REV/NAME when it holds another artifact (another recipe "
                        "under the same name); without it such a job ends publish_failed and nothing is overwritten")


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


def check_paths(spec, policy: Policy) -> None:
    """Every path a submitter can name, each through one rule: calibration and evaluation text (a file under
    the data roots, or a Hub dataset id while this server reaches the Hub), the task data folder (under the
    data roots), the model and every model a merge recipe references (the demo model, a Hub id, or under the
    model roots). Outside the roots there is one answer whatever exists there: nothing is looked at. A merge
    recipe's chat_template, the one other field mergekit reads a file from, is refused unless it names one of
    mergekit's templates when the spec is validated (service/job/merge.py). `spec`: a JobSpec or ReleaseSpec."""
    from service.job import merge                                    # torch: not for the client commands
    from service.job.models import confine
    for what, source in (("calibration source", spec.calibration.source), ("evaluation text", spec.evaluation.text)):
        if source is not None:
            check_text_source(what, source, policy)
    if spec.evaluation.data_dir is not None:
        check_data_path("task data folder", spec.evaluation.data_dir, policy, folder=True)
    if spec.merge is None:
        confine(spec.model, list(policy.model_roots))
    for ref in merge.model_paths(spec.merge) if spec.merge is not None else ():
        try:
            confine(ref, list(policy.model_roots))
        except ModelSourceError as e:
            raise type(e)(f"merge source {ref}: {e}") from None


def check_text_source(what: str, source: str, policy: Policy) -> None:
    """A calibration or evaluation text source as calibration.sources.classify reads it (the same function
    a job opens it with): named sources pass, files only under the data roots, Hub datasets only by id."""
    from calibration.sources import classify
    from service.job.hub_source import offline
    kind, value = classify(source)                      # an unknown form or a Hub "id" that is a path: refused
    if kind == "hub" and offline("HF_DATASETS_OFFLINE"):
        raise CalibrationError(f"{what} {source!r}: this server works without the Hub (HF_HUB_OFFLINE), so it "
                               "takes no hf: datasets; use c4, wikitext2, model or a .txt/.jsonl file under "
                               "a --data-root folder")
    if kind == "file":
        check_data_path(what, value, policy, folder=False)


def check_data_path(what: str, path: str, policy: Policy, *, folder: bool) -> None:
    """A file or folder only under the data roots (symlinks followed); "does not exist" only inside them."""
    from service.job.models import is_under, outside_roots_message   # torch: not for the client commands
    if not is_under(path, policy.data_roots):
        raise CalibrationError(outside_roots_message(what, path, policy.data_roots, "--data-root"))
    p = Path(path).expanduser()
    if not (p.is_dir() if folder else p.is_file()):
        raise CalibrationError(f"{what} {path} does not exist under the data roots")
