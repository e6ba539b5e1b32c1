"""Issue 36, points 5-7: every path a submitter names goes through the farm's one path policy
(service/farm/policy.py), errors about text sources never quote a file, and admission reads a Hub model's
config and index files only, the worker fetching the weights. A real `quantfarm serve` on loopback, the Hub
as test_sources' loopback stand-in (the real one is unreachable here), the worker in this process."""
import json
import shutil
import sys
import time
import types
from pathlib import Path

import pytest

from calibration import sources
from core.errors import CalibrationError, EvaluationError, ModelSourceError, StorageError
from service.farm.policy import Policy, check_paths, check_text_source
from service.farm.store import Store
from service.job.sources import Access
from service.job.spec import JobSpec
from test_service import SMALL, Server
from test_sources import SHA, FakeHub
from tiny import save_tiny

SECRET = "hunter2-do-not-echo"
CSV = f"user,password\nadmin,{SECRET}\n"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Models (two tiny ones), data (a calibration file) and, outside both, planted credentials: a CSV, a
    JSONL whose keys are secrets, a folder like ~/.ssh, and a model."""
    base = tmp_path_factory.mktemp("paths")
    models, data, outside = base / "models", base / "data", base / "outside"
    for d in (models, data, outside, outside / "ssh"):
        d.mkdir()
    save_tiny(models / "a")
    save_tiny(models / "b", seed=1)
    shutil.copytree(models / "a", outside / "model")
    (data / "calib.txt").write_text("w1 w2 w3 " * 400)
    (outside / "creds.csv").write_text(CSV)
    (outside / "creds.jsonl").write_text(json.dumps({SECRET: "x"}) + "\n")
    (outside / "ssh" / "id_rsa").write_text(SECRET)
    (outside / "template.jinja").write_text(SECRET)
    return {"models": models, "data": data, "outside": outside, "base": base}


@pytest.fixture(scope="module")
def hub(roots):
    """The loopback Hub with a tiny model whose weights are in two shards and an index."""
    from transformers import AutoModelForCausalLM
    folder = roots["base"] / "sharded"
    save_tiny(folder)
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="250KB")
    (folder / "model.safetensors").unlink()
    assert (folder / "model.safetensors.index.json").is_file()
    server = FakeHub()
    server.add("org/tiny", folder)
    yield server
    server.close()


@pytest.fixture(scope="module")
def farm(tmp_path_factory, roots, hub):
    """serve with model and data roots, online against the stand-in Hub (no worker: this module runs it)."""
    home = tmp_path_factory.mktemp("farm")
    srv = Server(home, f"sqlite:///{home}/store.db", workers=0,
                 args=("--model-root", str(roots["models"]), "--data-root", str(roots["data"])),
                 env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(home / "hf"),
                      "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    yield srv
    srv.close()


@pytest.fixture
def online(hub, monkeypatch):
    """This process against the stand-in Hub, whatever HF_HUB_OFFLINE it was started with."""
    from huggingface_hub import constants
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hub


def refused(farm, spec: dict, status: int) -> str:
    r = farm.submit(spec)
    assert r.status_code == status, (spec, r.status_code, r.text)
    assert SECRET not in r.text and "password" not in r.text
    return r.json()["detail"]


# ---- calibration and evaluation text ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/abs/path", "../x", "./x", "x/../y", "a/b/c", "~/x", ".hidden", "org/na..me",
                                  "org--x/y", "x/"])
def test_hf_names_only_hub_ids(name):
    with pytest.raises(CalibrationError, match="not a Hub dataset id|expected hf:NAME"):
        sources.classify(f"hf:{name}")


def test_hub_ids_pass_and_only_while_the_server_is_online(monkeypatch):
    assert sources.classify("hf:allenai/c4:en:train") == ("hub", ("allenai/c4", "en", "train"))
    assert sources.classify("hf:wikitext:wikitext-2-raw-v1") == ("hub", ("wikitext", "wikitext-2-raw-v1", "train"))
    with pytest.raises(CalibrationError, match="split"):
        sources.classify("hf:org/ds:en:../train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="without the Hub"):
        check_text_source("calibration source", "hf:allenai/c4", Policy())


def test_text_source_errors_quote_nothing(tmp_path, monkeypatch):
    """A JSONL whose key is a secret, a file that is not UTF-8, and Hub rows without a text column (their
    columns are a CSV's header line): each error says what is wrong, not what the file holds."""
    keyed, binary = tmp_path / "keyed.jsonl", tmp_path / "binary.txt"
    keyed.write_text(json.dumps({SECRET: "x"}) + "\n")
    binary.write_bytes(b"\xff\xfe" + SECRET.encode())
    for path, says in ((keyed, 'no string field "text"'), (binary, "not UTF-8")):
        with pytest.raises(CalibrationError, match=says) as e:
            list(sources.resolve_text_source(str(path)).documents())
        assert SECRET not in str(e.value)
    rows = [{"user": "admin", SECRET: "x"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: iter(rows)))
    monkeypatch.setattr(sources, "_hub_unreachable", lambda name: None)
    with pytest.raises(CalibrationError, match='no string column "text"') as e:
        list(sources.resolve_text_source("hf:org/ds").documents())
    assert SECRET not in str(e.value) and "user" not in str(e.value)


def test_task_data_errors_quote_nothing(tmp_path):
    from evaluation.task_data import splits
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("\n".join(["q", SECRET, "a", "b", "c", "d"]) + "\n")
    with pytest.raises(EvaluationError, match="not in the layout") as e:
        splits("hellaswag", tmp_path)
    assert SECRET not in str(e.value)


def test_submissions_name_no_host_file(farm, roots):
    """hf: names that are paths, files and folders outside the data roots: 4xx at submission, one answer
    whether the thing exists or not, nothing of its content."""
    outside = roots["outside"]
    for src in (f"hf:{outside / 'creds.csv'}", f"hf:{outside}", "hf:../outside", "hf:./x", "hf:/root/.ssh"):
        assert "not a Hub dataset id" in refused(farm, {**SMALL, "calibration": {**SMALL["calibration"],
                                                                                  "source": src}}, 400)
        assert "not a Hub dataset id" in refused(farm, {**SMALL, "evaluation": {"text": src}}, 400)
    answers = set()
    for src in (str(outside / "creds.csv"), str(outside / "creds.jsonl"), str(outside / "missing.jsonl"),
                f"file:{outside / 'creds.csv'}", str(outside / "ssh" / "id_rsa.txt"), str(outside / "ssh")):
        detail = refused(farm, {**SMALL, "calibration": {**SMALL["calibration"], "source": src}}, 400)
        answers.add(detail.replace(repr(src.removeprefix("file:")), "REF"))
        detail = refused(farm, {**SMALL, "evaluation": {"text": src}}, 400)
        answers.add(detail.replace(repr(src.removeprefix("file:")), "REF").replace("evaluation text",
                                                                                   "calibration source"))
    assert len(answers) == 1 and "--data-root" in answers.pop(), answers
    folders = {refused(farm, {**SMALL, "evaluation": {"data_dir": d}}, 400).replace(repr(d), "REF")
               for d in (str(outside / "ssh"), str(outside / "nope"), "/root/.ssh")}
    assert len(folders) == 1, folders
    assert farm.submit({**SMALL, "calibration": {**SMALL["calibration"], "source": "hf:allenai/c4"}}).status_code == 201


# ---- merge recipes ------------------------------------------------------------------------------------

def test_merge_recipes_read_no_host_file(farm, roots):
    a, b, outside = str(roots["models"] / "a"), str(roots["models"] / "b"), roots["outside"]
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    for template in ("/etc/passwd", str(outside / "template"), "../../../../etc/passwd", "no-such-template"):
        with pytest.raises(ValueError, match="chat_template"):
            JobSpec(model="m", merge={**recipe, "chat_template": template})
        assert "chat_template" in refused(farm, {**SMALL, "model": "m", "merge": {**recipe, "chat_template": template}},
                                          422)
    for i, template in enumerate(("chatml", "auto", "{% for m in messages %}{{ m['content'] }}{% endfor %}")):
        r = farm.submit({**SMALL, "model": f"merged-{i}", "merge": {**recipe, "chat_template": template}})
        assert r.status_code == 201, r.text
    # every field mergekit reads a model from: outside the model roots, one answer whether it exists or not
    for there in (str(outside / "model"), str(outside / "missing"), "/etc"):
        answers = {refused(farm, {**SMALL, "model": "m", "merge": bad}, 400).replace(there, "REF")
                   for bad in ({**recipe, "tokenizer_source": there},
                               {**recipe, "tokenizer": {"source": there}},
                               {**recipe, "base_model": there},
                               {**recipe, "models": [*recipe["models"], {"model": {"model": {"path": there}},
                                                                          "parameters": {"weight": 1.0}}]})}
        assert len(answers) == 1 and "--model-root" in answers.pop()
    with pytest.raises(ModelSourceError, match="merge source /etc: .*--model-root"):
        check_paths(JobSpec(model="m", merge={**recipe, "tokenizer_source": "/etc"}),
                    Policy(model_roots=(roots["models"],)))


# ---- admission: config and index only; the worker fetches the weights ------------------------------------

def test_admission_fetches_no_weights_and_the_worker_does(farm, roots, online, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from service.farm.worker import run_job
    hub = online
    before = len(hub.log)
    t = time.perf_counter()
    r = farm.submit({**SMALL, "model": "org/tiny", "group_size": 32, "priority": 10})     # claimed first
    seconds = time.perf_counter() - t
    assert r.status_code == 201, r.text
    during = [path for _, path in hub.log[before:]]
    assert any(p.endswith("/config.json") for p in during) and any(p.endswith(".index.json") for p in during)
    assert not [p for p in during if p.endswith(".safetensors")], during
    assert seconds < 30, seconds

    # the worker (here, with the server's Hub cache): weights after the checks, with a step per file
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(farm.home / "hf"))
    store = Store(f"sqlite:///{farm.home}/store.db")
    job = store.claim("test-worker")
    assert job["id"] == r.json()["id"]
    after = len(hub.log)
    state = run_job(store, job, "test-worker", tmp_path, "cpu", Policy(model_roots=(roots["models"],),
                                                                       data_roots=(roots["data"],)))
    assert state == "succeeded", store.get(job["id"])["error"]
    fetched = sorted({p.rsplit("/", 1)[-1] for m, p in hub.log[after:] if m == "GET" and p.endswith(".safetensors")})
    assert fetched == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], hub.log[after:]
    steps = [e["message"] for e in store.events_after(job["id"]) if e["kind"] == "step"]
    assert "download model-00001-of-00002.safetensors (1/2" in " ".join(steps), steps
    assert any(s.endswith(": 100%") for s in steps), steps
    assert steps.index("resolve") < next(i for i, s in enumerate(steps) if s.startswith("download"))


def test_weights_need_room_and_stop_on_cancel(online, roots, tmp_path):
    """fetch_weights: the Hub's listed sizes checked against the cache's disk before the first byte; a
    cancel stops the file, and the next fetch completes it."""
    from quantizers.walk import Cancelled
    from service.job.hub_weights import fetch_weights
    from service.job.models import resolve_model
    hub = online
    hub.add("org/huge", roots["models"] / "a", sizes={"model.safetensors": 10 ** 16})
    src = resolve_model("org/huge", weights=False, access=Access(cache_dir=str(tmp_path)))
    assert src.revision == SHA and src.pending.nbytes == 10 ** 16 and (Path(src.path) / "config.json").is_file()
    with pytest.raises(StorageError, match="not enough space"):
        fetch_weights(src)
    assert not hub.requested("/model.safetensors")
    hub.add("org/small", roots["models"] / "a")
    src = resolve_model("org/small", weights=False, access=Access(cache_dir=str(tmp_path)))
    with pytest.raises(Cancelled):
        fetch_weights(src, should_stop=lambda: True)
    assert not (Path(src.path) / "model.safetensors").exists()
    steps = []
    done = fetch_weights(src, on_step=steps.append)
    assert done.pending is None and (Path(done.path) / "model.safetensors").is_file() and done == src
    assert steps[0].startswith("download model.safetensors (1/1") and steps[-1].endswith("100%")


def test_preflight_refuses_a_7b_from_its_config_alone(online, roots, tmp_path, monkeypatch):
    """Issue 37: a Llama-2-7B-sized Hub model (config, tokenizer and shard index; the shards listed at 13.5 GB)
    asked for as AWQ at 8 bits is refused from its config within 2 s, before any weight is requested and
    before any fp16 baseline or calibration, the same `pipeline.run` a worker and the CLI call."""
    from huggingface_hub import constants

    from core.errors import SpecError
    from service.job import pipeline
    hub = online
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "llama-7b"
    shutil.copytree(roots["models"] / "a", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, head_dim=128)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for s in shards:
        (folder / s).write_bytes(b"\0")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 13_476_839_424}, "weight_map": {"lm_head.weight": shards[1]}}))
    hub.add("org/llama-7b", folder, sizes={shards[0]: 9_976_576_152, shards[1]: 3_500_296_424})
    before = len(hub.log)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="cannot write awq results as awq 8-bit"):
        pipeline.run(JobSpec(model="org/llama-7b", algorithm="awq", format="awq", bits=8),
                     tmp_path / "out", device="cpu", cache_dir=None)
    seconds = time.perf_counter() - t0
    assert not [p for _, p in hub.log[before:] if p.endswith(".safetensors")], hub.log[before:]
    assert not (tmp_path / "out").exists()
    assert seconds < 2, seconds
