"""Replaying the outputs of already-quantized modules inside one decoder layer.

True-sequential quantization runs a layer's forward once per group of Linears (q/k/v, then o,
then gate/up, then down, then once more for the next layer's inputs). Everything upstream of the
group being calibrated is frozen by then, so its outputs are the same in every later pass: the
first pass that computes a frozen module's output records it per batch and later passes return the
record instead of recomputing. A container (self_attn, mlp) whose Linears are all frozen is
recorded as a whole, which also skips its non-Linear work (attention). Replayed values are the
very tensors recomputation would produce, so results are bit-identical; a byte budget bounds the
memory, and a module whose record would exceed it is simply recomputed.
"""
import torch
from torch import nn


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


class Replay:
    def __init__(self, layer: nn.Module, n_batches: int, budget_bytes: int):
        self.n_batches = n_batches
        self.budget = budget_bytes
        self.used = 0
        self.batch = 0
        self.recording_on = True
        self.frozen: set[nn.Module] = set()
        self.records: dict[nn.Module, list] = {}      # recording (incomplete) or complete
        self.replaying: set[nn.Module] = set()
        self.skip: set[nn.Module] = set()             # over budget, or inside a replayed container
        self.linears = {m: [l for l in m.modules() if isinstance(l, nn.Linear)] for m in layer.modules()
                        if m is not layer}
        self.linears = {m: ls for m, ls in self.linears.items() if ls}
        self.patched = []
        for m in self.linears:
            self._patch(m)

    def _patch(self, mod):
        orig = mod.forward

        def forward(*args, **kwargs):
            if mod in self.replaying:
                return self.records[mod][self.batch]
            out = orig(*args, **kwargs)
            rec = self.records.get(mod)
            if rec is not None and self.recording_on and len(rec) == self.batch:
                size = _nbytes(out)
                if self.used + size > self.budget:
                    self._drop(mod)
                    self.skip.add(mod)
                else:
                    rec.append(out)
                    self.used += size
            return out

        mod.forward = forward
        self.patched.append(mod)

    def _drop(self, mod):
        rec = self.records.pop(mod, None)
        if rec:
            self.used -= sum(_nbytes(o) for o in rec)

    def freeze(self, modules):
        """These Linears are quantized: their outputs (and those of containers now fully frozen)
        are recorded from the next pass on."""
        self.frozen.update(modules)
        for m, ls in self.linears.items():
            if m not in self.records and m not in self.skip and all(l in self.frozen for l in ls):
                self.records[m] = []

    def end_pass(self):
        """Records complete for every batch start replaying; incomplete ones start over."""
        for m, rec in list(self.records.items()):
            if m in self.replaying:
                continue
            if len(rec) == self.n_batches:
                self.replaying.add(m)
            else:
                self._drop(m)
                self.records[m] = []
        for m in list(self.replaying):        # a replayed container never calls its children
            for child in m.modules():
                if child is not m and child in self.replaying:
                    self.replaying.discard(child)
                    self._drop(child)
                    self.skip.add(child)

    def close(self):
        for m in self.patched:
            del m.forward
        self.records.clear()
        self.replaying.clear()
        self.used = 0
