"""The farm as an operator's browser meets it (issue 36, point 10), against a real `quantfarm serve` on
loopback: /docs open with the schema behind a token (its bearer scheme for Swagger UI's Authorize), artifact
and release files with their own media types under a strict policy, the short ids the CLI prints accepted,
user-given names escaped in cards and pages, cards named after the model, and `batch run --wait` that
says what it waits for and gives up when no worker is alive. Swagger UI itself runs in Debian's chromium
through Playwright where both are installed (neither is a dependency: that test skips without them)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.farm import docs, media
from service.farm.auth import Auth
from test_service import TOKENS, Server, auth, tokens_file
from tiny import save_tiny

QUICK = {"calibration": {"source": "model", "samples": 4, "seq_len": 32},
         "evaluation": {"text": "model", "windows": 2, "window_len": 32}}
CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "x<script>alert(1)<script>"          # a folder name: a path cannot hold the closing tag's slash


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A server with one worker, a tiny model under its model root, and one finished job of it."""
    base = tmp_path_factory.mktemp("web")
    models = base / "models"
    save_tiny(models / "tiny-llama")
    save_tiny(models / HOSTILE, seed=1)
    srv = Server(base / "home", f"sqlite:///{base}/store.db", workers=1, args=("--model-root", str(models)))
    try:
        r = srv.submit({"model": str(models / "tiny-llama"), "group_size": 32, **QUICK})
        assert r.status_code == 201, r.text
        job = srv.wait(r.json()["id"])
        assert job["state"] == "succeeded", job
        yield srv, models, job
    finally:
        srv.close()


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=180,
                          env=env)


# ---- /docs -------------------------------------------------------------------------------------------------

def test_docs_page_is_open_and_the_schema_behind_a_bearer_token(web):
    srv, _, _ = web
    page = srv.http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs/assets/quantfarm-docs.js" in assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for a in assets:
        assert srv.http.get(a).status_code == 200, a
    assert srv.http.get("/docs/assets/index.html").status_code == 404
    assert srv.http.get("/openapi.json").status_code == 401
    schema = srv.http.get("/openapi.json", headers=auth("reader")).json()
    assert schema["components"]["securitySchemes"][docs.SCHEME] == {
        "type": "http", "scheme": "bearer", "description": docs.BEARER.model.description}
    assert schema["paths"]["/v1/jobs"]["get"]["security"] == [{docs.SCHEME: []}]
    assert schema["paths"]["/v1/jobs"]["post"]["security"] == [{docs.SCHEME: []}]
    assert "security" not in schema["paths"]["/v1/healthz"]["get"]            # needs no token
    params = [p["name"].lower() for op in schema["paths"].values() for m in op.values()
              for p in m.get("parameters", [])]
    assert "authorization" not in params                                      # the scheme, not a header field
    files = schema["paths"]["/v1/artifacts/{artifact_id}/files/{path}"]["get"]["responses"]["200"]["content"]
    assert {"text/html", "text/markdown", "application/json", "image/png", media.OCTET} <= set(files)
    log = (srv.home / "serve.log").read_text()
    assert "docs at /docs: the page asks for a read token from the tokens file" in log, log[-2000:]


def test_docs_banner_follows_the_tokens_file(tmp_path):
    closed = Auth.from_file(tokens_file(tmp_path))
    opened = Auth.from_file(tokens_file(tmp_path, public=["docs"]))
    anonymous = Auth.from_file(tokens_file(tmp_path, anonymous_read=True))
    assert "asks for a read token" in docs.banner(closed)
    assert docs.banner(opened) == docs.banner(anonymous) == "docs at /docs, open to all"


# ---- media types --------------------------------------------------------------------------------------------

def test_artifact_files_have_their_own_types_and_a_strict_policy(web):
    srv, _, job = web
    short = job["artifacts"][0]["id"][:8]                       # `download` names its folder so
    listing = srv.http.get(f"/v1/artifacts/{short}", headers=auth("reader")).json()
    names = {f["path"]: f["url"] for f in listing["files"]}
    assert {"report.html", "README.md", "report.json", "model.safetensors"} <= set(names), sorted(names)
    want = {"report.html": "text/html; charset=utf-8", "README.md": "text/markdown; charset=utf-8",
            "report.json": "application/json", "model.safetensors": "application/octet-stream"}
    for name, kind in want.items():
        r = srv.http.get(names[name], headers=auth("reader"))
        assert r.status_code == 200 and r.headers["content-type"] == kind, (name, r.headers)
        assert r.headers["x-content-type-options"] == "nosniff", name
        csp = r.headers.get("content-security-policy", "")
        assert (csp == media.DOCUMENT_CSP) == kind.startswith("text/"), (name, csp)
        disposition = r.headers.get("content-disposition", "")
        assert disposition.startswith("attachment") == (kind == media.OCTET), (name, disposition)
    assert "sandbox" in media.DOCUMENT_CSP and "script" not in media.DOCUMENT_CSP
    page = srv.http.get(names["report.html"], headers=auth("reader")).text
    assert "<script" not in page and "src=\"http" not in page            # all it needs: inline styles, data: images
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'<img[^>]* src="([^"]+)"', page))
    assert media.headers("w\"e\nird.bin")["Content-Disposition"].startswith('attachment; filename="w_e_ird.bin"')


def test_model_card_is_named_after_the_model(web):
    srv, models, job = web
    card = srv.http.get(f"/v1/artifacts/{job['artifacts'][0]['id']}/files/README.md", headers=auth("reader")).text
    assert "\n# tiny-llama: GPTQ w4 g32 sym (gptq)\n" in card, card[:1500]
    assert str(models) not in card                               # the server's folders stay on the server
    assert job["id"] not in card.split("\n## ")[0], card[:1500]
    # model-index lists standard datasets only, so this job's card (scored on the model's own text) has none;
    # the same report scored on WikiText-2 has one, named after the model
    from evaluation.report import model_card
    rep = srv.http.get(f"/v1/jobs/{job['id'][:8]}/report", headers=auth("reader")).json()
    rep["evaluation"]["text"] = "wikitext2"
    front = model_card(rep, job["id"]).split("\n---\n", 1)[0]
    assert "- name: tiny-llama GPTQ w4 g32 sym (gptq)" in front and job["id"] not in front, front
    from evaluation.report import html_page
    rep["source_card"]["name"] = "<script>alert(1)</script>"           # a merge may be called anything
    for text in (model_card(rep, job["id"]), html_page(rep)):
        assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


# ---- releases: media types, short ids, escaped names ----------------------------------------------------------

def test_release_files_escape_names_and_take_the_ids_the_cli_prints(web, tmp_path):
    srv, models, _ = web
    body = {"model": str(models / HOSTILE), **QUICK, "variants": [{"name": "g32", "group_size": 32}]}
    r = srv.http.post("/v1/releases", json=body, headers=auth("alice"))
    assert r.status_code == 201, r.text
    full = r.json()["id"]
    env = {"QUANTFARM_SERVER": srv.url, "QUANTFARM_TOKEN": TOKENS["reader"], "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    listed = cli("releases", env=env)
    assert listed.returncode == 0, listed.stderr
    short = next(line.split()[0] for line in listed.stdout.splitlines() if full.startswith(line.split()[0]))
    assert len(short) == 12
    shown = cli("releases", short, env=env)
    assert shown.returncode == 0 and f"release   {full}" in shown.stdout, shown.stdout + shown.stderr
    assert srv.http.get(f"/v1/releases/{full[:4]}", headers=auth("reader")).json()["id"] == full
    md = srv.http.get(f"/v1/releases/{short}/README.md", headers=auth("reader"))
    page = srv.http.get(f"/v1/releases/{short}/index.html", headers=auth("reader"))
    assert md.headers["content-type"] == "text/markdown; charset=utf-8"
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    for r in (md, page):
        assert r.status_code == 200 and r.headers["content-security-policy"] == media.DOCUMENT_CSP, r.text
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in r.text and "&lt;script&gt;" in r.text, r.text
    assert "| g32 |" in md.text
    # a batch run's id shortened as its report prints it
    batch = tmp_path / "b.yaml"
    batch.write_text(json.dumps({"name": "web", "models": [{"model": str(models / "tiny-llama")}],
                                 "variants": [{"group_size": 32}], **QUICK}))
    r = cli("batch", "run", str(batch), "--db", f"sqlite:///{srv.home.parent}/store.db", "--home", str(srv.home),
            "--model-root", str(models), "--json")
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)["run"]
    got = srv.http.get(f"/v1/batches/{run[:12]}", headers=auth("reader"))
    assert got.status_code == 200 and got.json()["run"] == run, got.text


def test_ambiguous_and_unknown_short_ids(web):
    srv, _, _ = web
    r = srv.http.get("/v1/releases/0", headers=auth("reader"))
    assert r.status_code == 400 and "at least 4" in r.json()["detail"]
    assert srv.http.get("/v1/releases/ffffffffffff", headers=auth("reader")).status_code == 404
    assert srv.http.get("/v1/batches/ffffffffffff", headers=auth("reader")).status_code == 404


def test_escaping_in_markdown_and_html():
    from evaluation import release_report
    from evaluation.escape import md, md_code
    s = {"id": "r1", "model": "<script>alert(1)</script>|*x*", "revision": "abc", "state": "running",
         "preset": None, "variants": [release_report.row("g32", "queued", None, error="bad <b>input</b>")]}
    readme, page = release_report.readme(s), release_report.html_page(s)
    assert "<script>" not in readme and "<b>" not in readme and "&lt;script&gt;" in readme
    assert "# &lt;script&gt;alert(1)&lt;/script&gt;\\|\\*x\\*: quantized release" in readme
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert md_code("a`b|c", table=True) == "``a`b\\|c``" and md("a\nb") == "a b" and md_code("<i>") == "&lt;i&gt;"


def test_release_title_names_a_local_source_by_its_folder():
    """A release of a server folder is titled with the folder's name; the server's path appears nowhere."""
    from evaluation import release_report
    s = {"id": "r1", "model": "/srv/secret-area/models/tiny-llama/", "revision": "abc", "state": "succeeded",
         "preset": None, "variants": [release_report.row("g32", "queued", None)]}
    readme, page = release_report.readme(s), release_report.html_page(s)
    assert "# tiny-llama: quantized release" in readme and "<title>tiny-llama: quantized release" in page
    assert "secret-area" not in readme and "secret-area" not in page
    hub = {**s, "model": "org/tiny-llama", "hub_model": True}
    assert "# org/tiny-llama: quantized release" in release_report.readme(hub)


# ---- batch run --wait ---------------------------------------------------------------------------------------

def test_batch_wait_without_a_worker_says_so_and_fails(tmp_path):
    models = tmp_path / "models"
    save_tiny(models / "a")
    db, home = f"sqlite:///{tmp_path}/store.db", tmp_path / "home"
    f = tmp_path / "nightly.yaml"
    f.write_text(json.dumps({"name": "nightly", "models": [{"model": str(models / "a")}],
                             "variants": [{"group_size": 32}], **QUICK}))
    common = ["--db", db, "--home", str(home), "--model-root", str(models)]
    t0 = time.time()
    r = cli("batch", "run", str(f), "--wait", "--no-worker-timeout", "3", *common)
    assert r.returncode == 2 and time.time() - t0 < 60, r.stderr
    assert "batch nightly run " in r.stderr and "1 job(s) queued, 0 running, 0 done" in r.stderr, r.stderr
    assert "no live worker seen for" in r.stderr and "no worker has been alive for" in r.stderr, r.stderr
    assert "quantfarm worker" in r.stderr and "# Night report: nightly" in r.stdout, r.stdout
    # every model refused: nothing can run, with --wait or without
    f.write_text(json.dumps({"name": "nightly", "models": [{"model": "/etc"}], "variants": [{"group_size": 32}]}))
    for extra in ((), ("--wait",)):
        r = cli("batch", "run", str(f), *extra, *common)
        assert r.returncode == 2 and "every model of batch nightly was refused (1)" in r.stderr, r.stderr
        assert "/etc: refused" in r.stdout, r.stdout


# ---- a real browser ---------------------------------------------------------------------------------------

def test_swagger_ui_and_report_in_chromium(web):
    """Swagger UI asks for the token, shows Authorize, and "Try it out" sends the token; report.html
    renders (styles and embedded plots) under its policy instead of downloading."""
    try:
        from playwright import sync_api
        missing = None if CHROMIUM.exists() else f"{CHROMIUM} is missing (`make chromium` or apt-get install chromium)"
    except ImportError:
        missing = "playwright is not installed (the test extra has it: `make venv`)"
    if missing:                 # skip where the browser cannot be had; CI (make test installs it) must run it
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(missing)
    srv, _, job = web
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
            page.goto(f"{srv.url}/docs")
            page.wait_for_selector("#qf-login:not([hidden])", timeout=30000)
            page.fill("#qf-token", TOKENS["reader"])
            page.click("#qf-login button[type=submit]")
            page.wait_for_selector(".btn.authorize", timeout=30000)
            assert page.is_visible("#qf-signed-in")
            page.click("#operations-jobs-list_jobs_v1_jobs_get .opblock-summary")
            page.click("#operations-jobs-list_jobs_v1_jobs_get .try-out__btn")
            page.click("#operations-jobs-list_jobs_v1_jobs_get .execute")
            page.wait_for_selector("#operations-jobs-list_jobs_v1_jobs_get .live-responses-table .response-col_status",
                                   timeout=30000)
            status = page.inner_text("#operations-jobs-list_jobs_v1_jobs_get .live-responses-table "
                                     "tbody .response-col_status").strip()
            assert status.startswith("200"), status
            assert not [e for e in errors if "Content Security Policy" in e], errors

            ctx = browser.new_context(extra_http_headers=auth("reader"))
            report = ctx.new_page()
            url = f"{srv.url}/v1/artifacts/{job['artifacts'][0]['id']}/files/report.html"
            response = report.goto(url)
            assert response.headers["content-type"].startswith("text/html")
            assert report.inner_text("h1").startswith("tiny-llama: ")
            widths = report.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            assert widths and all(w > 0 for w in widths), widths
            assert report.eval_on_selector("table", "t => getComputedStyle(t).borderCollapse") == "collapse"
        finally:
            browser.close()
