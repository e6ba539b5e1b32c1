"""/docs: Swagger UI from the swagger-ui-bundle package (no CDN), with a token login.

The page and its assets hold no data, so they load without a token. The schema they show, /openapi.json,
is a read like any other unless the tokens file's `public` lists "docs": when it answers 401 the page asks
for a token, keeps it in the tab's sessionStorage, fetches the schema with it and hands it to Swagger UI's
Authorize (the HTTP bearer scheme every guarded operation declares), so "Try it out" sends it too.
"""
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer

try:
    import swagger_ui_bundle          # Swagger UI's files, so /docs needs no CDN
except ImportError:                   # pragma: no cover - a dependency; /docs then says what to install
    swagger_ui_bundle = None

SCHEME = "bearer"                     # the security scheme's name in the schema; the page's script authorizes it
BEARER = HTTPBearer(auto_error=False, scheme_name=SCHEME,
                    description="a token from the server's tokens file (`quantfarm serve` prints where it is)")
BUNDLE_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>quantfarm API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" href="/docs/assets/favicon-32x32.png">
<style>.qf-bar{font-family:sans-serif;max-width:1420px;margin:1em auto 0;padding:0 20px}
.qf-bar input{width:28em}#qf-login-error{color:#9b1c1c}</style>
</head><body>
<form id="qf-login" class="qf-bar" hidden>
<label for="qf-token">This server's API schema needs a token: a <b>read</b> token (or higher) from the server's
tokens file.</label><br><input id="qf-token" type="password" autocomplete="off" required>
<button type="submit">Sign in</button> <span id="qf-login-error"></span>
</form>
<p id="qf-signed-in" class="qf-bar" hidden>Signed in with a token (kept for this tab only; Authorize shows it).
<button type="button" id="qf-sign-out">Forget it</button></p>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/quantfarm-docs.js"></script>
</body></html>
"""

SCRIPT = """/* quantfarm's Swagger UI start-up: the schema, and "Try it out", with the token the user gives. */
(function () {
  "use strict";
  var KEY = "quantfarm-token", SCHEME = "%(scheme)s", SPEC = "/openapi.json";
  var form = document.getElementById("qf-login"), field = document.getElementById("qf-token");
  var problem = document.getElementById("qf-login-error"), signedIn = document.getElementById("qf-signed-in");
  function token() {
    try { return sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }
  function isSpec(url) { return new URL(url, location.href).pathname === SPEC; }
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    sessionStorage.setItem(KEY, field.value.trim());
    location.reload();
  });
  document.getElementById("qf-sign-out").addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    location.reload();
  });
  window.ui = SwaggerUIBundle({
    url: SPEC, dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true,
    showExtensions: true, showCommonExtensions: true, presets: [SwaggerUIBundle.presets.apis],
    requestInterceptor: function (req) {
      if (req.loadSpec && token()) { req.headers.Authorization = "Bearer " + token(); }
      return req;
    },
    responseInterceptor: function (res) {
      if (isSpec(res.url)) {
        if (res.status === 401 || res.status === 403) {
          problem.textContent = token() ? "The server refused that token (" + res.status + "); give another." : "";
          sessionStorage.removeItem(KEY);
          form.hidden = false;
          signedIn.hidden = true;
          field.focus();
        } else if (res.ok && token()) {
          signedIn.hidden = false;
        }
      }
      return res;
    },
    onComplete: function () {
      if (token()) { window.ui.preauthorizeApiKey(SCHEME, token()); }
    }
  });
})();
""" % {"scheme": SCHEME}


def add_routes(app: FastAPI, schema_reader) -> None:
    """/openapi.json behind `schema_reader` (a dependency: the read role, or none where docs are public),
    /docs and its assets open to all."""

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_=Depends(schema_reader)):
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs():
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str):
        """Swagger UI's own files and this page's start-up script: /docs works without internet."""
        if name == "quantfarm-docs.js":
            return Response(SCRIPT, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)
        if swagger_ui_bundle is None:
            return JSONResponse({"detail": "/docs needs the swagger-ui-bundle-v2 package: pip install "
                                           "swagger-ui-bundle-v2"}, status_code=404)
        if name not in BUNDLE_FILES:
            return JSONResponse({"detail": f"no docs asset {name[:80]!r}"}, status_code=404)
        return FileResponse(Path(swagger_ui_bundle.swagger_ui_path) / name,
                            headers={"X-Content-Type-Options": "nosniff"})


def banner(auth) -> str:
    """What the serve banner says /docs needs, from the tokens file's `public` and `anonymous_read`."""
    if "docs" in auth.public or auth.anonymous_read:
        return "docs at /docs, open to all"
    return "docs at /docs: the page asks for a read token from the tokens file to show the schema"
