"""Where calibration text comes from: the shared data folder, local files, Hugging Face datasets, or
the model itself. Each text source resolves to a canonical description (what the calibration hash
and the model card record) plus an iterator of documents, so sample building is the same for all."""
from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from core.errors import CalibrationError

C4_RELPATH = "c4/c4_en_train_first1000.jsonl"
WIKITEXT2_RELPATH = "wikitext2/wiki.valid.tokens"
SAMPLE_BATCH = 16  # sequences sampled at once from the model: keeps the KV cache small
SOURCE_FORMS = ("auto", "c4", "wikitext2", "model", "a .txt or .jsonl path (or file:PATH)",
                "hf:NAME[:CONFIG[:SPLIT]]")
NAMED_SOURCES = ("auto", "c4", "wikitext2", "model")
# A Hub dataset id as the Hub spells one (huggingface_hub's validate_repo_id): `name` or `org/name`, each part
# letters, digits, - _ . inside, a letter or digit at both ends; no path, no `..`, no `--`. Config and split
# names: the same characters.
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
HUB_DATASET_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")
HUB_NAME = re.compile(_HUB_PART)


def data_dir() -> pathlib.Path | None:
    """The shared offline data folder. QUANTFARM_DATA wins and must exist (a typo should not silently
    fall back to other data); otherwise look next to the working directory, then next to the repo."""
    env = os.environ.get("QUANTFARM_DATA")
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_dir():
            raise CalibrationError(f"QUANTFARM_DATA={env!r} is not a directory; point it at the shared data folder")
        return p.resolve()
    repo_root = pathlib.Path(__file__).resolve().parent.parent
    for cand in (pathlib.Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def shared_file(relpath: str) -> pathlib.Path | None:
    """A file of the shared data folder, or None when the folder or the file is absent."""
    d = data_dir()
    if d is None:
        return None
    p = d / relpath
    return p if p.is_file() else None


@dataclass(frozen=True)
class TextSource:
    """A resolved text source: `describe` is canonical; `documents()` yields texts in a fixed order."""
    describe: str
    documents: Callable[[], Iterator[str]]


def _require_shared(relpath: str, name: str) -> pathlib.Path:
    p = shared_file(relpath)
    if p is None:
        raise CalibrationError(
            f"source {name!r} needs the shared data file {relpath}, which was not found; set QUANTFARM_DATA "
            f"to the shared data folder (looked in: {data_dir() or '<cwd>/../shared/data and <repo>/../shared/data'})")
    return p


def read_jsonl(path: pathlib.Path) -> list[str]:
    """All "text" fields of a JSONL file. Parsed eagerly (cheap) so a bad line is reported whatever
    the sample size; blank lines are skipped. Errors say what is wrong with a line, never what it holds:
    a farm's job error is read by whoever submitted the job."""
    texts, lineno = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column "
                                           f"{e.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise CalibrationError(f'{path}: line {lineno} has no string field "text"')
                texts.append(obj["text"])
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: line {lineno + 1} is not UTF-8 text") from None
    return texts


def _file_source(path: pathlib.Path, describe: str, whole_text: bool = False) -> TextSource:
    """A .jsonl file is one document per line; a .txt file (or `whole_text`) is one document."""
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    if path.suffix.lower() == ".jsonl" and not whole_text:
        return TextSource(describe, lambda: iter(read_jsonl(path)))
    if path.suffix.lower() == ".txt" or whole_text:
        return TextSource(describe, lambda: iter([_read_text(path)]))
    raise CalibrationError(f'calibration file {path} must be .txt (whole text) or .jsonl (field "text")')


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {e.start}); give a UTF-8 .txt file") from None


def hub_dataset(source: str) -> tuple[str, str | None, str]:
    """(dataset id, config, split) of an `hf:NAME[:CONFIG[:SPLIT]]` source. Only a Hub id passes: `datasets`
    reads a local folder or file named by a path, so a path, `..` or an absolute path never reaches it."""
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise CalibrationError(f"bad Hugging Face source {source!r}; expected hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    if not HUB_DATASET_ID.fullmatch(name) or ".." in name or "--" in name or name.endswith(".git"):
        raise CalibrationError(f"hf:{name[:200]!r} is not a Hub dataset id: give org/name or name (letters, digits "
                               "and - _ . only, no path); a local file is named as a .txt/.jsonl path instead")
    for what, value in (("config", config), ("split", split)):
        if value is not None and not HUB_NAME.fullmatch(value):
            raise CalibrationError(f"hf:{name}: the {what} {value[:100]!r} is not a name (letters, digits and - _ .)")
    return name, config, split


def classify(source: str) -> tuple[str, object]:
    """What a source string names, looking at nothing on disk: ("named", name), ("hub", (id, config, split))
    or ("file", the path as written); CalibrationError for anything else. resolve_text_source and the farm's
    path policy both read sources through this, so what a server checks is what a job opens."""
    if source in NAMED_SOURCES:
        return "named", source
    if source.startswith("hf:"):
        return "hub", hub_dataset(source)
    raw = source[5:] if source.startswith("file:") else source
    if source.startswith("file:") or pathlib.Path(raw).suffix.lower() in (".txt", ".jsonl") or os.sep in raw:
        return "file", raw
    raise CalibrationError(f"unknown calibration source {source[:200]!r}; use one of: {', '.join(SOURCE_FORMS)}")


def _hf_documents(name: str, config: str | None, split: str, where: str) -> Iterator[str]:
    """Stream a Hub dataset (streaming: C4-sized datasets must not be downloaded whole). Every failure
    becomes a CalibrationError: offline machines are the common case and must not see a traceback."""
    # Small timeouts so an unreachable Hub fails fast; only effective if huggingface_hub is not yet imported.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"source hf:{name} needs the `datasets` package: pip install quantfarm[hub]") from None
    unreachable = _hub_unreachable(name)
    if unreachable:
        raise CalibrationError(
            f"cannot load Hugging Face dataset {where}: the Hub could not be reached ({unreachable}). It needs "
            "network access; offline, use 'c4', 'wikitext2', a local .txt/.jsonl file or 'model'")
    packaged = getattr(getattr(datasets, "packaged_modules", None), "_PACKAGED_DATASETS_MODULES", ())
    if name in packaged:
        raise CalibrationError(f"hf:{name} names one of `datasets`' file readers, not a Hub dataset; give the "
                               "Hub dataset's id (org/name)")
    try:
        # hf://datasets/: `datasets` then looks on the Hub only, never for a local folder of that name
        ds = datasets.load_dataset(f"hf://datasets/{name}", config, split=split, streaming=True)
        for row in ds:
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise CalibrationError(f'{where}: its rows have no string column "text"; choose a config or '
                                       "dataset whose text is in a `text` column")
            yield text
    except CalibrationError:
        raise
    except Exception as e:  # network, auth, not found, offline mode: all say the same thing to the user
        raise CalibrationError(
            f"cannot load Hugging Face dataset {where}: the Hub could not be reached or the dataset is "
            f"unavailable ({_hub_failure(e)}). It needs network access; offline, use 'c4', "
            f"'wikitext2', a local .txt/.jsonl file or 'model'") from None


def _hub_failure(e: Exception) -> str:
    """An exception of `datasets` as one line: its type, and its first line unless it comes from this machine's
    files (OSError, RuntimeError), whose text could name or quote them."""
    if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, ConnectionError):
        return type(e).__name__
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def _hub_unreachable(name: str) -> str | None:
    """Why the Hub cannot be reached, from one request without retries, or None. `datasets` retries a refused
    connection five times with backoff (23 s); an HTTP answer of any status means the Hub is there, and
    `datasets` then says what is wrong with the dataset itself."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    if constants.HF_HUB_OFFLINE:
        return None                          # datasets refuses at once, saying offline mode is on
    endpoint = (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).dataset_info(name, timeout=float(os.environ["HF_HUB_ETAG_TIMEOUT"]))
    except (HfHubHTTPError, HFValidationError):
        return None
    except Exception as e:  # refused, DNS, timeout, TLS: whichever HTTP client this huggingface_hub uses
        return f"{endpoint}: {type(e).__name__}: {e}"
    return None


def resolve_text_source(source: str) -> TextSource:
    """Map a source string (other than "auto" and "model") to its canonical description and documents."""
    if source == "c4":
        return _file_source(_require_shared(C4_RELPATH, "c4"), f"c4:{C4_RELPATH}")
    if source == "wikitext2":
        return _file_source(_require_shared(WIKITEXT2_RELPATH, "wikitext2"), f"wikitext2:{WIKITEXT2_RELPATH}",
                            whole_text=True)
    kind, value = classify(source)
    if kind == "hub":
        name, config, split = value
        describe = f"hf:{name}:{config}:{split}" if config else f"hf:{name}::{split}"
        return TextSource(describe, lambda: _hf_documents(name, config, split, describe))
    if kind == "file":
        path = pathlib.Path(value).expanduser().resolve()
        return _file_source(path, f"file:{path}")
    raise CalibrationError(f"unknown calibration source {source!r}; use one of: {', '.join(SOURCE_FORMS)}")


def sample_from_model(model, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """n_samples × seq_len tokens sampled from the model at temperature 1 (no top-k/top-p), each starting
    at BOS: calibration data that needs no dataset. A manual KV-cache loop rather than generate(), so no
    generation_config default (top-k, top-p, min-p) can change the distribution. Deterministic per seed
    and device type; the caller's global RNG state is left untouched. EOS does not stop a sample."""
    if model is None:
        raise CalibrationError("source 'model' samples text from the model itself; pass model=")
    start = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if start is None and tokenizer is not None:
        start = getattr(tokenizer, "eos_token_id", None)
    if start is None:
        cfg = getattr(model, "config", None)
        start = getattr(cfg, "bos_token_id", None)
        start = getattr(cfg, "eos_token_id", None) if start is None else start
    if isinstance(start, (list, tuple)):
        start = start[0]
    if start is None:
        raise CalibrationError("source 'model' needs a BOS or EOS token id to start from; the tokenizer has neither")
    device = next(model.parameters()).device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
        torch.manual_seed(seed)
        gen = torch.Generator(device=device).manual_seed(seed)
        for b0 in range(0, n_samples, SAMPLE_BATCH):
            bsz = min(SAMPLE_BATCH, n_samples - b0)
            seqs = torch.full((bsz, seq_len), int(start), dtype=torch.long, device=device)
            past, inp = None, seqs[:, :1]
            for t in range(1, seq_len):
                res = model(input_ids=inp, past_key_values=past, use_cache=True)
                past = res.past_key_values
                # Inverse-CDF sampling: exact, like torch.multinomial, but several times faster on CPU at 50k vocab.
                cdf = torch.softmax(res.logits[:, -1, :].float(), dim=-1).cumsum(dim=-1)
                u = torch.rand((bsz, 1), generator=gen, device=device) * cdf[:, -1:]
                nxt = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
                seqs[:, t] = nxt[:, 0]
                inp = nxt
            out.append(seqs.cpu())
            del past
    return torch.cat(out).to(torch.int64)
