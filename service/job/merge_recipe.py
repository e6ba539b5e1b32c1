"""Merge recipes checked: a mergekit YAML read, validated by mergekit, and every key and parameter name checked
against mergekit's own schema and the method's own parameter list, before anything is fetched (the spec's
validation: HTTP 422 on a farm). Pinning and merging a checked recipe: merge.py.

Why check the recipe here and not only in mergekit: mergekit's pydantic models ignore unknown keys, so a
typo (`paramters:`, `wieght:`) would merge silently without the setting. No torch here: the client commands
read recipe files through this module.
"""
from __future__ import annotations

import json
import threading
import types
import typing
from importlib.metadata import version
from pathlib import Path

from core.errors import SpecError

REF_KEYS = ("model", "base_model", "tokenizer_source", "source")   # where mergekit takes a model reference
MAX_RECIPE_CHARS = 64_000
MAX_SOURCES = 16


def mergekit_version() -> str:
    return version("mergekit")


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


def map_refs(node, fn):
    """The recipe with every model reference replaced by fn(reference as written)."""
    if isinstance(node, list):
        return [map_refs(v, fn) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: fn(v) if k in REF_KEYS and _is_ref(v) else v if k == "parameters" else map_refs(v, fn)
            for k, v in node.items()}


def _references(recipe: dict) -> dict:
    """{reference as written (JSON): mergekit's ModelReference} for every model the recipe names."""
    from mergekit.common import ModelReference
    found = {}

    def note(v):
        found[json.dumps(v, sort_keys=True)] = ModelReference.model_validate(v)
        return v
    map_refs(recipe, note)
    return found
