"""The whole job (resolve -> calibrate -> quantize -> save -> evaluate) on a tiny local model."""
import json

import pytest
from safetensors.torch import load_file

from service.job import pipeline
from service.job.spec import JobSpec
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "llama"))


def spec(model, seed=0, **kw):
    return JobSpec(model=model, calibration={"source": "model", "samples": 4, "seq_len": 32, "seed": seed},
                   evaluation={"text": "model", "windows": 2, "window_len": 32}, **{"group_size": 32, **kw})


def test_same_seed_gives_byte_identical_tensors(tiny_dir, tmp_path):
    a = pipeline.run(spec(tiny_dir), tmp_path / "a", device="cpu")
    b = pipeline.run(spec(tiny_dir), tmp_path / "b", device="cpu")
    c = pipeline.run(spec(tiny_dir, seed=1), tmp_path / "c", device="cpu")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a.calibration_hash == b.calibration_hash != c.calibration_hash
    assert a.recipe_key == b.recipe_key != c.recipe_key
    ta, tc = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    assert any(not (ta[k] == tc[k]).all() for k in ta if k.endswith(".qweight"))


def test_report_and_configs(tiny_dir, tmp_path):
    r = pipeline.run(spec(tiny_dir, sym=False, act_order="static"), tmp_path / "art", device="cpu")
    art = tmp_path / "art"
    qc = json.loads((art / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    assert qc["desc_act"] is False and qc["meta"]["act_order"] == "static"     # static act-order: g_idx monotonic
    assert qc["meta"]["source_model"] == tiny_dir and qc["meta"]["source_revision"] == r.revision
    assert json.loads((art / "quantize_config.json").read_text()) == qc
    report = json.loads((art / "report.json").read_text())
    assert report["perplexity"]["fp16"] > 0 and report["perplexity"]["quantized"] > 0
    assert report["spec"]["sym"] is False and report["size_after_bytes"] < report["size_before_bytes"]
    assert len(report["layers"]) == 2 and "mlp.down_proj" in report["layers"][0]["modules"]
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in art.iterdir()}


def test_resume_through_the_pipeline(tiny_dir, tmp_path):
    """A run cancelled after its first layer resumes from --state-dir to the same artifact."""
    from quantizers.walk import Cancelled
    calls = iter([False, True])
    with pytest.raises(Cancelled):
        pipeline.run(spec(tiny_dir), tmp_path / "x", device="cpu", state_dir=tmp_path / "state",
                     should_stop=lambda: next(calls))
    assert not (tmp_path / "x").exists()                 # nothing half-written
    done = []
    pipeline.run(spec(tiny_dir), tmp_path / "x", device="cpu", state_dir=tmp_path / "state",
                 on_layer=lambda rep, n: done.append(rep.index))
    pipeline.run(spec(tiny_dir), tmp_path / "ref", device="cpu")
    assert done == [1]
    assert (tmp_path / "x" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("algorithm, fmt", [("awq", "awq"), ("awq", "compressed-tensors"), ("gptq", "compressed-tensors")])
def test_algorithm_and_format_combinations(tiny_dir, tmp_path, algorithm, fmt):
    s = spec(tiny_dir, algorithm=algorithm, format=fmt, **({"sym": False} if fmt == "awq" else {}))
    r = pipeline.run(s, tmp_path / "art", device="cpu")
    qc = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == {"awq": "awq", "compressed-tensors": "compressed-tensors"}[fmt]
    assert qc["meta"]["algorithm"] == algorithm
    assert r.preflight["writable"]
    assert {v["runtime"] for v in r.preflight["runtimes"]} == {"vllm", "vllm-cpu", "transformers"}
    assert r.perplexity["quantized"] > 0                 # evaluated from the artifact as read back
    if fmt == "awq":
        assert (tmp_path / "art" / "quant_config.json").exists()
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["preflight"]["settings"]["format"] == fmt


def test_awq_spec_defaults_and_refusals(tiny_dir, tmp_path):
    cfg = JobSpec(model="m", algorithm="awq").quant_config()
    assert (cfg.scheme.sym, cfg.scheme.act_order) == (False, "none")             # act-order is GPTQ's
    assert JobSpec(model="m").quant_config().scheme.sym is True
    # specs stored before act_order: GPTQ's two flags become the one setting
    assert [JobSpec(model="m", desc_act=d, static_groups=st).act_order for d, st in
            [(True, True), (True, False), (False, True)]] == ["static", "dynamic", "none"]
    with pytest.raises(ValueError, match="not both"):
        JobSpec(model="m", act_order="static", desc_act=True)
    with pytest.raises(ValueError, match="zero points"):
        JobSpec(model="m", algorithm="awq", sym=True)
    from core.errors import SpecError
    with pytest.raises(SpecError, match="multiple of the group size"):      # 64-wide tiny Linears, g48
        pipeline.run(spec(tiny_dir, algorithm="awq", format="awq", group_size=48), tmp_path / "x", device="cpu")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("scheme", ["W8A8", "FP8_DYNAMIC", "FP8"])
def test_a_named_scheme_through_the_pipeline(tiny_dir, tmp_path, scheme):
    """The whole job with --scheme: calibration where the scheme needs it (FP8's static input scales, even with
    RTN), the layout and the scheme in the report, the card and the settings line."""
    s = JobSpec(model=tiny_dir, scheme=scheme, calibration={"source": "model", "samples": 4, "seq_len": 32},
                evaluation={"text": "model", "windows": 2, "window_len": 32})
    r = pipeline.run(s, tmp_path / "art", device="cpu")
    qc = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("int-quantized" if scheme == "W8A8" else "float-quantized")
    assert (r.calibration_hash is not None) == (scheme != "FP8_DYNAMIC")       # RTN calibrates only for FP8
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["settings"]["scheme"] == scheme and r.perplexity["quantized"] > 0
    card = (tmp_path / "art" / "README.md").read_text()
    assert f"compressed-tensors {scheme}: weights" in card and "made for" in card


def test_an_already_quantized_source_is_refused_before_its_weights_load(tiny_dir, tmp_path, monkeypatch):
    """A source whose config declares a quantization_config (here our own FP8 artifact) is refused from the config,
    with what it is, before any weight is loaded."""
    from core.errors import SpecError
    from service.job import steps
    art = tmp_path / "fp8"
    pipeline.run(JobSpec(model=tiny_dir, scheme="FP8_DYNAMIC", evaluation={"text": "model", "windows": 1,
                                                                            "window_len": 32}), art, device="cpu")
    monkeypatch.setattr(steps, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SpecError, match=r"already quantized \(compressed-tensors float-quantized"):
        pipeline.run(spec(str(art)), tmp_path / "again", device="cpu")
    assert not (tmp_path / "again").exists()
