"""A release: one model at one pinned revision, quantized into several variants (the TheBloke /
mradermacher pattern). Each variant is an ordinary job (its own artifact, report and state, deduplicated
by its recipe key like any job); the release names them, shares what does not depend on the variant
(see shared.py) and says how they went together.
"""

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import SpecError
from evaluation.suite import Evaluation
from quantizers import formats
from quantizers.formats.gguf import PRESET as GGUF_PRESET

from .context import JobContext
from .spec import Calibration, JobSpec, WeightSettings, _no_nul, check_merge, check_targets, local_targets

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_VARIANTS = 32

# What a variant may set (the weight settings and the tables' knobs); everything else (model, calibration,
# evaluation, publishing) is the release's.
VARIANT_FIELDS = tuple(WeightSettings.model_fields)


def _v(name, algorithm, fmt, bits, group_size, **kw) -> dict:
    return dict(name=name, algorithm=algorithm, format=fmt, bits=bits, group_size=group_size, **kw)


def _g(gguf_type: str) -> dict:
    return dict(name=f"gguf-{gguf_type.lower()}", format="gguf", gguf_type=gguf_type)


def _s(scheme: str, **kw) -> dict:
    return dict(scheme=scheme, **kw)         # named by its settings: gptq-w8a8, rtn-fp8-dynamic


GGUF = [_g(t) for t in GGUF_PRESET]             # the sizes llama.cpp users pick from, with quantfarm's imatrix

# The field's usual sets. GPTQ act-order is the static kind: the quality of act-order with groups that keep
# their natural columns, which every runtime loads (vLLM refuses the dynamic kind, TheBloke's desc_act=True).
PRESETS = {
    "vllm": [_v("gptq-w4-g128", "gptq", "gptq", 4, 128), _v("awq-w4-g128", "awq", "awq", 4, 128),
             _v("w4a16", "gptq", "compressed-tensors", 4, 128), _v("w8a16", "gptq", "compressed-tensors", 8, -1)],
    "thebloke": [_v("gptq-4bit-128g-actorder", "gptq", "gptq", 4, 128, act_order="static"),
                 _v("gptq-4bit-32g-actorder", "gptq", "gptq", 4, 32, act_order="static"),
                 _v("gptq-8bit-128g-actorder", "gptq", "gptq", 8, 128, act_order="static"),
                 _v("awq-4bit-128g", "awq", "awq", 4, 128), *GGUF],
    "gguf": GGUF,
    # by hardware, as llm-compressor's guide pairs schemes with it (quantizers/schemes.py); Blackwell's NVFP4
    # is not made yet, so there is no `blackwell` preset
    "hopper": [_s("FP8_DYNAMIC"), _s("W4A16")],
    "ampere": [_s("W4A16"), _s("W8A16")],
    "cpu": [_s("W8A8"), _g("Q4_K_M")],
}


class Variant(WeightSettings):
    """One artifact of a release: the weight settings (checked against the tables as a job's are), the rest
    from the release."""
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, pattern=NAME, description="folder and repo suffix; default from the settings")


class ReleaseSpec(BaseModel):
    """What `quantfarm release` and POST /v1/releases take: a model, its variants (a list or a preset),
    and the settings every variant shares."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=300, description="the source; with `merge`: the merged model's name")
    revision: str | None = Field(None, max_length=256)
    merge: dict | None = Field(None, description="a mergekit recipe: every variant quantizes its merge (made once)")
    preset: str | None = Field(None, description=" | ".join(PRESETS))
    variants: list[Variant] = Field([], max_length=MAX_VARIANTS)
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    allow_pickle: bool = False
    trust_remote_code: bool = False
    priority: int = Field(0, ge=-100, le=100)
    publish: list[str] = Field(["local"], max_length=4)
    min_recovery: float | None = Field(None, gt=0, le=2)

    @model_validator(mode="before")
    @classmethod
    def _refuse_nul(cls, data):
        _no_nul(data)
        return data

    @field_validator("variants", mode="wrap")
    @classmethod
    def _name_the_variant(cls, value, handler):
        """A variant the tables refuse is named in the error as variants[i] (its label), as a job's would be."""
        try:
            return handler(value)
        except ValidationError as e:
            err = e.errors()[0]
            if len(err["loc"]) != 1 or not isinstance(err["loc"][0], int) or not isinstance(value[err["loc"][0]], dict):
                raise                                   # a field's own error keeps pydantic's location
            i = err["loc"][0]
            raise ValueError(f"variants[{i}] ({Variant.model_construct(**value[i]).label()}): "
                             f"{err['msg'].removeprefix('Value error, ')}") from None

    @field_validator("publish")
    @classmethod
    def _targets(cls, v):
        return check_targets(v)

    @field_validator("merge")
    @classmethod
    def _merge(cls, v):
        return check_merge(v)

    @model_validator(mode="after")
    def _one_source_of_variants(self):
        if (self.preset is None) == (not self.variants):
            raise ValueError(f"give a preset ({', '.join(PRESETS)}) or a list of variants, not both nor neither")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        names = [v.label() for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)} (give each a name)")
        for i, v in enumerate(self.variants):        # each variant must be a valid job on its own
            try:
                self._job(v)
            except ValidationError as e:
                why = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'settings'}: {x['msg']}".replace("Value error, ", "")
                                for x in e.errors())
                raise ValueError(f"variants[{i}] ({v.label()}): {why}") from None
        return self

    def _job(self, v: Variant, revision: str | None = None) -> JobSpec:
        common = self.model_dump(include={"model", "merge", "calibration", "evaluation", "allow_pickle", "trust_remote_code",
                                          "priority", "publish", "min_recovery"})
        return JobSpec.model_validate({**common, **v.model_dump(include=set(VARIANT_FIELDS)),
                                       "revision": revision or self.revision, "name": v.label()})

    def variant_list(self, input_widths: set[int] | None = None) -> list[tuple[Variant, str | None]]:
        """The variants with, for a preset, groups fitted to the model: a preset's g128 on a model whose
        inputs are not multiples of 128 (SmolLM2's 576) would be ragged, which vLLM refuses, so it takes the
        largest power-of-two group dividing every input width; the note says so (None: as given)."""
        if self.preset is None:
            return [(v, None) for v in self.variants]
        out = []
        for d in PRESETS[self.preset]:
            v, note = Variant.model_validate(d), None
            g = v.group_size
            grouped = "group_size" not in formats.get(v.format).ignores
            if grouped and input_widths and g > 0 and any(w % g for w in input_widths):
                fit = next((c for c in (g // 2 ** k for k in range(1, 8)) if c >= 16 and not any(w % c for w in input_widths)), None)
                if fit is None:
                    note = f"group {g} is ragged on input widths {sorted(input_widths)} and no group of 16 or more fits; kept"
                else:
                    note = f"group {g} -> {fit}: input widths {sorted(input_widths)} are not all multiples of {g}"
                    name = v.label().replace(f"g{g}", f"g{fit}").replace(f"{g}g", f"{fit}g")
                    if v.scheme:      # the named scheme fixes its group: what is written is its grid at the new one
                        note += f" ({v.scheme}'s grid at group {fit}, so not named {v.scheme})"
                        name += f"-g{fit}"
                    v = v.model_copy(update={"group_size": fit, "name": name, "scheme": None})
            out.append((v, note))
        return out

    def jobs(self, revision: str, input_widths: set[int] | None = None) -> list[tuple[str, JobSpec, str | None]]:
        """(variant name, its job at the pinned revision, the fitting note) for every variant."""
        return [(v.label(), self._job(v, revision), note) for v, note in self.variant_list(input_widths)]


def load_variants(text_or_preset: str) -> dict:
    """--variants: a preset name, or a YAML/JSON file with a list of variants (or {variants: [...]})."""
    from pathlib import Path

    import yaml
    if text_or_preset in PRESETS:
        return {"preset": text_or_preset}
    p = Path(text_or_preset)
    if not p.is_file():
        raise SpecError(f"--variants {text_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) <= {"variants", "preset"}:
        return data
    if isinstance(data, list):
        return {"variants": data}
    raise SpecError(f"{p}: expected a list of variants or a mapping with `variants:`")


def state(job_states: list[str]) -> str:
    """A release's own state from its jobs': running until all end; then succeeded (all), gated (none
    failed but some missed the quality gate), partial (some succeeded, some failed or were cancelled),
    failed (none succeeded)."""
    if any(s in ("queued", "running") for s in job_states):
        return "running"
    if all(s == "succeeded" for s in job_states):
        return "succeeded"
    if "succeeded" not in job_states and "failed_quality" not in job_states:
        return "failed"
    if all(s in ("succeeded", "failed_quality") for s in job_states):
        return "gated"
    return "partial"


def input_widths(src) -> set[int] | None:
    """Every Linear input width of the model, from its config (None when it cannot be read there)."""
    from .facts import model_facts
    facts = model_facts(src)
    return None if facts is None else {i for i, _ in facts.shapes}


def run(rs: ReleaseSpec, ctx, on_variant=lambda name, i, n: None, **settings) -> dict:
    """Every variant in this process, one after another, sharing what does not depend on the variant (the
    context's Shared); a variant that fails is recorded and the next one runs. Writes the release summary
    into ctx.out_dir (one folder per variant inside it) and returns it. `ctx`: a JobContext, or the
    release's folder with JobContext's other fields as keywords."""
    ctx = ctx if isinstance(ctx, JobContext) else JobContext(ctx, **settings)
    import dataclasses
    from pathlib import Path

    from core.errors import QuantfarmError
    from evaluation import release_report, report

    from . import pipeline, publish, storage
    from .merge import resolve_source

    out_root, shared = Path(ctx.out_dir), ctx.shared
    storage.check_writable(out_root / "release.json")
    targets = local_targets(rs.publish)
    src = resolve_source(rs, build_merge=False, weights=False)     # weights: by the first job, after its checks
    revision = src.revision or src.content_hash
    jobs = rs.jobs(revision, input_widths(src))     # at the pinned revision: they find the source resolved
    if src.merge is None:
        shared.put("resolve", pipeline.resolve_key(jobs[0][1], None), src)
    for _name, job, _note in jobs:                     # every variant's folder is checked before the first runs
        storage.check_replaceable(out_root / _name, ctx.overwrite)
    rows = []
    for i, (name, job, note) in enumerate(jobs):
        on_variant(name, i, len(jobs))
        try:
            r = pipeline.run(job, dataclasses.replace(ctx, out_dir=out_root / name))
        except QuantfarmError as e:
            rows.append(release_report.row(name, "failed", None, error=str(e), note=note))
            continue
        gate = pipeline.quality_failure(job.min_recovery, r.evaluation)
        published, why = [], gate
        if not gate:                                   # the quality gate decides what is published
            published, _, why = publish.publish_each(r.artifact, job, targets)
        row = release_report.row(name, "failed_quality" if gate else "publish_failed" if why else "succeeded",
                                 report.read(r.artifact), error=why, note=note)
        rows.append({**row, "published": published})
    s = release_report.summary({"folder": str(out_root), "model": rs.model, "revision": revision, "hub_model": src.revision is not None,
                                "preset": rs.preset, "state": state([r["state"] for r in rows]),
                                "shared": dict(shared.reused)}, rows)
    release_report.write(out_root, s)
    return s
