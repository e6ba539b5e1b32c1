"""The recovery report on a real SmolLM2 GPTQ artifact (a copy of the session's scaled-down demo job,
conftest.demo_artifact): quick and leaderboard suites, the three files, the baseline cache, the
quality gate for `quantfarm eval` and for a farm job."""
import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from service.cli.main import main
from service.job.spec import JobSpec
from service.farm.store import Store, migrate
from service.farm.worker import run_job
from tests.conftest import require_shared_data

pytestmark = pytest.mark.slow


WINDOWS = 2          # the demo job's --eval-windows (conftest.DEMO_ARGS)


def smol_spec(**kw):
    return JobSpec(model="smollm2-135m", group_size=64, calibration={"samples": 4, "seq_len": 64},
                   evaluation={"suite": "quick", "windows": WINDOWS}, **kw)


@pytest.fixture(scope="module")
def home(demo_artifact):
    """The demo job's QUANTFARM_HOME: its baseline cache holds the demo's fp16 evaluation."""
    return demo_artifact.home


@pytest.fixture(scope="module")
def art(demo_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / demo_artifact.folder.name       # the name its card uses
    shutil.copytree(demo_artifact.folder, out)
    return out, json.loads((out / "report.json").read_text())


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_quick_suite_writes_the_three_files(art):
    out, rep = art
    ev = rep["evaluation"]
    assert ev["parts"] == ["perplexity", "kld"] and ev["baseline_cache"] == {"text": "miss"}
    (row,) = ev["rows"]
    assert row["name"] == "perplexity" and row["n"] == WINDOWS * 511
    assert 10 < row["fp16"] < row["quantized"] < 3 * row["fp16"]
    assert ev["recovery"] == pytest.approx(row["fp16"] / row["quantized"])
    k = ev["kld"]
    assert 0 < k["median"] <= k["mean"] <= k["max"] and k["median"] <= k["p99"] <= k["max"]
    assert k["tokens"] == WINDOWS * 511
    assert 0.5 < k["top1_agreement"] < 1
    assert set(ev["versions"]) == {"quantfarm", "torch", "transformers", "lm_eval"}
    assert rep["calibration_hash"] and len(rep["layers"]) == 30
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "base_model" not in card  # a demo
    assert "**Verdict: " in card and "bits per weight" in card and "loads in" in card
    assert re.search(r"\| perplexity \|  \| perplexity \(lower is better\) \| 1022 \| [\d.]+ \| [\d.]+ \| [\d.]+% \|", card)
    page = (out / "report.html").read_text()
    pngs = images(page)            # per-layer error and KLD histogram (no task bars in quick), serving speed
    served = bool((rep.get("serving") or {}).get("speedup"))          # (the demo job measures it where vLLM is)
    assert len(pngs) == 2 + served and all(p.startswith(b"\x89PNG") for p in pngs)
    assert ("vLLM serving speed" in page) == served
    assert "Per-layer quantization error" in page and "Per-token KL divergence" in page


def test_model_card_snippet_runs_against_its_artifact(art):
    """The card's Python snippet, run as a user would next to the folder, loads the artifact through
    transformers and generates."""
    out, _ = art
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'model_dir = "{out.name}"' in code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=out.parent, timeout=600,
                       env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    prompt = "The capital of France is"
    assert prompt in r.stdout and len(r.stdout.split(prompt, 1)[1].strip()) > 5, r.stdout


def test_report_html_opens_with_the_verdict(art):
    out, _ = art
    page = html.unescape((out / "report.html").read_text())
    assert page.index("Verdict: ") < page.index("Recovery against fp16")
    assert "bits per weight" in page and "Settings used" in page and '"act_order": "static"' in page


def test_leaderboard_eval_report_and_cache(art, home, monkeypatch, capsys):
    out, _ = art
    require_shared_data("mmlu/dev/abstract_algebra_dev.csv")
    monkeypatch.setenv("QUANTFARM_HOME", str(home))
    assert main(["eval", str(out), "--suite", "leaderboard", "--limit", "1", "--device", "cpu"]) == 0
    ev = json.loads((out / "report.json").read_text())["evaluation"]
    names = ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"]
    assert [r["name"] for r in ev["rows"]] == names
    assert ev["baseline_cache"] == {n: "miss" for n in names}
    assert all(r["n"] == 1 for r in ev["rows"]) and ev["settings"]["limit"] == 1
    assert ev["average"]["fp16"] == pytest.approx(sum(r["fp16"] for r in ev["rows"]) / 6)
    assert ev["recovery_basis"].startswith("average of the task scores")
    page = (out / "report.html").read_text()     # task bars and per-layer error; no KLD in this suite
    served = bool((json.loads((out / "report.json").read_text()).get("serving") or {}).get("speedup"))
    assert len(images(page)) == 2 + served and "Per-task score, fp16 vs quantized" in page and "KL divergence" not in page
    card = (out / "README.md").read_text()
    for n in names:
        assert f"| {n}" in card
    from huggingface_hub import ModelCard            # the front matter as the Hub reads it
    data = ModelCard(card).data
    results = {r.dataset_type: r for r in data.eval_results}
    assert set(results) == {"ai2_arc", "hellaswag", "cais/mmlu", "truthful_qa", "winogrande", "gsm8k"}
    arc = results["ai2_arc"]
    assert (arc.dataset_config, arc.dataset_split, arc.dataset_args, arc.metric_type) == \
        ("ARC-Challenge", "test", {"num_few_shot": 25}, "acc_norm")
    row = next(r for r in ev["rows"] if r["name"] == "arc_challenge")
    assert arc.metric_value == round(100 * row["quantized"], 2) and arc.metric_args["fp16_value"] == round(100 * row["fp16"], 2)
    assert data.license == "apache-2.0" and data.language == ["en"] and data.quantized_by == "quantfarm"
    from evaluation.report import card_name
    assert data.model_name == card_name(json.loads((out / "report.json").read_text()))
    assert data.model_name.startswith("smollm2-135m ") and out.name not in data.model_name   # the model, no folder
    assert "base_model" not in data.to_dict()                                                # a demo, not a Hub model
    assert "| average (tasks) |" in card and "hellaswag: llama.cpp text layout" in card
    printed = capsys.readouterr().out

    # a second run reuses every fp16 result and reproduces the quantized ones
    assert main(["eval", str(out), "--suite", "leaderboard", "--limit", "1", "--device", "cpu"]) == 0
    again = json.loads((out / "report.json").read_text())["evaluation"]
    assert again["baseline_cache"] == {n: "hit" for n in names}
    assert [r["fp16"] for r in again["rows"]] == [r["fp16"] for r in ev["rows"]]
    assert [r["quantized"] for r in again["rows"]] == pytest.approx([r["quantized"] for r in ev["rows"]], abs=1e-6)
    capsys.readouterr()

    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["benchmark", "shots", "metric", "n", "fp16", "quantized", "recovery"]
    assert "arc_challenge" in table and "average (tasks)" in table
    assert printed.splitlines()[0] == table.splitlines()[0]


def test_eval_gate_exits_3(art, home, monkeypatch, capsys):
    out, _ = art
    monkeypatch.setenv("QUANTFARM_HOME", str(home))
    assert main(["eval", str(out), "--suite", "quick", "--eval-windows", str(WINDOWS), "--device", "cpu",
                 "--min-recovery", "1.5"]) == 3
    err = capsys.readouterr().err
    assert "failed quality: recovery" in err and "below min_recovery 1.5" in err
    assert json.loads((out / "report.json").read_text())["evaluation"]["baseline_cache"] == {"text": "hit"}


def test_report_without_evaluation_says_what_to_do(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps({"spec": {"model": "x"}}))
    assert main(["report", str(tmp_path)]) == 2
    assert f"run `quantfarm eval {tmp_path}` first" in capsys.readouterr().err


def test_job_below_min_recovery_ends_failed_quality(home, tmp_path):
    require_shared_data("wikitext2/wiki.valid.tokens")
    store = Store(f"sqlite:///{tmp_path}/q.db")
    migrate(store.engine)
    spec = smol_spec(min_recovery=1.5, algorithm="rtn")      # the gate is under test, not the algorithm
    job, _ = store.submit(spec.model_dump(), "gate", spec.model, "r")
    claimed = store.claim("w1", None)
    assert claimed["id"] == job["id"]
    assert run_job(store, claimed, "w1", home, "cpu") == "failed_quality"
    done = store.get(job["id"])
    assert done["state"] == "failed_quality"
    assert "below min_recovery 1.5" in done["error"] and "kept" in done["error"]
    (a,) = store.artifacts_of(job["id"])
    assert a["published"] is False
    assert (home / "artifacts" / job["id"] / "README.md").is_file()
    # the fp16 baseline of the module's first job was reused
    ev = json.loads((home / "artifacts" / job["id"] / "report.json").read_text())["evaluation"]
    assert ev["baseline_cache"] == {"text": "hit"}


def test_front_matter_names_a_hub_base_model_at_its_revision():
    """A Hub source is the card's base_model (with the pinned commit); local and demo sources are not."""
    from huggingface_hub import ModelCard

    from evaluation.model_index import front_matter
    rep = {"spec": {"model": "HuggingFaceTB/SmolLM2-135M", "format": "awq", "algorithm": "awq", "bits": 4},
           "revision": "0123456789abcdef0123456789abcdef01234567", "source_card": {"license": "apache-2.0"},
           "evaluation": {"rows": []}}
    data = ModelCard(front_matter(rep, "x") + "\n# x\n").data
    assert (data.base_model, data.base_model_relation) == ("HuggingFaceTB/SmolLM2-135M", "quantized")
    assert data.base_model_revision == rep["revision"] and data.tags == ["quantized", "awq", "4-bit", "quantfarm"]
    rep["spec"]["model"] = "/models/local-llama"
    assert "base_model" not in ModelCard(front_matter(rep, "x") + "\n# x\n").data.to_dict()
