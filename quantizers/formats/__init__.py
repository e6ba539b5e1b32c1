"""The table of checkpoint formats. Adding a format = one module with a Format subclass (base.py says
what it implements) and one line here; a format the layer walk does not pack (GGUF) names its maker in
service/job's MAKERS."""
from core.errors import ArtifactError, SpecError

from .awq import AWQ
from .base import Format, Usage, Verdict
from .compressed_tensors import CompressedTensors
from .gguf import GGUF
from .gptq import GPTQ

FORMATS: dict[str, Format] = {f.name: f for f in (
    GPTQ(),
    AWQ(),
    CompressedTensors(),
    GGUF(),
)}


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise SpecError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


def of_config(qc: dict) -> Format:
    """The format an artifact's quantization_config is written in."""
    for f in FORMATS.values():
        if f.quant_method is not None and f.quant_method == qc.get("quant_method"):
            return f
    raise ArtifactError(f"cannot read quant_method {qc.get('quant_method')!r}")


__all__ = ["FORMATS", "Format", "Usage", "Verdict", "get", "of_config"]
