"""Merge recipes as model sources: a checked mergekit YAML (merge_recipe.py) whose models resolve like any job's
model (Hub ids pinned to a commit, local folders under the server's roots, safetensors unless pickle is allowed,
no remote code unless allowed), merged on the CPU by mergekit as a library into a folder cached under the hash
of the recipe, its sources' identities, the seed and mergekit's version. The job then quantizes that folder
like any model, and its report sets each source's fp16 scores beside the merged model's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelSourceError, SpecError
from core.paths import atomic_folder, cache_root

from .merge_recipe import check, map_refs, mergekit_version, model_paths
from .sources import Access, ResolvedModel

# .models and .loading (torch) are imported where used: importing this module stays light

SEED = 0                 # DARE's random masks (and any other randomness) from one fixed seed: same hash, same model
DONE = "quantfarm-merge.json"
_build_lock = threading.Lock()


# --------------------------------------------------------------------------------------------- pinning

@dataclass(frozen=True)
class Merge:
    """A checked recipe with its sources resolved and its identity: nothing merged yet."""
    recipe: dict
    config: object                                   # mergekit's MergeConfiguration
    sources: dict                                    # ResolvedModel by model path as written (org/name@rev, a folder)
    key: str                                         # the merged model's identity (its revision)

    @property
    def method(self) -> str:
        return self.config.merge_method

    @property
    def folder(self) -> Path:
        return cache_root() / "merges" / self.key[:32]

    @property
    def built(self) -> bool:
        return (self.folder / DONE).is_file()

    def base(self):
        """The source whose config the merged model takes (mergekit: base_model, else the first named)."""
        ref = self.config.base_model or self.config.referenced_models()[0]
        return self.sources[str(ref.model)]

    def local_recipe(self) -> dict:
        """The recipe as mergekit runs it: every reference a local checkpoint folder (a GGUF source's fp16 copy)."""
        from mergekit.common import ModelReference

        from .loading import fp16_folder

        def local(v):
            r = ModelReference.model_validate(v)
            return {"model": {"path": str(fp16_folder(self.sources[str(r.model)]))},
                    **({"override_architecture": r.override_architecture} if r.override_architecture else {})}
        return map_refs(self.recipe, local)

    def out_config(self):
        """The merged model's transformers config without merging: the base's, with the layer count of
        the slices (as mergekit sets it)."""
        from transformers import AutoConfig

        from .loading import fp16_folder
        cfg = AutoConfig.from_pretrained(fp16_folder(self.base()), trust_remote_code=False, local_files_only=True)
        if self.config.slices:
            text = getattr(cfg, "text_config", cfg)
            text.num_hidden_layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
                                         for s in self.config.slices)
        return cfg


def identity(src) -> str:
    """What a source is, wherever it lies: a Hub repo at its commit, other sources by content hash."""
    return f"{src.ref.split('@', 1)[0]}@{src.revision}" if src.kind == "hub" else f"{src.kind}:{src.content_hash}"


def pin(recipe: dict, access: Access = Access(), *, weights: bool = True, on_step=None, should_stop=None) -> Merge:
    """Check the recipe, resolve each source (as a job's model would be: the same rules and roots) and hash
    the result. Sources are resolved only after the recipe passed every check. `weights=False`: Hub sources'
    weights are left pending (admission; `complete` fetches them)."""
    from mergekit.common import ModelReference

    from .models import resolve_model
    try:
        cfg = check(recipe)
    except ValueError as e:
        raise SpecError(str(e)) from None
    sources = {}
    for p in model_paths(recipe):
        try:
            src = resolve_model(p, None, access, weights=weights, on_step=on_step, should_stop=should_stop)
        except ModelSourceError as e:
            raise type(e)(f"merge source {p}: {e}") from None
        sources[p] = src

    def ident(v):
        return identity(sources[str(ModelReference.model_validate(v).model)])
    canon = json.dumps({"recipe": map_refs(recipe, ident), "seed": SEED, "mergekit": mergekit_version()},
                       sort_keys=True, separators=(",", ":"))
    return Merge(recipe, cfg, sources, hashlib.sha256(canon.encode()).hexdigest())


# --------------------------------------------------------------------------------------------- merging

class _Steps:
    """Stands in for the tqdm module inside mergekit.graph, whose executor runs the merge's tensor tasks in a
    `tqdm.tqdm` loop: there the loop reports progress (every tenth) and stops between tasks on cancel."""

    def __init__(self, on_step, should_stop):
        self.on_step, self.should_stop = on_step, should_stop

    def tqdm(self, iterable, **_kw):
        from quantizers.walk import Cancelled
        items, last = list(iterable), -1
        for i, item in enumerate(items):
            if self.should_stop is not None and self.should_stop():
                raise Cancelled("cancelled")
            tenth = 10 * i // max(len(items), 1)
            if tenth > last:
                self.on_step(f"merge {10 * tenth}% of {len(items)} tensor tasks")
                last = tenth
            yield item


def build(m: Merge, *, on_step=lambda s: None, should_stop=None) -> Path:
    """The merged model's folder, merged now unless cached. Written beside its place and renamed into it, so a
    crash or cancel leaves no half model; two processes merging the same recipe keep the first."""
    if m.built:
        return m.folder
    import mergekit.graph
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from . import storage
    n_params = _params(m.out_config())
    storage.check_space(cache_root(), 4 * n_params)                  # float32 at most, before any tensor is read
    on_step("merge")
    options = MergeOptions(quiet=True, random_seed=SEED, copy_tokenizer=True,
                           trust_remote_code=any(s.trust_remote_code for s in m.sources.values()),
                           write_model_card=False, lazy_unpickle=False, allow_crimes=False)
    t = time.perf_counter()
    try:
        with atomic_folder(m.folder, keep=lambda _: m.built) as tmp:    # another process's merge is as good as ours
            with _build_lock:
                saved, mergekit.graph.tqdm = mergekit.graph.tqdm, _Steps(on_step, should_stop)
                try:
                    run_merge(MergeConfiguration.model_validate(m.local_recipe()), str(tmp), options)
                finally:
                    mergekit.graph.tqdm = saved
            _write_provenance(m, tmp, time.perf_counter() - t)
    except (RuntimeError, ValueError, KeyError, AssertionError, IndexError) as e:
        raise ModelSourceError(f"mergekit could not merge the recipe ({m.method}): {type(e).__name__}: {e}") from e
    return m.folder


def _params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def _write_provenance(m: Merge, folder: Path, seconds: float) -> None:
    import yaml
    (folder / "merge.yaml").write_text(yaml.safe_dump(m.recipe, sort_keys=False))
    (folder / DONE).write_text(json.dumps(provenance(m) | {"seconds": round(seconds, 3)}, indent=1) + "\n")


def provenance(m: Merge) -> dict:
    """What the report says about the merge."""
    return {"key": m.key, "method": m.method, "mergekit": mergekit_version(), "seed": SEED, "recipe": m.recipe,
            "sources": [{"model": p, "kind": s.kind, "revision": s.revision or s.content_hash}
                        for p, s in m.sources.items()]}


def export(m: Merge, out, *, overwrite: bool = False, **kw) -> Path:
    """`quantfarm merge`: the merged model as a folder of its own (hard links to the cached files where the
    file system allows, copies elsewhere)."""
    from . import storage
    out = Path(out)
    storage.check_replaceable(out, overwrite)
    storage.check_writable(out)
    folder = build(m, **kw)
    if out.exists():
        shutil.rmtree(out)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(folder, out, copy_function=link)
    return out


# --------------------------------------------------------------------------------------------- as a job's source

def resolved(m: Merge, name: str):
    """The merged model as a job's source, a ResolvedModel (its folder may not exist yet: see `built`)."""
    return ResolvedModel("merge", name, str(m.folder), None, None, m.key,
                         allow_pickle=any(s.allow_pickle for s in m.sources.values()),
                         trust_remote_code=any(s.trust_remote_code for s in m.sources.values()), merge=m)


def resolve_source(spec, *, local_roots=None, build_merge: bool = True, weights: bool = True,
                   on_step=lambda s: None, should_stop=None):
    """A JobSpec's or ReleaseSpec's source: its model resolved, or its merge recipe pinned (and merged when
    `build_merge`). `weights=False`: Hub weights left pending, for `complete` after the caller's checks."""
    from .models import resolve_model
    access = Access.of(spec, local_roots)
    steps = dict(weights=weights, on_step=on_step, should_stop=should_stop)
    if getattr(spec, "merge", None) is None:
        return resolve_model(spec.model, spec.revision, access, **steps)
    m = pin(spec.merge, access, **steps)
    if build_merge:
        build(m, on_step=on_step, should_stop=should_stop)
    return resolved(m, spec.model)


def complete(src, *, on_step=lambda s: None, should_stop=None):
    """A source resolved with weights=False made whole: a Hub model's weights fetched; a merge's sources'
    weights fetched (the report scores each source) and the merge made unless cached."""
    from .hub_weights import fetch_weights
    if src.merge is None:
        return fetch_weights(src, on_step, should_stop)
    m = src.merge
    m = dataclasses.replace(m, sources={p: fetch_weights(s, on_step, should_stop) for p, s in m.sources.items()})
    build(m, on_step=on_step, should_stop=should_stop)
    return resolved(m, src.ref)


def incomplete(src) -> bool:
    """Whether `complete` has work left for this source."""
    if src.merge is None:
        return src.pending is not None
    return not src.merge.built or any(s.pending is not None for s in src.merge.sources.values())


def source_scores(m: Merge, plan, cache, load, dtype, dev) -> dict[str, dict]:
    """{source: its fp16 scores on the job's suite} beside the merged model's (`plan`: its evaluation plan):
    perplexity on the same tokens (for sources whose vocabulary is the merged model's) and the tasks; KLD
    compares two models and has no one-model score. `load(src)` -> (model on the device, tokenizer)."""
    from evaluation import suite
    from .loading import load_tokenizer
    parts = [p for p in plan.parts if p != "kld"]
    merged_vocab = load_tokenizer(resolved(m, "merged")).get_vocab() if plan.text else None
    out = {}
    for p, src in m.sources.items():
        same_vocab = bool(plan.text) and load_tokenizer(src).get_vocab() == merged_vocab
        own = [x for x in parts if x in plan.tasks or same_vocab]
        row = out[p] = {"scores": {}}
        if len(own) < len(parts):
            row["note"] = "perplexity not compared: its vocabulary differs from the merged model's"
        if own:
            ev = plan.ev.model_copy(update={"suite": own})
            sp = suite.EvaluationPlan(ev, identity(src), src.revision or src.content_hash, dtype, dev,
                                      text_tokens=lambda: (plan.tokens, plan.text_desc))
            base = sp.baseline(cache, lambda: load(src))
            row["scores"] = {**({"perplexity": base["text"]["perplexity"]} if "text" in base else {}),
                             **{t: base[t]["score"] for t in sp.tasks}}
    return out
