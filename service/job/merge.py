"""Merge recipes as model sources: a mergekit YAML whose models resolve like any job's model (Hub ids pinned
to a commit, local folders under the server's roots, safetensors unless pickle is allowed, no remote code
unless allowed), merged on the CPU by mergekit as a library into a folder cached under the hash of the
recipe, its sources' identities, the seed and mergekit's version. The job then quantizes that folder like
any model, and its report sets each source's fp16 scores beside the merged model's.

Why check the recipe here and not only in mergekit: mergekit's pydantic models ignore unknown keys, so a
typo (`paramters:`, `wieght:`) would merge silently without the setting; every key and parameter name is
checked against mergekit's own schema and the method's own parameter list, before anything is fetched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import types
import typing
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from core.errors import ModelSourceError, SpecError
from core.paths import cache_root

# .models (torch) is imported where used: the client commands read recipe files through this module

REF_KEYS = ("model", "base_model", "tokenizer_source", "source")   # where mergekit takes a model reference
MAX_RECIPE_CHARS = 64_000
MAX_SOURCES = 16
SEED = 0                 # DARE's random masks (and any other randomness) from one fixed seed: same hash, same model
DONE = "quantfarm-merge.json"
_build_lock = threading.Lock()


def mergekit_version() -> str:
    return version("mergekit")


# --------------------------------------------------------------------------------------------- the recipe

def load_recipe(path) -> dict:
    """A recipe file (mergekit's YAML) as a mapping; errors name the file."""
    import yaml
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"merge recipe {p}: {e.strerror or e}") from None
    if len(text) > MAX_RECIPE_CHARS:
        raise SpecError(f"merge recipe {p}: over {MAX_RECIPE_CHARS} characters")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"merge recipe {p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"merge recipe {p}: expected a mapping (merge_method:, models: or slices:, ...)")
    return data


def is_recipe_path(ref: str) -> bool:
    return ref.lower().endswith((".yaml", ".yml"))


_import_lock = threading.Lock()


def load_mergekit():
    """mergekit's config and method registry, imported under one lock: the first recipes a server checks
    arrive on concurrent request threads, and mergekit's imports (peft, transformers' lazy modules) are not
    safe to race."""
    with _import_lock:
        import mergekit.common
        import mergekit.config
        import mergekit.merge_methods.registry
    return mergekit


def check(recipe: dict):
    """mergekit's MergeConfiguration of `recipe`, or ValueError naming the field: unknown keys, mergekit's own
    validation, an unknown method, parameters the method does not take, LoRA references."""
    from pydantic import ValidationError
    mk = load_mergekit()
    MergeConfiguration, registry = mk.config.MergeConfiguration, mk.merge_methods.registry

    if not isinstance(recipe, dict):
        raise ValueError("merge: expected a mergekit recipe (a mapping with merge_method and models, slices or modules)")
    if len(json.dumps(recipe, default=str)) > MAX_RECIPE_CHARS:
        raise ValueError(f"merge: the recipe is over {MAX_RECIPE_CHARS} characters")
    unknown = _unknown_keys(MergeConfiguration, recipe, ("merge",))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a field of a mergekit recipe" +
                         (f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""))
    try:
        cfg = MergeConfiguration.model_validate(recipe)
    except ValidationError as e:
        x = e.errors()[0]
        raise ValueError(f"merge.{'.'.join(map(str, x['loc']))}: {x['msg']}") from None
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, AssertionError) as e:  # mergekit's own
        raise ValueError(f"merge: {e}") from None
    names = sorted(m.spec.name for m in registry.registered_methods())
    if cfg.merge_method not in names:
        raise ValueError(f"merge.merge_method: unknown method {cfg.merge_method!r}; mergekit {mergekit_version()} "
                         f"has {', '.join(names)}")
    takes = {p.name for p in registry.get(cfg.merge_method).spec.parameters}
    for where, params in _parameter_sets(recipe):
        extra = sorted(set(params) - takes)
        if extra:
            raise ValueError(f"{where}: {cfg.merge_method} takes no parameter {extra[0]!r} "
                             f"(its parameters: {', '.join(sorted(takes)) or 'none'})")
    _check_chat_template(cfg.chat_template)
    refs = _references(recipe)
    if any(r.lora is not None for r in refs.values()):
        raise ValueError("merge: LoRA references (model+adapter) are not supported by quantfarm; merge the adapter "
                         "into its model first and name that model")
    if len({str(r.model) for r in refs.values()}) > MAX_SOURCES:
        raise ValueError(f"merge: at most {MAX_SOURCES} source models")
    return cfg


def chat_templates() -> list[str]:
    """The chat_template names mergekit resolves itself: "auto" (the sources' own) and its package's templates."""
    import importlib.resources

    from mergekit._data import chat_templates as package
    return ["auto", *sorted(p.name.removesuffix(".jinja") for p in importlib.resources.files(package).iterdir()
                            if p.name.endswith(".jinja"))]


def _check_chat_template(value: str | None) -> None:
    """A name of chat_templates(), or the template's Jinja text inline. mergekit reads any other short string
    without "{" as the file `<its templates folder>/VALUE.jinja`, and an absolute path or `..` there escapes
    that folder: `/etc/passwd` would read /etc/passwd.jinja into the merged model's chat_template.jinja."""
    if value is None or value in chat_templates() or ("{" in value and len(value) >= 20):
        return
    raise ValueError(f"merge.chat_template: {value[:100]!r} is not one of mergekit's templates "
                     f"({', '.join(chat_templates())}); give one of those, the template's Jinja text itself, or "
                     "leave it out to keep the base model's")


def model_paths(recipe: dict) -> list[str]:
    """Every model a checked recipe references (base_model, models, slices' sources, tokenizer_source, a
    tokenizer's embedding sources) as mergekit reads its path (org/name@rev or a folder)."""
    return sorted({str(r.model) for r in _references(recipe).values()})


def _unknown_keys(cls, data, loc: tuple) -> list[str]:
    """Dotted paths of the keys in `data` that mergekit's model `cls` (and the models nested in it) has no field for."""
    if not isinstance(data, dict):
        return []
    out = []
    for k, v in data.items():
        f = cls.model_fields.get(k)
        if f is None:
            out.append(".".join(map(str, (*loc, k))))
        elif k != "parameters":                       # parameter names are the method's: checked against it
            out += _unknown_in(f.annotation, v, (*loc, k))
    return out


def _unknown_in(ann, value, loc: tuple) -> list[str]:
    from pydantic import BaseModel
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return _unknown_keys(ann, value, loc)
    if origin in (typing.Union, types.UnionType):             # the member the value's shape fits, fewest unknowns
        def fits(a):
            o = typing.get_origin(a)
            if isinstance(value, dict):
                return o is dict or (isinstance(a, type) and issubclass(a, BaseModel))
            return isinstance(value, list) and o in (list, tuple)
        tries = [_unknown_in(a, value, loc) for a in args if fits(a)]
        return min(tries, key=len) if tries else []
    if origin in (list, tuple) and isinstance(value, list) and args:
        return [u for i, v in enumerate(value) for u in _unknown_in(args[0], v, (*loc, i))]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [u for k, v in value.items() for u in _unknown_in(args[1], v, (*loc, k))]
    return []


def _parameter_sets(node, loc: str = "merge"):
    """(where, parameter mapping) for every `parameters:` in the recipe."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "parameters" and isinstance(v, dict):
                yield f"{loc}.parameters", v
            else:
                yield from _parameter_sets(v, f"{loc}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _parameter_sets(v, f"{loc}.{i}")


def _is_ref(value) -> bool:
    return (isinstance(value, str) and value not in ("union", "base")) or \
        (isinstance(value, dict) and "model" in value and "kind" not in value)


def _map_refs(node, fn):
    """The recipe with every model reference replaced by fn(reference as written)."""
    if isinstance(node, list):
        return [_map_refs(v, fn) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: fn(v) if k in REF_KEYS and _is_ref(v) else v if k == "parameters" else _map_refs(v, fn)
            for k, v in node.items()}


def _references(recipe: dict) -> dict:
    """{reference as written (JSON): mergekit's ModelReference} for every model the recipe names."""
    from mergekit.common import ModelReference
    found = {}

    def note(v):
        found[json.dumps(v, sort_keys=True)] = ModelReference.model_validate(v)
        return v
    _map_refs(recipe, note)
    return found


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

        from .models import fp16_folder

        def local(v):
            r = ModelReference.model_validate(v)
            return {"model": {"path": str(fp16_folder(self.sources[str(r.model)]))},
                    **({"override_architecture": r.override_architecture} if r.override_architecture else {})}
        return _map_refs(self.recipe, local)

    def out_config(self):
        """The merged model's transformers config without merging: the base's, with the layer count of
        the slices (as mergekit sets it)."""
        from transformers import AutoConfig

        from .models import fp16_folder
        cfg = AutoConfig.from_pretrained(fp16_folder(self.base()), trust_remote_code=False, local_files_only=True)
        if self.config.slices:
            text = getattr(cfg, "text_config", cfg)
            text.num_hidden_layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
                                         for s in self.config.slices)
        return cfg


def identity(src) -> str:
    """What a source is, wherever it lies: a Hub repo at its commit, other sources by content hash."""
    return f"{src.ref.split('@', 1)[0]}@{src.revision}" if src.kind == "hub" else f"{src.kind}:{src.content_hash}"


def pin(recipe: dict, *, allow_pickle: bool = False, trust_remote_code: bool = False,
        local_roots: list | None = None, weights: bool = True, on_step=None, should_stop=None) -> Merge:
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
            src = resolve_model(p, None, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                local_roots=local_roots, weights=weights, on_step=on_step, should_stop=should_stop)
        except ModelSourceError as e:
            raise type(e)(f"merge source {p}: {e}") from None
        sources[p] = src

    def ident(v):
        return identity(sources[str(ModelReference.model_validate(v).model)])
    canon = json.dumps({"recipe": _map_refs(recipe, ident), "seed": SEED, "mergekit": mergekit_version()},
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
    tmp = m.folder.with_name(f".{m.folder.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    options = MergeOptions(quiet=True, random_seed=SEED, copy_tokenizer=True,
                           trust_remote_code=any(s.trust_remote_code for s in m.sources.values()),
                           write_model_card=False, lazy_unpickle=False, allow_crimes=False)
    t = time.perf_counter()
    try:
        with _build_lock:
            saved, mergekit.graph.tqdm = mergekit.graph.tqdm, _Steps(on_step, should_stop)
            try:
                run_merge(MergeConfiguration.model_validate(m.local_recipe()), str(tmp), options)
            finally:
                mergekit.graph.tqdm = saved
        _write_provenance(m, tmp, time.perf_counter() - t)
        m.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, m.folder)
        except OSError:
            if not m.built:                              # another process's merge is as good as ours
                raise
    except (RuntimeError, ValueError, KeyError, AssertionError, IndexError) as e:
        raise ModelSourceError(f"mergekit could not merge the recipe ({m.method}): {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    from .models import ResolvedModel
    return ResolvedModel("merge", name, str(m.folder), None, None, m.key,
                         allow_pickle=any(s.allow_pickle for s in m.sources.values()),
                         trust_remote_code=any(s.trust_remote_code for s in m.sources.values()), merge=m)


def resolve_source(spec, *, local_roots=None, build_merge: bool = True, weights: bool = True,
                   on_step=lambda s: None, should_stop=None):
    """A JobSpec's or ReleaseSpec's source: its model resolved, or its merge recipe pinned (and merged when
    `build_merge`). `weights=False`: Hub weights left pending, for `complete` after the caller's checks."""
    from .models import resolve_model
    flags = dict(allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code)
    steps = dict(weights=weights, on_step=on_step, should_stop=should_stop)
    if getattr(spec, "merge", None) is None:
        return resolve_model(spec.model, spec.revision, local_roots=local_roots, **flags, **steps)
    m = pin(spec.merge, local_roots=local_roots, **flags, **steps)
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
    from .models import load_tokenizer
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
