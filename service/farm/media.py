"""What the API says a served file is: a browser shows a report (report.html, a model card, JSON) instead
of downloading it, and downloads weights. Documents a browser renders carry a Content-Security-Policy that
lets them show their own inline styles and embedded (data:) plots and nothing else: no script, no request
anywhere, in a sandbox; every file carries nosniff, so no browser takes it for another type."""
from pathlib import PurePosixPath
from urllib.parse import quote

OCTET = "application/octet-stream"
TYPES = {".html": "text/html; charset=utf-8", ".htm": "text/html; charset=utf-8",
         ".md": "text/markdown; charset=utf-8", ".json": "application/json", ".png": "image/png"}
DOCUMENT_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
                "form-action 'none'; frame-ancestors 'none'; sandbox")
# the documented 200 bodies of an artifact file (OpenAPI: one entry per media type)
DOCUMENTED = {OCTET: {"schema": {"type": "string", "format": "binary"}}, "text/html": {}, "text/markdown": {},
              "application/json": {}, "image/png": {"schema": {"type": "string", "format": "binary"}}}


def media_type(name: str) -> str:
    return TYPES.get(PurePosixPath(name).suffix.lower(), OCTET)


def headers(name: str) -> dict[str, str]:
    """Response headers for a file called `name`: nosniff always, the policy on what a browser renders,
    and weights (anything else) as an attachment under their own file name."""
    kind = media_type(name)
    out = {"X-Content-Type-Options": "nosniff"}
    if kind.startswith("text/"):
        out["Content-Security-Policy"] = DOCUMENT_CSP
    if kind == OCTET:
        base = PurePosixPath(name).name or "file"
        ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in base)
        out["Content-Disposition"] = f"attachment; filename=\"{ascii_name}\"; filename*=utf-8''{quote(base)}"
    return out
