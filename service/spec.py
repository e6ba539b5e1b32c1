"""JobSpec: the one description of a quantization request, used by the CLI (and later the API, the
batch runner and the store). Its canonical JSON, hashed with the pinned model revision, is the
recipe key: the same key means the same artifact."""
import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantizers.driver import QuantConfig


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field("auto", description="auto | c4 | wikitext2 | model | a .txt/.jsonl path | hf:NAME[:CONFIG[:SPLIT]]")
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=16, le=131_072)
    seed: int = 0


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suite: Literal["perplexity", "none"] = "perplexity"
    text: str | None = Field(None, description="held-out text source; default WikiText-2 validation when present")
    windows: int = Field(32, ge=1)
    window_len: int = Field(512, ge=16)


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, examples=["smollm2-135m", "meta-llama/Llama-3.1-8B"])
    revision: str | None = None
    algorithm: Literal["gptq", "rtn"] = "gptq"
    format: Literal["gptq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = True           # with static_groups: "static act-order", free at inference time
    static_groups: bool = True
    true_sequential: bool = True
    damp_percent: float = Field(0.01, ge=0.0, le=1.0)
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v != -1 and v < 1:
            raise ValueError("group_size must be -1 (one group per row) or a positive number of columns")
        return v

    def quant_config(self) -> QuantConfig:
        return QuantConfig(algorithm=self.algorithm, bits=self.bits, group_size=self.group_size, sym=self.sym,
                           desc_act=self.desc_act, static_groups=self.static_groups,
                           true_sequential=self.true_sequential, damp_percent=self.damp_percent)

    def recipe(self, revision: str) -> dict:
        """What determines the artifact: the spec less its evaluation, plus the pinned source."""
        d = self.model_dump(exclude={"evaluation", "revision", "allow_pickle", "trust_remote_code"})
        d["source_revision"] = revision
        return d

    def recipe_key(self, revision: str) -> str:
        canon = json.dumps(self.recipe(revision), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()
