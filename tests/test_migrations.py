"""The store's data migrations on rows written by an earlier schema, on SQLite and PostgreSQL."""
import time

import pytest
import sqlalchemy as sa

from service.farm.store import Store, migrate
from service.job.release import ReleaseSpec
from service.job.spec import JobSpec
from tests.test_service import pg_url  # noqa: F401  (the fixture)

# A job spec as the store kept it before 0004 (JobSpec.model_dump of that release: act_order "static" whatever
# the algorithm), and the recipe key that release gave it at revision "rev0".
OLD_AWQ = {"model": "smollm2-135m", "revision": "rev0", "algorithm": "awq", "format": "awq", "bits": 4,
           "group_size": 64, "sym": None, "act_order": "static", "true_sequential": True, "damp_percent": 0.01,
           "keep": [], "calibration": {"source": "auto", "samples": 128, "seq_len": 512, "seed": 0}}
OLD_AWQ_KEY = "ee076e2a838cbd7d4d1d4a35b4fbdcd3810c42bb0ce884d641df8a8551b53ffa"
OLD_RELEASE = {"model": "smollm2-135m", "variants": [
    {"name": "awq-w4", "algorithm": "awq", "format": "awq", "bits": 4, "group_size": 128, "act_order": "static"},
    {"name": "gptq-w4", "algorithm": "gptq", "format": "gptq", "bits": 4, "group_size": 128, "act_order": "dynamic"}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_0004_unsets_act_order_and_keeps_recipe_keys(db):
    with pytest.raises(ValueError, match="act-order applies to GPTQ only"):
        JobSpec.model_validate(OLD_AWQ)                  # what a worker would have refused
    store = Store(db, 30.0)
    migrate(store.engine, to="0003")
    meta = sa.MetaData()
    jobs, releases = (sa.Table(n, meta, autoload_with=store.engine) for n in ("jobs", "releases"))
    with store.engine.begin() as conn:
        conn.execute(sa.insert(jobs).values(id="a" * 32, dedup_key=OLD_AWQ_KEY, recipe_key=OLD_AWQ_KEY,
                                            model="smollm2-135m", revision="rev0", spec=OLD_AWQ, state="queued",
                                            layers_done=0, priority=0, memory_gb=1.0, attempt=1, max_attempts=3,
                                            cancel_requested=False, created_at=time.time()))
        conn.execute(sa.insert(releases).values(id="b" * 32, model="smollm2-135m", revision="rev0", spec=OLD_RELEASE,
                                                created_at=time.time()))
    migrate(store.engine)
    job = store.get("a" * 32)
    spec = JobSpec.model_validate(job["spec"])
    assert "act_order" not in job["spec"] and spec.weight_scheme().act_order.value == "none"
    assert spec.recipe_key("rev0") == job["recipe_key"] == OLD_AWQ_KEY   # the same job, artifact and publication
    with store.engine.begin() as conn:
        kept = conn.execute(sa.select(releases.c.spec)).scalar_one()
    assert [v.get("act_order") for v in kept["variants"]] == [None, "dynamic"]    # only "static" is unset
    assert [v.weight_scheme().act_order.value for v in ReleaseSpec.model_validate(kept).variants] == ["none", "dynamic"]
    migrate(store.engine)                                # idempotent
