"""JobSpec: the one description of a quantization request, used by the CLI, the API, the workers and
the store. Its canonical JSON, hashed with the pinned model revision, is the
recipe key: the same key means the same artifact."""
import hashlib
import itertools
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from evaluation.suite import PATH_MAX, Evaluation
from quantizers.algorithms import ALGORITHMS
from quantizers.config import QuantConfig
from quantizers.formats import FORMATS
from quantizers.scheme import ActOrder, Scheme
from quantizers.schemes import SCHEMES


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field("auto", max_length=PATH_MAX,
                        description="auto | c4 | wikitext2 | model | a .txt/.jsonl path | hf:NAME[:CONFIG[:SPLIT]]")
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=16, le=131_072)
    seed: int = Field(0, ge=0, le=2 ** 32 - 1)


def _no_nul(value, where: str = ""):
    """NUL characters are refused everywhere: no path, id or store column can hold one."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{where or 'a value'} contains a NUL character")
    if isinstance(value, dict):
        for k, v in itertools.islice(value.items(), 200):
            _no_nul(k, where or "a field name")
            _no_nul(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:100]):
            _no_nul(v, f"{where}[{i}]")


TARGET_NAME = r"^[a-z][a-z0-9_-]{0,31}$"       # a destination a farm's administrator named (--publish-target)


def check_targets(targets: list[str]) -> list[str]:
    """Publish entries that parse: local, hub[:ORG], a URL, or the name of a server's target; whether a
    server allows each is the farm's call, and a name means nothing outside a farm (`targets` there)."""
    from core.errors import SpecError

    from .publish import parse_target
    try:
        return [t if re.match(TARGET_NAME, t) and t not in ("local", "hub") else str(parse_target(t, allow_urls=True))
                for t in targets]
    except SpecError as e:
        raise ValueError(str(e)) from None


def check_merge(recipe: dict | None) -> dict | None:
    """A merge recipe mergekit accepts, every key and parameter known (service/job/merge.py)."""
    if recipe is not None:
        from .merge import check
        check(recipe)
    return recipe


def local_targets(targets: list[str]) -> list:
    """(entry, Target) for a run here: URLs and hub are fine, a farm's target names are not known here."""
    from .publish import parse_target
    return [(t, parse_target(t, allow_urls=True)) for t in targets]


def _knob_owners() -> dict[str, tuple[str, str, tuple]]:
    """{knob: (kind, owner, (type, Field))} for every knob an algorithm or a format of the tables declares."""
    out = {}
    for kind, table, attr in (("algorithm", ALGORITHMS, "KNOBS"), ("format", FORMATS, "knobs")):
        for name, entry in table.items():
            for k, decl in getattr(entry, attr).items():
                out[k] = (kind, name, decl)
    return out


KNOBS = _knob_owners()


def settings_label(s) -> str:
    """A name from the weight settings (`s`: a JobSpec or a release's Variant): gptq-w4-g128,
    gptq-compressed-tensors-w8-pc, rtn-gptq-w4-g64-asym; a format may name its own (gguf-q4_k_m)."""
    own = FORMATS[s.format].label(s)
    if own:
        return own
    if s.scheme:
        return f"{s.algorithm}-{s.scheme.lower().replace('_', '-')}"
    g = "pc" if s.group_size == -1 else f"g{s.group_size}"
    fmt = "" if s.format == s.algorithm else f"{s.format}-"
    asym = s.sym is False and not ALGORITHMS[s.algorithm].SYM_FIXED
    return f"{s.algorithm}-{fmt}w{s.bits}-{g}" + ("-asym" if asym else "")


class _Weights(BaseModel):
    """How the weights are quantized and stored: what a release's variant may set. The algorithms' and
    formats' own knobs are added from the tables (WeightSettings below), and checked against them."""
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal[tuple(ALGORITHMS)] = Field("gptq", description="how weights are quantized")
    format: Literal[tuple(FORMATS)] = Field("gptq", description="how they are stored (with a scheme: "
                                            "compressed-tensors unless given)")
    scheme: Literal[tuple(SCHEMES)] | None = Field(
        None, description="a named scheme (llm-compressor's presets): W4A16, W4A16_ASYM, W8A16, W8A8 (int8 weights per "
        "channel, int8 activations per token), FP8_DYNAMIC (FP8 weights per channel, FP8 activations per token), ...; "
        "it sets bits, group_size and sym (given ones must agree) and, for activation schemes, the compressed-tensors "
        "layout; FP8 weights default to algorithm rtn")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, ge=-1, le=65_536, description="columns per group, -1 for one group per row")
    sym: bool | None = Field(None, description="symmetric grid; default: the algorithm's (true for gptq/rtn, "
                             "false for awq)")
    act_order: ActOrder | None = Field(None, description="GPTQ column order by descending Hessian diagonal: static "
                                       "(groups keep their natural columns: free at inference), dynamic (classic "
                                       "desc_act: non-monotonic g_idx), none; default: the algorithm's (static for "
                                       "gptq, none for the others)")
    true_sequential: bool = True
    damp_percent: float = Field(0.01, ge=0.0, le=1.0)
    keep: list[str] = Field([], max_length=64, description="module names (fnmatch patterns, e.g. "
                            "'*.mlp.experts.*.down_proj') to leave in 16 bits on purpose")

    @model_validator(mode="before")
    @classmethod
    def _gptq_flags(cls, data):
        """GPTQ's historical desc_act/static_groups (specs stored before act_order) as one act_order."""
        if isinstance(data, dict) and ("desc_act" in data or "static_groups" in data):
            if "act_order" in data:
                raise ValueError("give act_order, or the older desc_act/static_groups, not both")
            data = dict(data)
            data["act_order"] = ActOrder.of(bool(data.pop("desc_act", True)), bool(data.pop("static_groups", True)))
        return data

    @model_validator(mode="before")
    @classmethod
    def _named_scheme(cls, data):
        """A scheme fills the grid it fixes (a given bits/group_size/sym must agree), compressed-tensors when no
        format is given, and rtn for float weights when no algorithm is (GPTQ rounds onto integer grids)."""
        if not isinstance(data, dict) or not isinstance(data.get("scheme"), str) or data["scheme"] not in SCHEMES:
            return data                 # no scheme, or not one of the table's: the field's own check refuses it
        w = SCHEMES[data["scheme"]].weights
        fixed = {"bits": w.bits, "group_size": w.group_size or -1, "sym": w.symmetric}
        clash = [f"{k}={data[k]!r}" for k, v in fixed.items() if data.get(k) is not None and data[k] != v]
        if clash:
            raise ValueError(f"scheme {data['scheme']} fixes bits={w.bits}, group_size={fixed['group_size']}, "
                             f"sym={w.symmetric}; {', '.join(clash)} disagrees: leave it unset")
        data = {**data, **fixed}
        data.setdefault("format", "compressed-tensors")
        if w.type == "float":
            data.setdefault("algorithm", "rtn")
        return data

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v != -1 and v < 1:
            raise ValueError("group_size must be -1 (one group per row) or a positive number of columns")
        return v

    def _changed(self, field: str) -> bool:
        return getattr(self, field) != type(self).model_fields[field].default

    @model_validator(mode="after")
    def _against_tables(self):
        """Each knob only with its algorithm or format; the format's unused settings unset, its own settled;
        the algorithm's own refusals (AWQ's zero points, act-order for GPTQ only)."""
        fmt = FORMATS[self.format]
        stray: dict[str, list[str]] = {}
        for k, (kind, owner, _) in KNOBS.items():
            if owner != getattr(self, kind) and k in self.model_fields_set and self._changed(k):
                stray.setdefault(f"{kind} {owner}", []).append(k)
        if stray:
            owner, given = next(iter(stray.items()))
            raise ValueError(f"{', '.join(given)}: only for {owner}")
        changed = [f for f in fmt.ignores if self._changed(f)]
        if changed:
            raise ValueError(f"{', '.join(changed)}: not used by format {fmt.name}, {fmt.why_ignored}; leave them unset")
        for k, v in fmt.settle({k: getattr(self, k) for k in fmt.knobs}).items():
            setattr(self, k, v)
        if "algorithm" not in fmt.ignores:
            why = ALGORITHMS[self.algorithm].problems(self.weight_scheme(), ()) + fmt.holds(self.weight_scheme())
            if why:
                raise ValueError(why[0])
        return self

    def weight_scheme(self) -> Scheme:
        """The weight grid, each unset choice at the algorithm's default, and the named scheme if one is given
        (`scheme` is its name; this is the Scheme object the walk and the writers take)."""
        alg = ALGORITHMS[self.algorithm]
        return Scheme(self.bits, self.group_size, alg.SYM_DEFAULT if self.sym is None else self.sym,
                      alg.ACT_ORDER_DEFAULT if self.act_order is None else self.act_order, named=self.scheme)

    def label(self) -> str:
        """The artifact's name where it is published."""
        return getattr(self, "name", None) or settings_label(self)


WeightSettings = create_model("WeightSettings", __base__=_Weights, **{k: decl for k, (_, _, decl) in KNOBS.items()})


class JobSpec(WeightSettings):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=300, examples=["smollm2-135m", "meta-llama/Llama-3.1-8B"],
                       description="a Hub id (org/name[@revision]), a local folder or .gguf file, a demo name; with "
                                   "`merge`: the merged model's name")
    revision: str | None = Field(None, max_length=256)
    merge: dict | None = Field(None, description="a mergekit recipe (merge_method, models/slices, parameters, ...): "
                               "its sources are merged and the merge is quantized; `model` then names the merged "
                               "model", examples=[{"merge_method": "slerp", "base_model": "org/a", "models": [
                                   {"model": "org/a"}, {"model": "org/b"}], "parameters": {"t": 0.5}}])
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    allow_pickle: bool = False
    trust_remote_code: bool = False
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    publish: list[str] = Field(["local"], max_length=4, description="where a succeeded artifact is published: local "
                               "(the artifact store), hub (the server's Hub account) or a target the server names; "
                               "the CLI also takes URLs (file://, s3://, gs://)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                             description="the artifact's published name (a release's variant name; default from the "
                                         "settings, e.g. gptq-w4-g128)")
    min_recovery: float | None = Field(None, gt=0, le=2, description="quality gate: recovery (quantized / fp16 task "
                                       "average, or fp16 / quantized perplexity for a suite without tasks) below this "
                                       "ends the job failed_quality (artifact kept, not published)")

    @model_validator(mode="before")
    @classmethod
    def _refuse_nul(cls, data):
        _no_nul(data)
        return data

    @field_validator("publish")
    @classmethod
    def _targets(cls, v):
        return check_targets(v)

    @field_validator("merge")
    @classmethod
    def _merge(cls, v):
        return check_merge(v)

    def quant_config(self) -> QuantConfig:
        alg = ALGORITHMS[self.algorithm]
        return QuantConfig(algorithm=self.algorithm, scheme=self.weight_scheme(), true_sequential=self.true_sequential,
                           damp_percent=self.damp_percent, keep=tuple(self.keep),
                           **{k: getattr(self, k) for k in alg.KNOBS})

    def recipe(self, revision: str) -> dict:
        """What determines the artifact: the spec less its evaluation, the settings its format does not use
        and the knobs of other algorithms and formats (an algorithm's knobs only when set), plus the pinned
        source (of a merge: the hash of its recipe and its sources' revisions)."""
        fmt = FORMATS[self.format]
        other = {k for k, (kind, owner, _) in KNOBS.items()
                 if owner != getattr(self, kind) or (kind == "algorithm" and not self._changed(k))}
        unset = {"scheme"} if self.scheme is None else set()      # keys of jobs made before schemes stay the same
        d = self.model_dump(exclude={"evaluation", "revision", "merge", "allow_pickle", "trust_remote_code", "priority",
                                     "publish", "min_recovery", "name", *other, *unset, *fmt.ignores,
                                     *fmt.recipe_fields(self)})
        if "act_order" in d and self.act_order is None:
            # unset hashes as "static", the field's default before each algorithm declared its own: the keys of
            # jobs, artifacts and publications made before stay the same (migration 0004 unsets stored ones)
            d["act_order"] = ActOrder.STATIC
        d["source_revision"] = revision
        return d

    def recipe_key(self, revision: str) -> str:
        canon = json.dumps(self.recipe(revision), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()
