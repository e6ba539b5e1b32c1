"""Bearer tokens with roles, from configuration.

Roles nest: admin > submit > read. `read` sees jobs and downloads artifacts, `submit` also submits,
cancels and retries its own jobs, `admin` acts on every job. Every mutating endpoint needs a token;
reads without one are allowed only when `anonymous_read` is set.

The tokens file (JSON):

    {"anonymous_read": false,
     "tokens": [{"name": "ci", "token": "...", "roles": ["submit"]}, ...]}
"""
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantfarmError

RANK = {"read": 1, "submit": 2, "admin": 3}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str            # the highest role held

    def can(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


ANONYMOUS = Principal("anonymous", "read")


class AuthError(QuantfarmError):
    http_status = 401


class Forbidden(QuantfarmError):
    http_status = 403


class Auth:
    def __init__(self, tokens: dict[str, Principal], anonymous_read: bool = False):
        self.tokens, self.anonymous_read = tokens, anonymous_read

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
            if bad or not roles or not t.get("token"):
                raise QuantfarmError(f"tokens file {path}: entry {t.get('name')!r} needs a token and roles from "
                                     f"{list(RANK)} (got {roles})")
            tokens[t["token"]] = Principal(t.get("name") or "unnamed", max(roles, key=RANK.get))
        return cls(tokens, bool(cfg.get("anonymous_read", False)))

    def check(self, authorization: str | None, role: str) -> Principal:
        """The caller behind an Authorization header, if it may act as `role`."""
        if not authorization:
            if role == "read" and self.anonymous_read:
                return ANONYMOUS
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        who = next((p for t, p in self.tokens.items() if hmac.compare_digest(t, token.strip())), None)
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
