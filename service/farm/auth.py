"""Bearer tokens with roles, from configuration.

Roles nest: admin > submit > read. `read` sees jobs and downloads artifacts, `submit` also submits,
cancels and retries its own jobs, `admin` acts on every job (and alone may ask for remote code or pickle
weights, where the server allows them at all). Every endpoint needs a token; reads without one are
allowed only when `anonymous_read` is set, and the API docs or metrics when `public` lists them.

The tokens file (JSON):

    {"anonymous_read": false, "public": ["docs", "metrics"],
     "tokens": [{"name": "ci", "token": "...", "roles": ["submit"]}, ...]}

A token without a name gets its own identity, "unnamed-" and a digest of the token, so two unnamed
tokens never own each other's jobs.
"""
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from core.errors import QuantfarmError

RANK = {"read": 1, "submit": 2, "admin": 3}
PUBLIC_PARTS = ("docs", "metrics")


@dataclass(frozen=True)
class Principal:
    name: str
    role: str            # the highest role held

    def can(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


ANONYMOUS = Principal("anonymous", "read")


class AuthError(QuantfarmError):
    """No valid token (401)."""


class Forbidden(QuantfarmError):
    """A valid token without the role the request needs (403)."""


def _token_bytes(token: str) -> bytes:
    return token.encode("utf-8", "surrogateescape")


def unnamed_identity(token: str) -> str:
    return "unnamed-" + hashlib.sha256(_token_bytes(token)).hexdigest()[:12]


class Auth:
    def __init__(self, tokens: dict[str, Principal], anonymous_read: bool = False, public: tuple = ()):
        self.tokens, self.anonymous_read, self.public = tokens, anonymous_read, frozenset(public)
        self._digests = [(hashlib.sha256(_token_bytes(t)).digest(), p) for t, p in tokens.items()]

    @classmethod
    def from_file(cls, path: Path) -> "Auth":
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise QuantfarmError(f"cannot read the tokens file {path}: {e}") from e
        tokens = {}
        for t in cfg.get("tokens", []):
            roles = t.get("roles") or []
            bad = [r for r in roles if r not in RANK]
            if bad or not roles or not isinstance(t.get("token"), str) or not t["token"]:
                raise QuantfarmError(f"tokens file {path}: entry {t.get('name')!r} needs a token and roles from "
                                     f"{list(RANK)} (got {roles})")
            name = t.get("name") or unnamed_identity(t["token"])
            if not isinstance(name, str) or len(name) > 100:
                raise QuantfarmError(f"tokens file {path}: a token's name must be a string of at most 100 characters")
            tokens[t["token"]] = Principal(name, max(roles, key=RANK.get))
        public = cfg.get("public", [])
        if not isinstance(public, list) or any(p not in PUBLIC_PARTS for p in public):
            raise QuantfarmError(f"tokens file {path}: public lists what needs no token, from {list(PUBLIC_PARTS)} "
                                 f"(got {public!r})")
        return cls(tokens, bool(cfg.get("anonymous_read", False)), tuple(public))

    def check(self, authorization: str | None, role: str, part: str | None = None) -> Principal:
        """The caller behind an Authorization header, if it may act as `role`. `part` (docs, metrics): a read
        that the tokens file may open to everyone."""
        if role == "read" and (self.anonymous_read or part in self.public):
            if not authorization:
                return ANONYMOUS
        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        # digests of equal length, compared with every known token: no early exit, any characters
        given = hashlib.sha256(_token_bytes(token.strip())).digest()
        who = None
        for digest, principal in self._digests:
            if hmac.compare_digest(digest, given):
                who = principal
        if who is None:
            raise AuthError("unknown token")
        if not who.can(role):
            raise Forbidden(f"token {who.name!r} has role {who.role!r}; this needs {role!r}")
        return who


def ensure_tokens_file(home: Path) -> Path:
    """HOME/tokens.json, created with one admin token (owner-readable only) when missing: the embedded
    server is never open by default, and the local client finds the token there."""
    path = home / "tokens.json"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"anonymous_read": False,
                       "tokens": [{"name": "local-admin", "token": secrets.token_urlsafe(24), "roles": ["admin"]}]},
                      f, indent=1)
    return path


def local_token(home: Path) -> str | None:
    """The first admin (else submit) token of HOME/tokens.json, for the client on the server's machine."""
    try:
        entries = json.loads((home / "tokens.json").read_text()).get("tokens", [])
    except (OSError, ValueError):
        return None
    entries.sort(key=lambda t: -max((RANK.get(r, 0) for r in t.get("roles", [])), default=0))
    return entries[0]["token"] if entries else None
