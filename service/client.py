"""The farm's client commands: submit, jobs, status, cancel (HTTP to a `quantfarm serve`).

The server is --server or QUANTFARM_SERVER (default http://127.0.0.1:8600); the token is --token,
QUANTFARM_TOKEN, or on the server's own machine the first admin token in HOME/tokens.json.
"""
import json
import os
import sys

from .errors import QuantfarmError

DEFAULT_SERVER = "http://127.0.0.1:8600"


class ClientError(QuantfarmError):
    pass


class Client:
    def __init__(self, server: str | None = None, token: str | None = None):
        import httpx

        from .auth import local_token
        from .server import default_home
        self.server = (server or os.environ.get("QUANTFARM_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get("QUANTFARM_TOKEN") or local_token(default_home())
        self.http = httpx.Client(base_url=self.server, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})

    def _call(self, method: str, path: str, **kw):
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
            raise ClientError(f"{r.status_code} from {path}: {detail}")
        return r.json()

    def submit(self, spec: dict, force: bool = False) -> dict:
        return self._call("POST", "/v1/jobs", json=spec, params={"force": "true"} if force else None)

    def jobs(self, **params) -> dict:
        return self._call("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

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


def add_parsers(sub, spec_arguments, spec_from_args):
    def server_args(p):
        p.add_argument("--server", help=f"quantfarm server URL (QUANTFARM_SERVER, default {DEFAULT_SERVER})")
        p.add_argument("--token", help="bearer token (QUANTFARM_TOKEN; default the local server's admin token)")

    p = sub.add_parser("submit", help="submit a quantization job to a quantfarm server")
    spec_arguments(p)
    p.add_argument("--priority", type=int, default=0, help="higher runs first")
    p.add_argument("--force", action="store_true", help="a new job even if the same recipe was submitted")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    server_args(p)
    p.set_defaults(func=lambda a: cmd_submit(a, spec_from_args))

    p = sub.add_parser("jobs", help="list jobs on a quantfarm server")
    p.add_argument("--state")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    server_args(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("status", help="one job's state, progress and result")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    server_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    server_args(p)
    p.set_defaults(func=cmd_cancel)


def _line(j: dict) -> str:
    prog = j["progress"]
    layers = f"{prog['layers_done']}/{prog['layers_total']}" if prog["layers_total"] else "-"
    spec = j["spec"]
    return (f"{j['id']}  {j['state']:<14} {(j['step'] or '-'):<18} {layers:>7}  {j['model']}  "
            f"{spec['algorithm']}->{spec['format']} w{spec['bits']}g{spec['group_size']}")


def cmd_submit(a, spec_from_args) -> int:
    spec = spec_from_args(a, priority=a.priority)
    c = Client(a.server, a.token)
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
        lines.append(f"recovery     {r['recovery']:.4f} ({r.get('recovery_basis')})")
    for art in j["artifacts"]:
        lines.append(f"artifact     {art['id']} ({art['format']}, {art['size_bytes'] / 2 ** 20:.1f} MiB, "
                     f"{'published' if art['published'] else 'kept, not published'}) {art['files']}")
    return "\n".join(lines)


def cmd_jobs(a) -> int:
    out = Client(a.server, a.token).jobs(state=a.state, model=a.model, limit=a.limit)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for j in out["jobs"]:
            print(_line(j))
        print(f"({len(out['jobs'])} of {out['total']})")
    return 0


def cmd_status(a) -> int:
    j = Client(a.server, a.token).job(a.job_id)
    print(json.dumps(j, indent=2) if a.json else _status_text(j))
    return 0


def cmd_cancel(a) -> int:
    j = Client(a.server, a.token).cancel(a.job_id)
    print(_line(j) + ("  (stops at the next layer boundary)" if j["state"] == "running" else ""))
    return 0
