"""Artifacts as the format and our writer determine them: round-to-nearest results of a fixed tiny model written
in every format hash to the values recorded when the layout code was last changed on purpose. A refactor of the
formats, the artifact writer or the settings plumbing must leave them unchanged (RTN is elementwise: its bytes
do not depend on the CPU's BLAS, unlike GPTQ's or AWQ's).

What is hashed is what the format fixes: each tensor's name, dtype, shape and bytes plus the safetensors
metadata, and each JSON file's content with its keys sorted. The one field the writing library stamps with its
own release, `transformers_version`, is left out of the hash and checked on its own (present, and the installed
transformers), so a new transformers release does not turn a layout test red.
"""
import hashlib
import json
import struct

import pytest
import transformers

import tiny
from quantizers.config import QuantConfig
from quantizers.walk import quantize_model
from quantizers.artifact import save
from quantizers.scheme import Scheme

GOLDEN = {  # (format, sym) -> canonical sha256 (first 16 hex digits) of each file; see _digests
    ('gptq', True): {'config.json': '9e1829080de0b10c', 'generation_config.json': 'd0dd77abad9ca3fe',
                     'model.safetensors': '02bf40195e97bb9f', 'quantize_config.json': '872262ce8bac222b'},
    ('gptq', False): {'config.json': 'bb6f4ba058f43c03', 'generation_config.json': 'd0dd77abad9ca3fe',
                      'model.safetensors': 'a6f0030e7f44575d', 'quantize_config.json': '20588dd92395afae'},
    ('awq', False): {'config.json': '50e567cc5b0dfb3d', 'generation_config.json': 'd0dd77abad9ca3fe',
                     'model.safetensors': 'ef8338d2779c83e6', 'quant_config.json': '6a6f814821fe4352'},
    ('compressed-tensors', True): {'config.json': '032e6649b3768a3e', 'generation_config.json': 'd0dd77abad9ca3fe',
                                   'model.safetensors': 'c9225ef7c2edc2e9'},
    ('compressed-tensors', False): {'config.json': 'dd74fd366b75ba32', 'generation_config.json': 'd0dd77abad9ca3fe',
                                    'model.safetensors': '1810cf2d8fd2ff9a'},
}


STAMP = "transformers_version"


def _safetensors_digest(raw: bytes) -> bytes:
    """The file's tensors and metadata in a canonical order, read from the format's own layout (an 8-byte
    little-endian header length, a JSON header, then the data), independent of how a writer orders or pads."""
    n, = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    canon = {"__metadata__": header.pop("__metadata__", {})}
    for name, t in sorted(header.items()):
        lo, hi = t["data_offsets"]
        canon[name] = [t["dtype"], t["shape"], hashlib.sha256(data[lo:hi]).hexdigest()]
    return json.dumps(canon, sort_keys=True).encode()


def _digests(folder) -> tuple[dict[str, str], dict[str, str]]:
    """(file -> first 16 hex digits of its canonical sha256, file -> the transformers version it is stamped with)."""
    hashes, stamps = {}, {}
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        raw = f.read_bytes()
        if f.suffix == ".safetensors":
            raw = _safetensors_digest(raw)
        elif f.suffix == ".json":
            doc = json.loads(raw)
            if STAMP in doc:
                stamps[f.name] = doc.pop(STAMP)
            raw = json.dumps(doc, sort_keys=True).encode()
        hashes[f.name] = hashlib.sha256(raw).hexdigest()[:16]
    return hashes, stamps


SCHEME_GOLDEN = {  # named scheme (compressed-tensors int-quantized / float-quantized) -> digests as GOLDEN's
    "W8A8": {'config.json': '05500c337642745c', 'generation_config.json': 'd0dd77abad9ca3fe',
             'model.safetensors': 'cbdf1e76d7a9c74e'},
    "FP8_DYNAMIC": {'config.json': 'a2ed1fffc4ceb1f4', 'generation_config.json': 'd0dd77abad9ca3fe',
                    'model.safetensors': '44e3c52c466fd37f'},
}


@pytest.mark.parametrize("name", ["W8A8", "FP8_DYNAMIC"])
def test_scheme_artifact_bytes_are_unchanged(tmp_path, name):
    model = tiny.tiny_model("qwen2")
    cfg = QuantConfig(scheme=Scheme(bits=8, group_size=-1, sym=True, named=name), algorithm="rtn")
    q, _ = quantize_model(model, None, cfg)
    out = save(tmp_path / "a", model, None, q, cfg, "compressed-tensors", {"quantizer": ["quantfarm:golden"]})
    assert _digests(out)[0] == SCHEME_GOLDEN[name]


@pytest.mark.parametrize("fmt, sym", [("gptq", True), ("gptq", False), ("awq", False), ("compressed-tensors", True),
                                      ("compressed-tensors", False)])
def test_artifact_bytes_are_unchanged(tmp_path, fmt, sym):
    model = tiny.tiny_model("qwen2")                  # q/k/v biases: every kind of tensor is written
    cfg = QuantConfig(scheme=Scheme(bits=4, group_size=32, sym=sym), algorithm="rtn")
    q, _ = quantize_model(model, None, cfg)
    out = save(tmp_path / "a", model, None, q, cfg, fmt, {"quantizer": ["quantfarm:golden"]})
    hashes, stamps = _digests(out)
    assert hashes == GOLDEN[fmt, sym]
    assert stamps == {"config.json": transformers.__version__, "generation_config.json": transformers.__version__}


def test_canonical_digest_sees_what_matters():
    """The canonical hash changes with a tensor's bytes, dtype or name and with the metadata, not with the
    order of the header's entries or the version stamp."""
    def st(tensors: dict, meta=None) -> bytes:
        header, blob = ({"__metadata__": meta} if meta else {}), b""
        for name, (dtype, payload) in tensors.items():
            header[name] = {"dtype": dtype, "shape": [len(payload)], "data_offsets": [len(blob), len(blob) + len(payload)]}
            blob += payload
        h = json.dumps(header).encode()
        return struct.pack("<Q", len(h)) + h + blob
    base = _safetensors_digest(st({"a": ("U8", b"\x01\x02"), "b": ("U8", b"\x03")}))
    assert _safetensors_digest(st({"b": ("U8", b"\x03"), "a": ("U8", b"\x01\x02")})) == base
    for changed in ({"a": ("U8", b"\x01\x09"), "b": ("U8", b"\x03")}, {"a": ("I8", b"\x01\x02"), "b": ("U8", b"\x03")},
                    {"a2": ("U8", b"\x01\x02"), "b": ("U8", b"\x03")}):
        assert _safetensors_digest(st(changed)) != base
    assert _safetensors_digest(st({"a": ("U8", b"\x01\x02"), "b": ("U8", b"\x03")}, {"format": "pt"})) != base
