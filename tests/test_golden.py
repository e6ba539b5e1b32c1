"""Artifacts byte for byte: round-to-nearest results of a fixed tiny model written in every format
hash to the values recorded when the layout code was last changed on purpose. A refactor of the
formats, the artifact writer or the settings plumbing must leave them unchanged (RTN is elementwise:
its bytes do not depend on the CPU's BLAS, unlike GPTQ's or AWQ's)."""
import hashlib

import pytest

import tiny
from quantizers.config import QuantConfig
from quantizers.walk import quantize_model
from quantizers.artifact import save
from quantizers.scheme import Scheme

GOLDEN = {  # (format, sym) -> sha256 (first 16 hex digits) of each file
    ('gptq', True): {'config.json': 'e0e701a59a24032e', 'generation_config.json': 'b3774c2596ef62cd',
                     'model.safetensors': 'f3c527a9d19ec643', 'quantize_config.json': 'b5a4299a1705fb4f'},
    ('gptq', False): {'config.json': '96e5dfe2956764f3', 'generation_config.json': 'b3774c2596ef62cd',
                      'model.safetensors': '24516bf9ef86c61a', 'quantize_config.json': '535a3f70d95f41c0'},
    ('awq', False): {'config.json': '8efefe6fa9746ae7', 'generation_config.json': 'b3774c2596ef62cd',
                     'model.safetensors': 'cca7904a9f1a6bcf', 'quant_config.json': '2ed8be597ae45a31'},
    ('compressed-tensors', True): {'config.json': '85e9c5b92e4bb3e6', 'generation_config.json': 'b3774c2596ef62cd',
                                   'model.safetensors': '9683be5b1b9253c5'},
    ('compressed-tensors', False): {'config.json': '2be1fce62ffd471e', 'generation_config.json': 'b3774c2596ef62cd',
                                    'model.safetensors': '1ff2e23a83b1e670'},
}


def _hashes(folder) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.mark.parametrize("fmt, sym", [("gptq", True), ("gptq", False), ("awq", False), ("compressed-tensors", True),
                                      ("compressed-tensors", False)])
def test_artifact_bytes_are_unchanged(tmp_path, fmt, sym):
    model = tiny.tiny_model("qwen2")                  # q/k/v biases: every kind of tensor is written
    cfg = QuantConfig(scheme=Scheme(bits=4, group_size=32, sym=sym), algorithm="rtn")
    q, _ = quantize_model(model, None, cfg)
    out = save(tmp_path / "a", model, None, q, cfg, fmt, {"quantizer": ["quantfarm:golden"]})
    assert _hashes(out) == GOLDEN[fmt, sym]
