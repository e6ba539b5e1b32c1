"""A Hub model's weights as a step of their own: resolving with weights=False pins the repo and fetches its
config, tokenizer and index files (service/job/hub_source.py); the weight files are then `pending`, and the
worker (or the CLI's own process) fetches them here after the checks their config answers, with room on
disk checked first, progress steps and cancel. Admission never waits for a 20 GB shard.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from core.errors import ModelSourceError

from .hub_source import connection_errors, hub_error, offline
from .sources import ResolvedModel, inspect_dir


def fetch_weights(src: ResolvedModel, on_step=None, should_stop=None) -> ResolvedModel:
    """The weights resolving left pending, fetched now: first a check that the Hub cache's file system has
    room for those not there yet, then one file after another, a step (`on_step`) per tenth of each and
    `should_stop` asked between chunks (quantizers.walk.Cancelled; a later fetch resumes the file). Returns
    the source complete, checked on disk like a local folder; a source with nothing pending as it is."""
    w = src.pending
    if w is None:
        return src
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from . import storage
    folder, where = Path(src.path), f"Hub model {w.repo_id}@{src.revision}"
    missing = [(n, size) for n, size in w.files if not (folder / n).is_file()]
    if missing and offline():
        raise ModelSourceError(f"{where}: its weights are not in the local cache and offline mode is on "
                               "(HF_HUB_OFFLINE); pre-download them (hf download <repo>) or let this worker reach "
                               "the Hub")
    if missing:
        storage.check_space(folder, sum(size or 0 for _, size in missing))
    for i, (name, size) in enumerate(missing, 1):
        label = f"download {name} ({i}/{len(missing)}{f', {_size(size)}' if size else ''})"
        (on_step or _noop)(label)
        try:
            hf_hub_download(w.repo_id, name, revision=src.revision, cache_dir=w.cache_dir, endpoint=w.endpoint,
                            tqdm_class=_progress_bar(label, on_step or _noop, should_stop))
        except HfHubHTTPError as e:
            raise hub_error(e, w.repo_id, src.revision, w.endpoint) from e
        except connection_errors() as e:
            raise ModelSourceError(f"cannot reach the Hugging Face Hub at {w.endpoint} to fetch {name} of {where} "
                                   f"({type(e).__name__}); check the network or HF_ENDPOINT and retry") from e
    # What is on disk now, checked like a local folder: catches partial snapshots (missing shards).
    inspect_dir(folder, where, allow_pickle=src.allow_pickle, trust_remote_code=src.trust_remote_code)
    return dataclasses.replace(src, pending=None)


def _noop(_step: str) -> None:
    pass


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _progress_bar(label: str, on_step, should_stop):
    """A tqdm class for hf_hub_download's bar of one file: reports each tenth of it as a step and stops the
    download on cancel. Not huggingface_hub's own tqdm, so HF_HUB_DISABLE_PROGRESS_BARS leaves it counting;
    it draws to /dev/null."""
    from tqdm.std import tqdm
    from quantizers.walk import Cancelled

    class Bar(tqdm):
        def __init__(self, *args, **kw):
            self._null, self._tenth = open(os.devnull, "w"), 0
            super().__init__(*args, **{**kw, "disable": False, "file": self._null})

        def update(self, n=1):
            out = super().update(n)
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled")
            tenth = 10 * self.n // self.total if self.total else 0
            if tenth > self._tenth:
                self._tenth = tenth
                on_step(f"{label}: {10 * tenth}%")
            return out

        def close(self):
            super().close()
            self._null.close()
    return Bar
