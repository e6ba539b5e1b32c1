"""Per-layer resume state on disk, so an interrupted run resumes at the last completed layer (the
artifact is the checkpoint; this is the walk's scratch state, which farm workers remove once a job is done).

After layer i: layer_{i}.safetensors holds its quantized Linears and any other tensors of the
layer the algorithm changed (AWQ folds scales into norms), inputs.safetensors the activations
entering layer i + 1, and manifest.json how many layers are done and for which recipe. Each file
is written to a temporary name and renamed; the manifest goes last.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.paths import atomic_file, write_atomic

from .grid import QuantizedWeight

FIELDS = ("codes", "scales", "zeros", "g_idx")
STATE = "state."      # prefix of the layer's other (non-quantized) tensors


class LayerState:
    def __init__(self, folder, recipe: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.recipe = json.loads(json.dumps(recipe))   # as the manifest stores it (tuples become lists)

    def layers_done(self) -> int:
        m = self.folder / "manifest.json"
        if not m.exists():
            return 0
        data = json.loads(m.read_text())
        return data["layers_done"] if data.get("recipe") == self.recipe else 0

    def save(self, index: int, results: dict[str, QuantizedWeight], report: dict, hidden: list[torch.Tensor],
             state: dict[str, torch.Tensor]):
        t, grids = {}, {}
        for name, qw in results.items():
            for k in FIELDS:
                t[f"{name}.{k}"] = getattr(qw, k).detach().cpu().clone()   # q/k/v share g_idx storage
            if qw.input_scale is not None:
                t[f"{name}.input_scale"] = qw.input_scale.detach().cpu().clone()
            grids[name] = [qw.bits, qw.group_size, qw.sym]
        t.update({STATE + k: v.detach().cpu().clone() for k, v in state.items()})
        meta = {"report": json.dumps(report), "grids": json.dumps(grids)}
        self._save(f"layer_{index:05d}.safetensors", t, meta)
        self._save("inputs.safetensors", {f"b{i}": h.contiguous().cpu() for i, h in enumerate(hidden)}, {})
        self._write("manifest.json", json.dumps({"recipe": self.recipe, "layers_done": index + 1}).encode())

    def load_layer(self, index: int):
        """({name: QuantizedWeight}, report dict, {layer tensor name: tensor})."""
        path = self.folder / f"layer_{index:05d}.safetensors"
        t = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        grids = json.loads(meta["grids"])
        results = {n: QuantizedWeight(*(t[f"{n}.{k}"] for k in FIELDS), bits, gs, sym, t.get(f"{n}.input_scale"))
                   for n, (bits, gs, sym) in grids.items()}
        state = {k[len(STATE):]: v for k, v in t.items() if k.startswith(STATE)}
        return results, json.loads(meta["report"]), state

    def load_inputs(self, device) -> list[torch.Tensor]:
        t = load_file(str(self.folder / "inputs.safetensors"))
        return [t[f"b{i}"].to(device) for i in range(len(t))]

    def _save(self, name, tensors, metadata):
        with atomic_file(self.folder / name) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def _write(self, name, data: bytes):
        write_atomic(self.folder / name, data)
