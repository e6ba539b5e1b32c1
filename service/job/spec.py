"""JobSpec: the one description of a quantization request, used by the CLI, the API, the workers and
the store. Its canonical JSON, hashed with the pinned model revision, is the
recipe key: the same key means the same artifact."""
import hashlib
import itertools
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evaluation.suite import PATH_MAX, Evaluation
from quantizers.algorithms import ALGORITHMS
from quantizers.config import QuantConfig
from quantizers.formats import FORMATS
from quantizers.formats import gguf as gguf_format
from quantizers.scheme import ActOrder, Scheme


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


def settings_label(algorithm: str, fmt: str, bits: int, group_size: int, sym: bool | None,
                   gguf_type: str | None = None) -> str:
    """A name from the weight settings: gptq-w4-g128, gptq-compressed-tensors-w8-pc, rtn-gptq-w4-g64-asym,
    gguf-q4_k_m."""
    if fmt == "gguf":
        return f"gguf-{(gguf_type or DEFAULT_GGUF_TYPE).lower()}"
    g = "pc" if group_size == -1 else f"g{group_size}"
    fmt = "" if fmt == algorithm else f"{fmt}-"
    return f"{algorithm}-{fmt}w{bits}-{g}" + ("-asym" if sym is False and algorithm != "awq" else "")


DEFAULT_GGUF_TYPE = "Q4_K_M"
ALL_FORMATS = (*FORMATS, "gguf")                 # gguf: made by llama.cpp's tools (formats/gguf.py), not packed here
# What GGUF does not use: llama-quantize's type sets the bits and blocks, its own rounding quantizes.
NOT_FOR_GGUF = ("algorithm", "bits", "group_size", "sym", "act_order", "true_sequential", "damp_percent", "keep")
GGUF_FIELDS = ("gguf_type", "imatrix", "gguf_shard")

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


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=300, examples=["smollm2-135m", "meta-llama/Llama-3.1-8B"],
                       description="a Hub id (org/name[@revision]), a local folder or .gguf file, a demo name; with "
                                   "`merge`: the merged model's name")
    revision: str | None = Field(None, max_length=256)
    merge: dict | None = Field(None, description="a mergekit recipe (merge_method, models/slices, parameters, ...): "
                               "its sources are merged and the merge is quantized; `model` then names the merged "
                               "model", examples=[{"merge_method": "slerp", "base_model": "org/a", "models": [
                                   {"model": "org/a"}, {"model": "org/b"}], "parameters": {"t": 0.5}}])
    algorithm: Literal[tuple(ALGORITHMS)] = Field("gptq", description="how weights are quantized")
    format: Literal[ALL_FORMATS] = Field("gptq", description="how they are stored")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, ge=-1, le=65_536, description="columns per group, -1 for one group per row")
    sym: bool | None = Field(None, description="symmetric grid; default true for gptq/rtn, false for awq")
    act_order: ActOrder = Field(ActOrder.STATIC, description="GPTQ column order by descending Hessian diagonal: "
                                "static (groups keep their natural columns: free at inference), dynamic (classic "
                                "desc_act: non-monotonic g_idx), none")
    true_sequential: bool = True
    damp_percent: float = Field(0.01, ge=0.0, le=1.0)
    keep: list[str] = Field([], max_length=64, description="module names (fnmatch patterns, e.g. "
                            "'*.mlp.experts.*.down_proj') to leave in 16 bits on purpose")
    gguf_type: str | None = Field(None, max_length=16, description="format gguf: the llama-quantize type "
                                  f"({', '.join(gguf_format.TYPES)}); default {DEFAULT_GGUF_TYPE}")
    imatrix: Literal[gguf_format.IMATRIX] = Field("quantfarm", description="format gguf: the importance matrix "
                                                  "llama-quantize uses: quantfarm (from the calibration forward), "
                                                  "llama (llama.cpp's llama-imatrix on the calibration text), none")
    gguf_shard: str | None = Field(None, pattern=r"^[1-9][0-9]{0,5}[MG]$",
                                   description="format gguf: split files into parts of at most this size "
                                               "(e.g. 4G) with llama-gguf-split; unset: files over 48 GB are "
                                               "split at 48G (the Hub takes at most 50 GB a file)")
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

    @field_validator("publish")
    @classmethod
    def _targets(cls, v):
        return check_targets(v)

    @field_validator("merge")
    @classmethod
    def _merge(cls, v):
        return check_merge(v)

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v != -1 and v < 1:
            raise ValueError("group_size must be -1 (one group per row) or a positive number of columns")
        return v

    @model_validator(mode="after")
    def _algorithm_settings(self):
        if self.algorithm == "awq" and self.sym:
            raise ValueError("sym: AWQ quantizes with zero points; leave sym unset (or false) with algorithm awq")
        return self

    @model_validator(mode="after")
    def _gguf_settings(self):
        if self.format != "gguf":
            given = [f for f in GGUF_FIELDS if f in self.model_fields_set and getattr(self, f) != type(self)
                     .model_fields[f].default]
            if given:
                raise ValueError(f"{', '.join(given)}: only for format gguf")
            return self
        changed = [f for f in NOT_FOR_GGUF if getattr(self, f) != type(self).model_fields[f].default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: not used by format gguf, whose type (gguf_type, e.g. Q4_K_M) "
                             "sets the bits and llama-quantize quantizes; leave them unset")
        self.gguf_type = (self.gguf_type or DEFAULT_GGUF_TYPE).upper()
        try:
            gguf_format.gguf_type(self.gguf_type)
        except Exception as e:
            raise ValueError(str(e)) from None
        problems = gguf_format.problems(self.gguf_type, self.imatrix)
        if problems:
            raise ValueError(problems[0])
        return self

    @property
    def symmetric(self) -> bool:
        return self.algorithm != "awq" if self.sym is None else self.sym

    def quant_config(self) -> QuantConfig:
        act = self.act_order if self.algorithm == "gptq" else ActOrder.NONE      # act-order is GPTQ's
        return QuantConfig(algorithm=self.algorithm, scheme=Scheme(self.bits, self.group_size, self.symmetric, act),
                           true_sequential=self.true_sequential, damp_percent=self.damp_percent,
                           keep=tuple(self.keep))

    def label(self) -> str:
        """The artifact's name where it is published."""
        return self.name or settings_label(self.algorithm, self.format, self.bits, self.group_size, self.sym,
                                           self.gguf_type)

    def recipe(self, revision: str) -> dict:
        """What determines the artifact: the spec less its evaluation, plus the pinned source (of a merge: the
        hash of its recipe and its sources' revisions)."""
        d = self.model_dump(exclude={"evaluation", "revision", "merge", "allow_pickle", "trust_remote_code", "priority",
                                     "publish", "min_recovery", "name",
                                     *(NOT_FOR_GGUF if self.format == "gguf" else GGUF_FIELDS)})
        if self.format == "gguf" and self.imatrix == "none":
            d.pop("calibration")                # without an importance matrix nothing is calibrated
        d["source_revision"] = revision
        return d

    def recipe_key(self, revision: str) -> str:
        canon = json.dumps(self.recipe(revision), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()
