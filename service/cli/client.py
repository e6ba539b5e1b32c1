"""The farm's client commands: submit, jobs, status, cancel, retry, logs, download (HTTP to a `quantfarm serve`).

The server is --server or QUANTFARM_SERVER (default http://127.0.0.1:8600); the token is --token,
QUANTFARM_TOKEN, or the first admin token in the server's HOME/tokens.json (--home, else
QUANTFARM_HOME, else ~/.quantfarm) when the client runs on the server's machine. Job and artifact
ids may be given as any unambiguous prefix of at least 4 characters (what `jobs` and `submit` print).
"""
import json
import os
import sys
from pathlib import Path

from core.errors import QuantfarmError
from core.paths import atomic_folder

DEFAULT_SERVER = "http://127.0.0.1:8600"


class ClientError(QuantfarmError):
    pass


class Client:
    def __init__(self, server: str | None = None, token: str | None = None, home: Path | None = None):
        import httpx

        from service.farm.auth import local_token
        from service.farm.home import default_home
        self.server = (server or os.environ.get("QUANTFARM_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.tokens_file = (Path(home).expanduser() if home else default_home()) / "tokens.json"
        self.token_source = "--token" if token else "QUANTFARM_TOKEN" if os.environ.get("QUANTFARM_TOKEN") else None
        token = token or os.environ.get("QUANTFARM_TOKEN")
        if token is None:
            token = local_token(self.tokens_file.parent)
            self.token_source = str(self.tokens_file) if token else None
        self.http = httpx.Client(base_url=self.server, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})

    def _token_hint(self) -> str:
        if self.token_source:
            return (f"the token from {self.token_source} was refused; get a valid one from the server's "
                    f"tokens.json (in its --home) and pass it with --token or QUANTFARM_TOKEN")
        return (f"no token was found: pass --token TOKEN or set QUANTFARM_TOKEN (an admin token is in the "
                f"server's HOME/tokens.json), or on the server's machine point --home at the folder the server "
                f"was started with (looked for {self.tokens_file}, which does not exist)")

    def _request(self, method: str, path: str, **kw):
        import httpx
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the quantfarm server at {self.server} ({e}); start one with "
                              "`quantfarm serve` or pass --server") from e
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            hint = f"; {self._token_hint()}" if r.status_code == 401 else ""
            raise ClientError(f"{r.status_code} from {path}: {detail}{hint}")
        return r

    def _call(self, method: str, path: str, **kw):
        return self._request(method, path, **kw).json()

    def submit(self, spec: dict, force: bool = False) -> dict:
        return self._call("POST", "/v1/jobs", json=spec, params={"force": "true"} if force else None)

    def post_release(self, spec: dict) -> dict:
        return self._call("POST", "/v1/releases", json=spec)

    def release(self, release_id: str) -> dict:
        return self._call("GET", f"/v1/releases/{release_id}")

    def releases(self, **params) -> dict:
        return self._call("GET", "/v1/releases", params={k: v for k, v in params.items() if v is not None})

    def jobs(self, **params) -> dict:
        return self._call("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/retry")

    def logs(self, job_id: str) -> str:
        return self._request("GET", f"/v1/jobs/{job_id}/logs").text

    def events(self, job_id: str):
        """(event kind, data) pairs from the job's Server-Sent Events stream until the job ends."""
        import httpx
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(60, read=None)) as r:
            if r.status_code >= 400:
                raise ClientError(f"{r.status_code} from the event stream of {job_id}")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield kind, json.loads(line[6:])

    def download(self, artifact_id: str, out: Path) -> list[Path]:
        """Every file of an artifact into `out` (which must not exist yet), all or none (atomic_folder);
        returns the files written."""
        listing = self._call("GET", f"/v1/artifacts/{artifact_id}")
        out = Path(out)
        if out.exists():
            raise ClientError(f"{out} already exists; choose another --out")
        written = []
        with atomic_folder(out) as tmp:
            for f in listing["files"]:
                target = (tmp / f["path"]).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise ClientError(f"the server listed a file outside the artifact ({f['path']!r}); not written")
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.http.stream("GET", f["url"]) as r, open(target, "wb") as fh:
                    if r.status_code >= 400:
                        raise ClientError(f"{r.status_code} downloading {f['path']}")
                    for chunk in r.iter_bytes(1 << 20):
                        fh.write(chunk)
                written.append(out / f["path"])
        return written


def add_parsers(sub, spec_arguments, spec_from_args):
    from .args import HelpWithDefaults as fmt

    def server_args(p):
        p.add_argument("--server", help=f"quantfarm server URL (QUANTFARM_SERVER, default {DEFAULT_SERVER})")
        p.add_argument("--token", help="bearer token (QUANTFARM_TOKEN; default the admin token in "
                                       "HOME/tokens.json)")
        p.add_argument("--home", type=Path, help="the server's --home on this machine, where its tokens.json is "
                                                 "(QUANTFARM_HOME, default ~/.quantfarm)")

    def job_parser(name, help_text, func):
        p = sub.add_parser(name, help=help_text, formatter_class=fmt)
        p.add_argument("job_id", help="a job id or an unambiguous prefix of it (at least 4 characters)")
        server_args(p)
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("submit", help="submit a quantization job to a quantfarm server", formatter_class=fmt)
    spec_arguments(p)
    p.add_argument("--priority", type=int, default=0, help="higher runs first")
    p.add_argument("--force", action="store_true", help="a new job even if the same recipe was submitted")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    server_args(p)
    p.set_defaults(func=lambda a: cmd_submit(a, spec_from_args))

    p = sub.add_parser("jobs", help="list jobs on a quantfarm server, newest first", formatter_class=fmt)
    p.add_argument("--state", help="only jobs in this state: queued, running, succeeded, failed, failed_quality, publish_failed, "
                                   "cancelled")
    p.add_argument("--model", help="only jobs of this model")
    p.add_argument("--count", type=int, default=20, help="how many jobs to list (at most 500)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    server_args(p)
    p.set_defaults(func=cmd_jobs)

    p = job_parser("status", "one job's state, progress and result", cmd_status)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    job_parser("cancel", "cancel a queued or running job", cmd_cancel)
    job_parser("retry", "queue a failed or cancelled job again (it resumes from its per-layer state)", cmd_retry)
    job_parser("logs", "a job's event log (states, steps, layers, errors)", cmd_logs)
    p = job_parser("download", "download a job's artifact folder", cmd_download)
    p.add_argument("--out", type=Path, help="folder to create (default: ./ARTIFACT_ID, first 8 characters)")


def _line(j: dict) -> str:
    prog = j["progress"]
    layers = f"{prog['layers_done']}/{prog['layers_total']}" if prog["layers_total"] else "-"
    spec = j["spec"]
    return (f"{j['id']}  {j['state']:<14} {(j['step'] or '-'):<18} {layers:>7}  {j['model']}  "
            f"{spec['algorithm']}->{spec['format']} w{spec['bits']}g{spec['group_size']}")


def _client(a) -> Client:
    return Client(a.server, a.token, a.home)


def cmd_submit(a, spec_from_args) -> int:
    spec = spec_from_args(a, priority=a.priority)
    c = _client(a)
    job = c.submit(spec.model_dump(mode="json"), force=a.force)
    print(_line(job))
    if not a.wait:
        return 0
    return follow(c, job["id"])


def follow(c: Client, job_id: str) -> int:
    """Progress bar fed by the event stream; exit status 0 only if the job succeeded."""
    from tqdm import tqdm
    bar = None
    for kind, data in c.events(job_id):
        if kind == "layer":
            if bar is None:
                bar = tqdm(total=data["total"], initial=data["done"] - 1, desc="layers", unit="layer", file=sys.stderr)
            bar.update(data["done"] - bar.n)
        elif kind in ("step", "state"):
            print(f"[{job_id[:8]}] {kind}: {data['message']}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    job = c.job(job_id)
    print(_status_text(job))
    return 0 if job["state"] == "succeeded" else 1


def _status_text(j: dict) -> str:
    lines = [_line(j), f"attempt      {j['attempt']}/{j['max_attempts']}  priority {j['priority']}  "
                       f"revision {j['revision']}"]
    if j["error"]:
        lines.append(f"error        {j['error']}")
    r = j.get("result") or {}
    if r.get("perplexity"):
        p = r["perplexity"]
        lines.append(f"perplexity   {p['fp16']:.3f} (fp16) -> {p['quantized']:.3f}")
    if r.get("recovery") is not None:
        lines.append(f"recovery     {r['recovery'] * 100:.1f}% ({r.get('recovery_basis')})")
    for art in j["artifacts"]:
        lines.append(f"artifact     {art['id']} ({art['format']}, {art['size_bytes'] / 2 ** 20:.1f} MiB, "
                     f"{'published' if art['published'] else 'kept, not published'}) {art['files']}")
    return "\n".join(lines)


def cmd_jobs(a) -> int:
    out = _client(a).jobs(state=a.state, model=a.model, limit=a.count)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for j in out["jobs"]:
            print(_line(j))
        print(f"({len(out['jobs'])} of {out['total']})")
    return 0


def cmd_status(a) -> int:
    j = _client(a).job(a.job_id)
    print(json.dumps(j, indent=2) if a.json else _status_text(j))
    return 0


def cmd_cancel(a) -> int:
    j = _client(a).cancel(a.job_id)
    print(_line(j) + ("  (stops at the next layer boundary)" if j["state"] == "running" else ""))
    return 0


def cmd_retry(a) -> int:
    print(_line(_client(a).retry(a.job_id)))
    return 0


def cmd_logs(a) -> int:
    sys.stdout.write(_client(a).logs(a.job_id))
    return 0


def cmd_download(a) -> int:
    c = _client(a)
    j = c.job(a.job_id)
    if not j["artifacts"]:
        raise ClientError(f"job {j['id']} has no artifact (state {j['state']}); `quantfarm status {j['id'][:8]}` "
                          "says why")
    art = j["artifacts"][0]
    out = a.out or Path(art["id"][:8])
    files = c.download(art["id"], out)
    size = sum(f.stat().st_size for f in files)
    print(f"{out}  {len(files)} files, {size / 2 ** 20:.1f} MiB ({art['format']}, "
          f"{'published' if art['published'] else 'kept, not published'})")
    return 0
