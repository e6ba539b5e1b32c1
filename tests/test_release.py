"""Releases: one model at one pinned revision, several variants sharing what does not depend on the
variant; in this process (`quantfarm release --out`) and on a real server (POST /v1/releases)."""
import json
import time

import pytest
from pydantic import ValidationError
from safetensors.torch import load_file

from evaluation import release_report
from quantizers.artifact import load_artifact
from service.job import pipeline, release
from service.job.release import ReleaseSpec
from tiny import save_tiny

SMALL = {"calibration": {"source": "model", "samples": 4, "seq_len": 32},
         "evaluation": {"text": "model", "windows": 2, "window_len": 32}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "llama"))


def test_spec_validation():
    with pytest.raises(ValidationError, match="preset .* or a list of variants"):
        ReleaseSpec(model="m", preset="vllm", variants=[{"bits": 4}])
    with pytest.raises(ValidationError, match="preset .* or a list of variants"):
        ReleaseSpec(model="m")
    with pytest.raises(ValidationError, match="unknown preset 'nope'"):
        ReleaseSpec(model="m", preset="nope")
    with pytest.raises(ValidationError, match="repeated: gptq-w4-g128"):
        ReleaseSpec(model="m", variants=[{"bits": 4}, {"bits": 4, "damp_percent": 0.1}])
    with pytest.raises(ValidationError, match=r"variants\[1\] \(awq-w4-g128\).*zero points"):
        ReleaseSpec(model="m", variants=[{}, {"algorithm": "awq", "format": "awq", "sym": True}])
    with pytest.raises(ValidationError, match="extra"):
        ReleaseSpec(model="m", variants=[{"model": "other"}])        # the model is the release's


def test_presets_fit_groups_to_the_model():
    jobs = ReleaseSpec(model="m", preset="vllm").jobs("rev", {576, 1536})       # SmolLM2's input widths
    by_name = {n: (s, note) for n, s, note in jobs}
    assert set(by_name) == {"gptq-w4-g64", "awq-w4-g64", "w4a16", "w8a16"}
    assert by_name["gptq-w4-g64"][0].group_size == 64 and "576" in by_name["gptq-w4-g64"][1]
    assert by_name["w8a16"][0].group_size == -1 and by_name["w8a16"][1] is None
    assert {s.revision for s, _ in by_name.values()} == {"rev"}
    assert [n for n, _, _ in ReleaseSpec(model="m", preset="thebloke").jobs("rev", {4096, 14336})] == [
        "gptq-4bit-128g-actorder", "gptq-4bit-32g-actorder", "gptq-8bit-128g-actorder", "awq-4bit-128g",
        "gguf-q2_k", "gguf-q3_k_m", "gguf-q4_k_m", "gguf-q5_k_m", "gguf-q6_k", "gguf-q8_0"]
    gguf = {n: s for n, s, _ in ReleaseSpec(model="m", preset="gguf").jobs("rev", {576, 1536})}
    assert gguf["gguf-q4_k_m"].format == "gguf" and gguf["gguf-q4_k_m"].gguf_type == "Q4_K_M"
    assert {s.imatrix for s in gguf.values()} == {"quantfarm"} and gguf["gguf-q2_k"].group_size == 128
    explicit = ReleaseSpec(model="m", variants=[{"group_size": 128}]).jobs("rev", {576})
    assert explicit[0][1].group_size == 128 and explicit[0][2] is None       # what was asked for explicitly stays


def test_release_in_process_shares_work_and_matches_single_jobs(tiny_dir, tmp_path):
    rs = ReleaseSpec(model=tiny_dir, preset="vllm", **SMALL)
    s = release.run(rs, tmp_path / "rel", device="cpu")
    assert s["state"] == "succeeded" and [r["variant"] for r in s["variants"]] == [
        "gptq-w4-g64", "awq-w4-g64", "w4a16", "w8a16"]
    # resolve, calibration, held-out text and the fp16 baseline: once for the release, reused by the other three
    assert s["shared"] == {"resolve": 4, "calibration": 3, "eval_text": 3, "baseline": 3}
    first, *rest = s["variants"]
    assert first["reused"].get("baseline") is None and all(r["reused"]["calibration"] == 1 for r in rest)
    for r in s["variants"]:
        assert r["perplexity"]["fp16"] == first["perplexity"]["fp16"] and 0.9 < r["recovery"] <= 1.1
        assert r["size_bytes"] > 0 and r["bits_per_weight"] > 0 and "transformers" in r["loads_in"]
        _, _, qc = load_artifact(r["artifact"], with_tokenizer=False)              # our reader loads each
        assert qc["quant_method"] == {"gptq": "gptq", "awq": "awq"}.get(r["format"], "compressed-tensors")
    # shared work changes nothing: the same variant as a job on its own writes the same tensors
    name, job, _ = rs.jobs(s["revision"], {64, 128})[2]
    alone = pipeline.run(job, tmp_path / "alone", device="cpu")
    a, b = load_file(f"{alone.artifact}/model.safetensors"), load_file(f"{tmp_path}/rel/{name}/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # the summary: JSON, model-card index and HTML page
    saved = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert saved["variants"] == json.loads(json.dumps(s["variants"]))
    readme = (tmp_path / "rel" / "README.md").read_text()
    assert "base_model_relation: quantized" in readme and "| w8a16 | succeeded | compressed-tensors | 8 |" in readme
    assert "base_model:" not in readme                                        # a local source has no Hub id
    assert "group 128 -&gt; 64" in readme                                     # prose with its HTML made inert
    page = (tmp_path / "rel" / "index.html").read_text()
    assert "<img" in page and "w4a16" in page


def test_failed_variant_does_not_stop_the_release(tiny_dir, tmp_path):
    rs = ReleaseSpec(model=tiny_dir, variants=[{"name": "ok", "group_size": 32},
                                               {"name": "gated", "group_size": 32, "bits": 2}],
                     min_recovery=0.999, **SMALL)
    s = release.run(rs, tmp_path / "rel", device="cpu")
    states = {r["variant"]: r["state"] for r in s["variants"]}
    assert states["gated"] == "failed_quality" and "below min_recovery" in s["variants"][1]["error"]
    assert s["state"] == ("gated" if states["ok"] in ("succeeded", "failed_quality") else "partial")
    assert release.state(["succeeded", "failed"]) == "partial" and release.state(["failed", "cancelled"]) == "failed"
    assert release.state(["succeeded", "queued"]) == "running" and release.state(["succeeded"] * 2) == "succeeded"
    assert "gated failed_quality" in "\n".join(release_report.notes(s))


def test_cli_release_variants_file(tiny_dir, tmp_path):
    from service.cli.main import main
    f = tmp_path / "variants.yaml"
    f.write_text("- {name: rtn8, algorithm: rtn, bits: 8, group_size: 32}\n"
                 "- {name: rtn4, algorithm: rtn, bits: 4, group_size: 32}\n")
    rc = main(["release", tiny_dir, "--variants", str(f), "--out", str(tmp_path / "r"), "--device", "cpu",
               "--eval-text", "model", "--eval-windows", "2", "--json"])
    assert rc == 0
    s = json.loads((tmp_path / "r" / "release.json").read_text())
    assert [(r["variant"], r["bits"], r["state"]) for r in s["variants"]] == [("rtn8", 8, "succeeded"),
                                                                               ("rtn4", 4, "succeeded")]
    assert s["variants"][0]["perplexity"]["quantized"] <= s["variants"][1]["perplexity"]["quantized"] * 1.01
    assert main(["release", tiny_dir, "--variants", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2


def test_release_over_http(tiny_dir, tmp_path, capsys):
    from test_service import Server, auth
    srv = Server(tmp_path / "home", f"sqlite:///{tmp_path}/store.db", workers=1,
                 args=("--model-root", str(tmp_path.parent), "--model-root", tiny_dir))
    try:
        body = {"model": tiny_dir, **SMALL, "variants": [{"name": "g32", "group_size": 32},
                                                         {"name": "w8", "bits": 8, "group_size": -1}]}
        r = srv.http.post("/v1/releases", json=body, headers=auth("alice"))
        assert r.status_code == 201, r.text
        rel = r.json()
        assert [v["variant"] for v in rel["variants"]] == ["g32", "w8"] and rel["state"] == "running"
        deadline = time.time() + 300
        while rel["state"] == "running" and time.time() < deadline:
            time.sleep(1)
            rel = srv.http.get(f"/v1/releases/{rel['id']}", headers=auth("reader")).json()
        assert rel["state"] == "succeeded", rel
        assert all(v["recovery"] and v["size_bytes"] for v in rel["variants"]), rel
        jobs_before = srv.http.get("/v1/jobs", headers=auth("reader")).json()["total"]
        # the same variant in a second release links the job that built it; a new one is queued
        r2 = srv.http.post("/v1/releases", json={**body, "variants": [{"name": "again", "group_size": 32},
                                                                      {"name": "g64", "group_size": 64}]},
                           headers=auth("bob")).json()
        assert [(v["variant"], v["reused_job"]) for v in r2["variants"]] == [("again", True), ("g64", False)]
        assert r2["variants"][0]["job_id"] == rel["variants"][0]["job_id"]
        assert srv.http.get("/v1/jobs", headers=auth("reader")).json()["total"] == jobs_before + 1
        # one bad variant refuses the whole release before anything is queued
        bad = srv.http.post("/v1/releases", json={**body, "variants": [{"group_size": 32}, {"group_size": 4096}]},
                            headers=auth("alice"))
        assert bad.status_code == 422 and "wider than the model's widest Linear input" in bad.json()["detail"]
        assert srv.http.get("/v1/jobs", headers=auth("reader")).json()["total"] == jobs_before + 1
        assert srv.http.post("/v1/releases", json=body, headers=auth("reader")).status_code == 403
        listed = srv.http.get("/v1/releases", headers=auth("reader")).json()
        assert listed["total"] == 2 and {x["id"] for x in listed["releases"]} == {rel["id"], r2["id"]}
        md = srv.http.get(f"/v1/releases/{rel['id']}/README.md", headers=auth("reader"))
        assert md.status_code == 200 and "| g32 | succeeded |" in md.text
        assert "<table>" in srv.http.get(f"/v1/releases/{rel['id']}/index.html", headers=auth("reader")).text
        assert srv.http.get("/v1/releases/nope", headers=auth("reader")).status_code == 404
        assert srv.http.get("/v1/releases", params={"model": "a\x00b"}, headers=auth("reader")).status_code == 400
        # the CLI: submit a release to the server, list and show releases
        from service.cli.main import main
        from test_service import TOKENS
        f = tmp_path / "v.json"
        f.write_text(json.dumps([{"name": "cli-g32", "group_size": 32}]))
        cli = ["--server", srv.url, "--token", TOKENS["alice"]]
        assert main(["release", tiny_dir, "--variants", str(f), "--calibration", "model", "--samples", "4",
                     "--seq-len", "32", "--eval-text", "model", "--eval-windows", "2", "--json", *cli]) == 0
        submitted = json.loads(capsys.readouterr().out)
        assert [v["variant"] for v in submitted["variants"]] == ["cli-g32"] and submitted["variants"][0]["reused_job"]
        assert main(["releases", *cli]) == 0 and submitted["id"][:12] in capsys.readouterr().out
        assert main(["releases", rel["id"], *cli]) == 0
        shown = capsys.readouterr().out
        assert "state     succeeded" in shown and "g32" in shown and "w8" in shown
    finally:
        srv.close()


@pytest.mark.slow
def test_smollm2_release_shares_baseline_and_calibration(tmp_path):
    """The real model: two GPTQ variants evaluate the fp16 model and build calibration once; the second
    variant's job spends no time on either."""
    rs = ReleaseSpec(model="smollm2-135m", variants=[{"name": "w4", "group_size": 64}, {"name": "w8", "bits": 8,
                                                                                        "group_size": 64}],
                     calibration={"samples": 4, "seq_len": 128}, evaluation={"windows": 2})
    s = release.run(rs, tmp_path / "rel", device="cpu")
    w4, w8 = s["variants"]
    assert s["state"] == "succeeded" and s["shared"] == {"resolve": 2, "calibration": 1, "eval_text": 1, "baseline": 1}
    reports = [json.loads((tmp_path / "rel" / n / "report.json").read_text()) for n in ("w4", "w8")]
    assert "evaluate_fp16" in reports[0]["seconds"] and reports[0]["evaluation"]["baseline_cache"]["text"] == "miss"
    assert reports[1]["evaluation"]["baseline_cache"]["text"] == "hit"
    assert reports[0]["calibration_hash"] == reports[1]["calibration_hash"]
    assert w4["perplexity"]["fp16"] == w8["perplexity"]["fp16"]
    assert w8["perplexity"]["quantized"] < w4["perplexity"]["quantized"] and w8["recovery"] > 0.97
    assert w4["size_bytes"] < w8["size_bytes"] and set(w4["loads_in"]) >= {"vllm", "transformers"}


def test_hardware_presets_name_their_schemes():
    """hopper / ampere / cpu: the schemes llm-compressor's guide pairs with that hardware; a scheme whose group
    would be ragged on the model becomes its grid at the fitted group, without the scheme's name."""
    by_name = {n: (s, note) for n, s, note in ReleaseSpec(model="m", preset="hopper").jobs("rev", {576, 1536})}
    assert set(by_name) == {"rtn-fp8-dynamic", "gptq-w4a16-g64"}
    fp8, w4 = by_name["rtn-fp8-dynamic"], by_name["gptq-w4a16-g64"]
    assert (fp8[0].scheme, fp8[0].format, fp8[0].algorithm, fp8[1]) == ("FP8_DYNAMIC", "compressed-tensors", "rtn", None)
    assert (w4[0].scheme, w4[0].bits, w4[0].group_size) == (None, 4, 64) and "W4A16's grid at group 64" in w4[1]
    cpu = {n: s for n, s, _ in ReleaseSpec(model="m", preset="cpu").jobs("rev", {4096, 14336})}
    assert cpu["gptq-w8a8"].scheme == "W8A8" and cpu["gguf-q4_k_m"].gguf_type == "Q4_K_M"
    ampere = {n: s for n, s, _ in ReleaseSpec(model="m", preset="ampere").jobs("rev", {4096})}
    assert {(s.scheme, s.group_size) for s in ampere.values()} == {("W4A16", 128), ("W8A16", 128)}
