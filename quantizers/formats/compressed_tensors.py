"""compressed-tensors, what llm-compressor writes and vLLM runs natively. A scheme chooses the layout
(ct_layouts.py): integer grids with 16-bit activations are `pack-quantized` (FORMATS.md §3); the named
schemes that quantize activations too are `int-quantized` (W8A8) or `float-quantized` (FP8_DYNAMIC), with
their input_activations in the quantization_config so the runtime rounds each Linear's inputs as the
scheme says."""
import torch

from core.errors import ArtifactError

from ..activations import problem as activation_problem
from ..grid import QuantizedWeight
from ..scheme import ActOrder, Scheme
from ..schemes import Quant, named
from .base import Format, Usage, Verdict
from .ct_layouts import LAYOUTS, Layout

PACKED = LAYOUTS["pack-quantized"]


def layout_of(q: Scheme) -> Layout:
    return LAYOUTS[q.preset.layout] if q.named else PACKED


class CompressedTensors(Format):
    name = quant_method = "compressed-tensors"
    marker = PACKED.marker
    title = "compressed-tensors"

    def holds(self, q: Scheme) -> list[str]:
        if not q.named:
            return []
        p = q.preset
        out = [] if p.layout in LAYOUTS else [f"scheme {q.named}: writing compressed-tensors {p.layout} is not "
                                              "implemented yet"]
        if p.weights.type == "float" and p.weights.strategy not in ("channel", "tensor"):
            out.append(f"scheme {q.named}: {p.weights.strategy} FP8 weight scales are not implemented yet; "
                       "FP8_DYNAMIC (per channel) and FP8 (per tensor) are")
        why = activation_problem(p.activations)
        return out + ([f"scheme {q.named}: {why}"] if why else [])

    def check(self, q: Scheme, in_features: int, out_features: int) -> None:
        layout_of(q).check(q, in_features, out_features)

    def scale_dtype(self, storage: torch.dtype) -> torch.dtype:
        return storage                     # scales in the model's own 16-bit dtype

    def to_tensors(self, qw: QuantizedWeight, storage: torch.dtype) -> dict[str, torch.Tensor]:
        return PACKED.encode(qw, storage)

    def writer(self, qc: dict):
        encode, per_tensor = self._layout(qc).encode, self._group(qc)["weights"].get("strategy") == "tensor"
        return lambda qw, storage: encode(qw, storage, per_tensor)

    def needs_calibration(self, s, algorithm_needs_data: bool) -> bool:
        return algorithm_needs_data or s.weight_scheme().static_inputs

    def unpack(self, t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
        return PACKED.decode(t, bits, group_size, sym)

    def config(self, q: Scheme, algorithm: dict, meta: dict) -> tuple[dict, dict[str, dict]]:
        layout = layout_of(q).name
        weights = {"num_bits": q.bits, "type": q.weight_type, "symmetric": q.sym,
                   "strategy": "tensor" if q.per_tensor else "channel" if q.group_size == -1 else "group",
                   "group_size": None if q.group_size == -1 else q.group_size,
                   "actorder": "static" if q.act_order == ActOrder.STATIC else None, "dynamic": False,
                   "observer": "minmax"}
        inputs = q.activations.args() if q.activations else None
        qc = {"quant_method": "compressed-tensors", "format": layout, "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                            "output_activations": None, "format": layout}},
              "ignore": ["lm_head"], "kv_cache_scheme": None, "meta": meta}
        return qc, {}

    def declare_kept(self, qc: dict, names: list[str]) -> None:
        qc["ignore"] = [*qc.get("ignore", []), *names]

    def _group(self, qc: dict) -> dict:
        groups = list(qc.get("config_groups", {}).values())
        if qc.get("format") not in LAYOUTS or len(groups) != 1:
            raise ArtifactError(f"only compressed-tensors checkpoints in one of {', '.join(LAYOUTS)} with one config "
                                f"group are read (this one: {qc.get('format')!r}, {len(groups)} groups)")
        return groups[0]

    def _layout(self, qc: dict) -> Layout:
        self._group(qc)
        return LAYOUTS[qc["format"]]

    def scheme_of(self, qc: dict) -> tuple[Scheme, str]:
        g = self._group(qc)
        w = g["weights"]
        gs = -1 if w.get("strategy") in ("channel", "tensor") else w["group_size"]
        act = ActOrder.STATIC if w.get("actorder") else ActOrder.NONE
        name = None if qc["format"] == PACKED.name else \
            named(Quant.of_args(w), Quant.of_args(g.get("input_activations")), qc["format"])
        return (Scheme(w["num_bits"], gs, w["symmetric"], act, named=name),
                qc.get("meta", {}).get("algorithm", "unknown"))

    def reader(self, qc: dict):
        layout, w = self._layout(qc), self._group(qc)["weights"]
        gs = -1 if w.get("strategy") in ("channel", "tensor") else w["group_size"]
        return (layout.names(w["symmetric"]) + layout.optional(),
                lambda t: layout.decode(t, w["num_bits"], gs, w["symmetric"]))

    def marker_of(self, qc: dict) -> str:
        return self._layout(qc).marker

    def activations(self, qc: dict) -> Quant | None:
        return Quant.of_args(self._group(qc).get("input_activations"))

    def linear_shape(self, key, entry, q):
        layout = layout_of(q)
        return super().linear_shape(key, entry, q) if layout is PACKED else layout.shape(key, entry)

    def unpacked_shape(self, shape, q):
        return shape[1] * 32 // q.bits, shape[0]

    def runtimes(self, q: Scheme, shapes, moe: bool) -> list[Verdict]:
        return layout_of(q).runtimes(q, shapes, moe)

    def usage(self, q: Scheme, ragged: bool) -> Usage:
        if not q.sym:
            return Usage("compressed-tensors", ", quantization_config=CompressedTensorsConfig(run_compressed=False)",
                         ", CompressedTensorsConfig")
        return Usage("compressed-tensors")
