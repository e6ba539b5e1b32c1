"""Merge recipes as job sources, with mergekit: each method's merged tensors against the method's own
definition computed here, the merge's identity and cache, refusals before any work, and merge jobs through
the CLI, a release and the HTTP API to a quantized artifact with its report."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.errors import ModelSourceError
from service.cli.main import main
from service.job import merge, pipeline
from service.job.sources import Access
from service.job.spec import JobSpec
from tiny import save_tiny

Q = "model.layers.1.self_attn.q_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test merges into its own cache (merged models, GGUF copies): nothing found from another test."""
    monkeypatch.setenv("QUANTFARM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three tiny Llamas of two layers (seeds 0, 1, 2) and one of four, as local checkpoint folders."""
    root = tmp_path_factory.mktemp("sources")
    out = {n: str(save_tiny(root / n, "llama", seed=s)) for n, s in (("a", 0), ("b", 1), ("c", 2))}
    out["deep"] = str(save_tiny(root / "deep", "llama", seed=3, layers=4))
    return out


def weights(folder) -> dict:
    out = {}
    for f in sorted(__import__("pathlib").Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def merged(tmp_path, recipe: dict, name="merged") -> dict:
    """Merge through `quantfarm merge` and read back the merged tensors."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), "--out", str(tmp_path / name), "--overwrite"]) == 0
    return weights(tmp_path / name)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors: along the great circle through their
    directions, at angle t * theta, with each endpoint's weight sin((1-t) theta)/sin(theta) and
    sin(t theta)/sin(theta); straight-line interpolation when they are (nearly) parallel."""
    x, y = a.double().flatten(), b.double().flatten()
    cos = torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = torch.arccos(cos)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / torch.sin(theta)).reshape(a.shape)


def test_slerp_with_a_t_per_filter_is_the_formula(tmp_path, sources):
    """t 0.3 for self-attention, 0.7 for the MLP and 0.5 elsewhere, as the SLERP seeds set it."""
    a, b = weights(sources["a"]), weights(sources["b"])
    out = merged(tmp_path, {"merge_method": "slerp", "base_model": sources["a"], "dtype": "float32",
                            "slices": [{"sources": [{"model": sources["a"], "layer_range": [0, 2]},
                                                    {"model": sources["b"], "layer_range": [0, 2]}]}],
                            "parameters": {"t": [{"filter": "self_attn", "value": 0.3},
                                                 {"filter": "mlp", "value": 0.7}, {"value": 0.5}]}})
    for name, t in ((Q, 0.3), (GATE, 0.7), (NORM, 0.5)):
        want = slerp(t, a[name], b[name]).float()
        assert torch.allclose(out[name], want, rtol=1e-5, atol=1e-6), (name, (out[name] - want).abs().max())
        assert not torch.allclose(out[name], slerp(0.5 if t != 0.5 else 0.3, a[name], b[name]).float(), atol=1e-4)


def test_dare_with_a_fixed_seed_keeps_rescaled_deltas(tmp_path, sources):
    """DARE (linear, drop rate 0.85, rescale), one source on a base, weight 1: each delta is dropped or kept,
    about 15% kept, and the kept ones scaled by one factor per tensor. The paper's factor is 1 / (1 - 0.85);
    mergekit's rescale takes the one that keeps the delta's L1 norm, ||delta||_1 / ||kept delta||_1, equal to
    the paper's in expectation: the test checks that exact factor and that it lies near 1 / 0.15. The same
    recipe gives the same tensors (one seed) and the same merge key."""
    recipe = {"merge_method": "dare_linear", "base_model": sources["a"], "dtype": "float32",
              "models": [{"model": sources["a"]}, {"model": sources["b"], "parameters": {"weight": 1.0, "density": 0.15}}],
              "parameters": {"rescale": True, "normalize": False}}
    a, b = weights(sources["a"]), weights(sources["b"])
    out = merged(tmp_path, recipe)
    for name in (Q, GATE):
        delta, got = (b[name] - a[name]).double(), (out[name] - a[name]).double()
        kept = got.abs() > 1e-7 * delta.abs().max()
        frac = kept.double().mean().item()
        assert abs(frac - 0.15) < 4 * math.sqrt(0.15 * 0.85 / got.numel()), frac     # four standard deviations
        scale = delta.abs().sum() / delta[kept].abs().sum()
        assert torch.allclose(got, torch.where(kept, delta * scale, 0.0), rtol=1e-4, atol=1e-6)
        assert abs(scale.item() * 0.15 - 1) < 0.15, scale
    again = merged(tmp_path, recipe, "again")
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert merge.pin(recipe).key == merge.pin(json.loads(json.dumps(recipe))).key


def test_nearswap_is_the_formula(tmp_path, sources):
    """NearSwap: each weight moves from the base to the secondary model by t / |base - secondary|, capped at 1:
    where the two differ by less than t it becomes the secondary's."""
    t = 0.02
    a, b = weights(sources["a"]), weights(sources["b"])
    out = merged(tmp_path, {"merge_method": "nearswap", "base_model": sources["a"], "dtype": "float32",
                            "models": [{"model": sources["a"]}, {"model": sources["b"]}], "parameters": {"t": t}})
    for name in (Q, GATE, NORM):
        w = (t / (a[name] - b[name]).abs()).clamp(max=1)
        assert torch.allclose(out[name], w * b[name] + (1 - w) * a[name], rtol=1e-5, atol=1e-7)
        swapped = (a[name] - b[name]).abs() < t
        assert swapped.any() and torch.allclose(out[name][swapped], b[name][swapped])


def test_linear_and_task_arithmetic_are_the_formula(tmp_path, sources):
    a, b, c = (weights(sources[k]) for k in "abc")
    lin = merged(tmp_path, {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": sources["a"], "parameters": {"weight": 1.0}}, {"model": sources["b"], "parameters": {"weight": 3.0}}]},
        "linear")
    ta = merged(tmp_path, {"merge_method": "task_arithmetic", "base_model": sources["a"], "dtype": "float32",
                           "models": [{"model": sources["b"], "parameters": {"weight": 0.5}},
                                      {"model": sources["c"], "parameters": {"weight": -0.25}}]}, "ta")
    for name in (Q, GATE, NORM):
        assert torch.allclose(lin[name], (a[name] + 3 * b[name]) / 4, atol=1e-6)
        assert torch.allclose(ta[name], a[name] + 0.5 * (b[name] - a[name]) - 0.25 * (c[name] - a[name]), atol=1e-6)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5, "weight": 0.5}),
                                           ("dare_ties", {"density": 0.5, "weight": 0.5})])
def test_ties_methods_run_through_the_same_path(tmp_path, sources, method, params):
    out = merged(tmp_path, {"merge_method": method, "base_model": sources["a"], "dtype": "float32",
                            "models": [{"model": sources["b"], "parameters": params},
                                       {"model": sources["c"], "parameters": params}]})
    a = weights(sources["a"])
    assert out.keys() == a.keys() and all(torch.isfinite(v).all() for v in out.values())
    assert not torch.equal(out[Q], a[Q])


def test_depth_upscaling_passthrough_quantizes(tmp_path, sources):
    """SOLAR-style depth up-scaling: layers 0-2 and 1-3 of one model stacked into six layers; the merged model
    has them, and quantizes through the pipeline into an artifact of six layers."""
    deep = sources["deep"]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": deep, "layer_range": [0, 3]}]}, {"sources": [{"model": deep, "layer_range": [1, 4]}]}]}
    src, out = weights(deep), merged(tmp_path, recipe)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        k = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(out[k.format(new)], src[k.format(old)])
    spec = JobSpec(model="deep-up", merge=recipe, group_size=32, calibration={"source": "model", "samples": 4,
                   "seq_len": 32}, evaluation={"text": "model", "windows": 2, "window_len": 32})
    r = pipeline.run(spec, tmp_path / "art", device="cpu")
    assert len(r.layers) == 6 and r.coverage["fraction"] == 1.0
    assert json.loads((tmp_path / "art" / "config.json").read_text())["num_hidden_layers"] == 6


def test_merge_key_is_the_recipe_and_its_sources(tmp_path, sources, cache):
    recipe = {"merge_method": "linear", "models": [{"model": sources["a"], "parameters": {"weight": 1.0}},
                                                   {"model": sources["b"], "parameters": {"weight": 1.0}}]}
    m = merge.pin(recipe)
    reordered = {"models": recipe["models"], "merge_method": "linear"}
    assert merge.pin(reordered).key == m.key                                   # key order does not matter
    other = {**recipe, "models": [recipe["models"][0], {**recipe["models"][1], "parameters": {"weight": 2.0}}]}
    assert merge.pin(other).key != m.key
    moved = tmp_path / "moved-b"
    save_tiny(moved, "llama", seed=1)                      # the same content elsewhere: the same identity
    assert merge.pin({**recipe, "models": [recipe["models"][0], {"model": str(moved), "parameters": {"weight": 1.0}}]}).key == m.key
    save_tiny(moved, "llama", seed=5)                      # a source changed: a new merge
    assert merge.pin({**recipe, "models": [recipe["models"][0], {"model": str(moved), "parameters": {"weight": 1.0}}]}).key != m.key
    assert not m.built
    merge.build(m)
    assert m.built and m.folder.parent == cache / "merges"
    made = json.loads((m.folder / merge.DONE).read_text())
    assert made["key"] == m.key and made["mergekit"] == merge.mergekit_version()
    steps = []
    merge.build(merge.pin(recipe), on_step=steps.append)                      # cached: nothing merged again
    assert steps == []


def test_hub_sources_pin_to_their_commit_and_keep_the_source_rules(tmp_path, sources, monkeypatch):
    """Hub sources (the loopback stand-in of test_sources: the Hub is unreachable here) resolve to their
    commit like any job's model; pickle-only sources are refused before their weights are fetched; a recipe
    with a typo makes no request at all."""
    from pathlib import Path

    from huggingface_hub import constants

    from core.errors import UnsafeModelError
    from test_sources import SHA, FakeHub, _copy, _to_pickle_only
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        hub.add("org/a", Path(sources["a"]))
        recipe = {"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": "org/a", "parameters": {"weight": 1.0}},
                             {"model": sources["b"], "parameters": {"weight": 1.0}}]}
        with pytest.raises(ValueError, match="paramters"):
            JobSpec(model="m", merge={**recipe, "paramters": {}})
        assert hub.log == []
        m = merge.pin(recipe)
        assert m.sources["org/a"].revision == SHA and merge.identity(m.sources["org/a"]) == f"org/a@{SHA}"
        pinned = {**recipe, "models": [{"model": f"org/a@{SHA}", "parameters": {"weight": 1.0}}, recipe["models"][1]]}
        assert merge.pin(pinned).key == m.key                      # the branch is its commit
        out, a, b = weights(merge.build(m)), weights(sources["a"]), weights(sources["b"])
        assert torch.allclose(out[Q], (a[Q] + b[Q]) / 2, atol=1e-6)
        hub.add("org/pickled", _to_pickle_only(_copy(Path(sources["c"]), tmp_path / "pickled")) or tmp_path / "pickled")
        with pytest.raises(UnsafeModelError, match="merge source org/pickled.*allow_pickle"):
            merge.pin({**recipe, "models": [*recipe["models"], {"model": "org/pickled", "parameters": {"weight": 1.0}}]})
        assert not hub.requested(".bin")
    finally:
        hub.close()


def test_cancel_stops_the_merge_and_leaves_nothing(sources, cache):
    from quantizers.walk import Cancelled
    m = merge.pin({"merge_method": "slerp", "base_model": sources["a"], "parameters": {"t": 0.5},
                   "models": [{"model": sources["a"]}, {"model": sources["b"]}]})
    asked = []
    with pytest.raises(Cancelled):
        merge.build(m, should_stop=lambda: asked.append(1) or len(asked) > 20)
    assert not m.built and not any((cache / "merges").glob("*"))


def test_bad_recipes_fail_before_any_work(tmp_path, sources, cache, capsys):
    good = {"merge_method": "slerp", "base_model": sources["a"], "parameters": {"t": 0.5},
            "models": [{"model": sources["a"]}, {"model": sources["b"]}]}
    for bad, says in (({**good, "paramters": {"t": 0.5}}, "merge.paramters: not a field"),
                      ({**good, "merge_method": "slurp"}, "unknown method 'slurp'"),
                      ({**good, "parameters": {"tt": 0.5}}, "slerp takes no parameter 'tt'"),
                      ({**good, "models": [{"model": sources["a"], "weight": 1}]}, "merge.models.0.weight: not a field"),
                      ({"merge_method": "passthrough", "slices": [{"sources": [{"model": sources["a"], "layer_rnge": [0, 1]}]}]},
                       "merge.slices.0.sources.0.layer_rnge: not a field"),
                      ({"merge_method": "linear", "models": [{"model": "org/a+org/lora"}]}, "LoRA"),
                      ({**good, "slices": [{"sources": [{"model": sources["a"], "layer_range": [0, 2]}]}]},
                       "Exactly one of")):
        with pytest.raises(ValueError, match=says.replace("(", r"\(")):
            JobSpec(model="m", merge=bad)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**good, "paramters": {"t": 0.5}}))
    assert main(["quantize", str(path), "--out", str(tmp_path / "art")]) == 2
    assert "merge.paramters: not a field" in capsys.readouterr().err
    assert main(["merge", str(path), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "art").exists() and not (tmp_path / "m").exists() and not cache.exists()
    # sources resolve like any model: outside the allowed folders, or pickle weights, refused by name
    with pytest.raises(ModelSourceError, match=f"merge source {sources['b']}.*not under a folder"):
        merge.pin(good, Access(local_roots=(sources["a"],)))
    capsys.readouterr()
    assert main(["quantize", str(path), "--revision", "x", "--out", str(tmp_path / "art")]) == 2
    assert "pins its own sources" in capsys.readouterr().err


def test_merge_job_over_http_reports_each_source(tmp_path, sources):
    """A merge job submitted over HTTP runs to a quantized artifact whose report and card give each source's
    fp16 score beside the merged and the quantized model's; a recipe with a typo is a 422 naming the field."""
    from pathlib import Path

    from test_service import Server, auth
    roots = str(Path(sources["a"]).parent)
    recipe = {"merge_method": "slerp", "base_model": sources["a"], "parameters": {"t": 0.5},
              "models": [{"model": sources["a"]}, {"model": sources["b"]}]}
    spec = {"model": "tiny-slerp", "merge": recipe, "group_size": 32,
            "calibration": {"source": "model", "samples": 4, "seq_len": 32},
            "evaluation": {"text": "model", "windows": 2, "window_len": 32}}
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1, args=("--model-root", roots))
    try:
        r = srv.submit({**spec, "merge": {**recipe, "paramters": {"t": 0.5}}})
        assert r.status_code == 422 and "merge.paramters: not a field" in r.text, r.text
        r = srv.submit({**spec, "merge": {**recipe, "base_model": "/etc"}})
        assert r.status_code in (400, 403, 422) and "not under a folder" in r.text, r.text
        r = srv.submit(spec)
        assert r.status_code == 201, r.text
        job = srv.wait(r.json()["id"], timeout=240)
        assert job["state"] == "succeeded", srv.http.get(f"/v1/jobs/{job['id']}/logs", headers=auth("reader")).text
        steps = srv.http.get(f"/v1/jobs/{job['id']}/logs", headers=auth("reader")).text
        assert "merge 50% of" in steps
        art = Path(job["result"]["artifact"])
        rep = json.loads((art / "report.json").read_text())
        assert rep["merge"]["method"] == "slerp" and rep["revision"] == rep["merge"]["key"] == job["revision"]
        ppl = {s["model"]: s["scores"]["perplexity"] for s in rep["merge"]["sources"]}
        assert set(ppl) == {sources["a"], sources["b"]} and all(v > 1 for v in ppl.values())
        merged_ppl = rep["evaluation"]["rows"][0]["fp16"]
        assert merged_ppl not in ppl.values()
        card = (art / "README.md").read_text()
        assert "## Merge" in card and f"{ppl[sources['a']]:.3f}" in card and "merge_method: slerp" in card
        again = srv.submit(spec)                                    # the same recipe and sources: the same job
        assert again.status_code == 200 and again.json()["id"] == job["id"]
    finally:
        srv.close()


def test_release_and_batch_take_recipes(tmp_path, sources):
    """`quantfarm release recipe.yaml` merges once for all its variants; a batch file names recipe files."""
    from service.farm import batch
    recipe = {"merge_method": "linear", "models": [{"model": sources["a"], "parameters": {"weight": 1.0}},
                                                   {"model": sources["c"], "parameters": {"weight": 1.0}}]}
    path = tmp_path / "ac.yaml"
    path.write_text(yaml.safe_dump(recipe))
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump([{"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 32}]))
    assert main(["release", str(path), "--variants", str(variants), "--out", str(tmp_path / "rel"),
                 "--calibration", "model", "--samples", "4", "--seq-len", "32", "--eval-text", "model",
                 "--eval-windows", "2", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert [v["state"] for v in summary["variants"]] == ["succeeded", "succeeded"], summary
    assert summary["shared"].get("resolve") == 1                             # the second variant found the merge
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "rel").glob("*/report.json"))]
    assert len({r["merge"]["key"] for r in reports}) == 1 and reports[0]["spec"]["model"] == "ac"
    f = tmp_path / "nightly.yaml"
    f.write_text(yaml.safe_dump({"models": [{"model": "ac.yaml", "variants": [{"bits": 4, "group_size": 32}]}]}))
    rel = batch.load(f).release(0)
    assert rel.model == "ac" and rel.merge == recipe
