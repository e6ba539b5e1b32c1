"""What the variants of a release share: the work that does not depend on the weight settings.

Jobs run with one `Shared` resolve (and download) their source once, build the calibration tokens once
per calibration setting, tokenize the held-out text once and keep the fp16 baseline results in memory,
in front of the baseline cache on disk where other workers find them. A CLI release runs all its variants
with one; a farm worker keeps one for the model it last ran, so the variants of a release it claims in a
row share it too.

Not shared: the per-layer statistics. Quantization is sequential, each layer's inputs coming from the
layers before it as already quantized, so two variants' Hessians differ from the second layer on.
"""
from collections import Counter

from evaluation.suite import BaselineCache


class Shared:
    def __init__(self):
        self._memo: dict = {}
        self.baselines: dict = {}
        self.reused: Counter = Counter()      # how often each kind of work was reused instead of redone

    def get(self, kind: str, key, make):
        """The memoized result of `make()` for (kind, key)."""
        k = (kind, key)
        if k in self._memo:
            self.reused[kind] += 1
            return self._memo[k]
        value = self._memo[k] = make()
        return value

    def peek(self, kind: str, key):
        """The memoized value for (kind, key), counted as reused; None when there is none yet."""
        if (kind, key) in self._memo:
            self.reused[kind] += 1
            return self._memo[(kind, key)]
        return None

    def put(self, kind: str, key, value) -> None:
        self._memo[(kind, key)] = value

    def baseline_cache(self, root) -> BaselineCache:
        return _MemoBaselines(root, self)


class _MemoBaselines(BaselineCache):
    """The baseline cache (disk, or none) behind an in-memory one."""

    def __init__(self, root, shared: Shared):
        super().__init__(root)
        self.shared = shared

    def get(self, key: str):
        if key in self.shared.baselines:
            self.shared.reused["baseline"] += 1
            return self.shared.baselines[key]
        hit = super().get(key)
        if hit is not None:
            self.shared.baselines[key] = hit
        return hit

    def put(self, key: str, entry: dict, hidden=None):
        self.shared.baselines[key] = (entry, hidden)
        super().put(key, entry, hidden)
