"""Nightly batches against a real server: a batch run twice over local model folders, one changed in
between (only it is built again, the night report shows the change and the recovery delta), the
schedule firing on a short cron expression, one run per firing across processes."""
import json
import time

import pytest

from service.cli.main import main
from service.farm import batch
from service.farm.store import Store
from tiny import save_tiny

QUICK = {"calibration": {"source": "model", "samples": 4, "seq_len": 32},
         "evaluation": {"text": "model", "windows": 2, "window_len": 32}}


def batch_file(path, models, **extra):
    import yaml
    path.write_text(yaml.safe_dump({"name": "nightly", "models": [{"model": m} for m in models],
                                    "variants": [{"name": "g32", "group_size": 32},
                                                 {"name": "w8", "bits": 8, "group_size": -1}],
                                    **QUICK, **extra}))
    return path


def test_batch_file_errors(tmp_path):
    from core.errors import SpecError
    bad = tmp_path / "b.yaml"
    bad.write_text("models: [{model: x, preset: nope}]\n")
    with pytest.raises(SpecError, match=r"models\[0\] \(x\): unknown preset 'nope'"):
        batch.load(bad)
    bad.write_text("models: [{model: x}]\ncalibration: {samples: 0}\n")
    with pytest.raises(SpecError, match="calibration.samples"):
        batch.load(bad)
    with pytest.raises(SpecError, match="not found|No such file"):
        batch.load(tmp_path / "missing.yaml")
    ok = batch_file(tmp_path / "ok.yaml", ["x"])
    assert batch.load(ok).release(0).variants[1].bits == 8
    with pytest.raises(SpecError, match="not a valid cron expression"):
        batch.Scheduler(Store(f"sqlite:///{tmp_path}/s.db"), ok, "every night", pin=None, admit=None)


def test_batch_twice_builds_only_what_changed(tmp_path, capsys):
    from test_service import Server, auth
    models = tmp_path / "models"
    a, b = str(save_tiny(models / "a", seed=0)), str(save_tiny(models / "b", seed=1))
    f = batch_file(tmp_path / "nightly.yaml", [a, b])
    db, home = f"sqlite:///{tmp_path}/store.db", tmp_path / "home"
    srv = Server(home, db, workers=1, args=("--model-root", str(models)))
    common = ["--db", db, "--home", str(home), "--model-root", str(models), "--json"]
    try:
        assert main(["batch", "run", str(f), "--wait", *common]) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["state"] == "done" and first["counts"] == {"models": 2, "built": 4, "skipped": 0, "failed": 0,
                                                                  "regressed": 0}
        assert [m["change"] for m in first["models"]] == ["first", "first"]

        save_tiny(models / "b", seed=2)                                # upstream changed model b
        assert main(["batch", "run", str(f), "--wait", *common]) == 0
        second = json.loads(capsys.readouterr().out)
        ma, mb = second["models"]
        assert (ma["change"], mb["change"]) == ("unchanged", "new revision")
        assert mb["previous_revision"] == first["models"][1]["revision"] != mb["revision"]
        assert [v["built"] for v in ma["variants"]] == [False, False] and [v["built"] for v in mb["variants"]] == [True, True]
        assert [v["job_id"] for v in ma["variants"]] == [v["job_id"] for v in first["models"][0]["variants"]]
        for v, old in zip(mb["variants"], first["models"][1]["variants"]):
            assert v["previous_recovery"] == old["recovery"]
            assert v["delta"] == pytest.approx(v["recovery"] - old["recovery"])
            assert v["regressed"] == (v["delta"] < -0.01)
        assert all(v["delta"] == 0 for v in ma["variants"])
        assert second["counts"]["built"] == 2 and second["counts"]["skipped"] == 2
        md = (home / "batches" / second["run"] / "night-report.md").read_text()
        assert "b: new revision" in md and "a: unchanged" in md and "| g32 |" in md
        # the API: runs, a run's report, the counters
        runs = srv.http.get("/v1/batches", headers=auth("reader")).json()
        assert runs["total"] == 2 and runs["runs"][0]["id"] == second["run"] and runs["runs"][0]["counts"]["built"] == 2
        got = srv.http.get(f"/v1/batches/{second['run']}", headers=auth("reader")).json()
        assert got["models"][1]["change"] == "new revision"
        assert srv.http.get("/v1/batches/nope", headers=auth("reader")).status_code == 404
        assert srv.http.get("/v1/batches", params={"batch": "a\x00"}, headers=auth("reader")).status_code == 400
        metrics = srv.http.get("/metrics", headers=auth("reader")).text
        for line in ("quantfarm_batch_runs_total 2.0", "quantfarm_batch_built_total 6.0",
                     "quantfarm_batch_skipped_total 2.0", "quantfarm_batch_failed_total 0.0"):
            assert line in metrics, line
        # a model the server may not read fails alone, with its reason
        f2 = batch_file(tmp_path / "n2.yaml", [a, "/etc"])
        assert main(["batch", "run", str(f2), *common]) == 0
        third = json.loads(capsys.readouterr().out)
        assert third["refused"][0]["model"] == "/etc" and "--model-root" in third["refused"][0]["error"]
    finally:
        srv.close()


def test_schedule_fires_on_a_short_cron_once_per_firing(tmp_path):
    from test_service import Server, auth
    models = tmp_path / "models"
    a = str(save_tiny(models / "a", seed=0))
    f = batch_file(tmp_path / "nightly.yaml", [a])
    db, home = f"sqlite:///{tmp_path}/store.db", tmp_path / "home"
    srv = Server(home, db, workers=1, args=("--model-root", str(models), "--schedule", str(f),
                                            "--cron", "* * * * * */5"))
    try:
        deadline, runs = time.time() + 240, []
        while time.time() < deadline:
            runs = srv.http.get("/v1/batches", headers=auth("reader")).json()["runs"]
            if any(r["state"] == "done" for r in runs) and len(runs) >= 3:
                break
            time.sleep(1)
        done = [r for r in runs if r["state"] == "done"]
        assert done, runs
        assert len({r["slot"] for r in runs}) == len(runs)             # one run per firing
        assert {r["state"] for r in runs} <= {"running", "done", "overlap"}
        rep = srv.http.get(f"/v1/batches/{done[-1]['id']}", headers=auth("reader")).json()
        assert rep["models"][0]["model"] == a and rep["counts"]["failed"] == 0
        # a second scheduler on the same store (another API process) firing a slot already run gets nothing
        store = Store(db)
        other = batch.Scheduler(store, f, "* * * * * */5", pin=None, admit=None)
        taken = next(r for r in runs if r["state"] == "done")["slot"]
        from datetime import datetime
        when = datetime.strptime(taken, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=__import__("datetime").timezone.utc)
        assert batch.start(store, other.spec, pin=None, admit=None, slot=taken) is None
        assert other._has_slot(when.timestamp())
    finally:
        srv.close()
