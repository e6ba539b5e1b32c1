"""Bearer tokens with roles, from configuration.

Roles nest: admin > submit > read. `read` sees jobs and downloads artifacts, `submit` also submits,
cancels and retries its own jobs, `admin` acts on every job (and alone may ask for remote code or pickle
weights, where the server allows them at all). Every endpoint needs a token; reads without one are
allowed only when `anonymous_read` is set, and the API docs or metrics when `public` lists them.

The tokens file (JSON, checked strictly at start-up: unknown keys, wrong types, unknown roles and repeated
tokens are refused naming the entry and field; see TokensFile):

    {"anonymous_read": false, "public": ["docs", "metrics"],
     "limits": {"submit": {"max_active_jobs": 256, "max_release_jobs": 16, "max_priority": 10}},
     "tokens": [{"name": "ci", "token": "...", "roles": ["submit"], "limits": {"max_active_jobs": 1000}}, ...]}

`limits`: per-tenant quotas (quotas.py), per role and per token. A token without a name gets its own
identity, "unnamed-" and a digest of the token, so two unnamed tokens never own each other's jobs. Tokens
shorter than MIN_TOKEN_CHARS and a file that group or others may read are refused unless the operator
allows them (serve --allow-weak-tokens).
"""
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import QuantfarmError

from .quotas import NONE, ROLE_DEFAULTS, Limits, LimitsSpec

log = logging.getLogger("quantfarm.auth")

RANK = {"read": 1, "submit": 2, "admin": 3}
PUBLIC_PARTS = ("docs", "metrics")
MIN_TOKEN_CHARS = 16
Role = Literal["read", "submit", "admin"]


@dataclass(frozen=True)
class Principal:
    name: str
    role: str            # the highest role held
    limits: Limits = NONE

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


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str | None = Field(None, min_length=1, max_length=100, description="the tenant; owns the jobs it submits")
    token: str = Field(..., min_length=1, max_length=4096)
    roles: list[Role] = Field(..., min_length=1, max_length=3)
    limits: LimitsSpec | None = None


class TokensFile(BaseModel):
    """The tokens file. Strict: "false" is not a bool, an unknown key is a typo, not something to ignore."""
    model_config = ConfigDict(extra="forbid", strict=True)
    anonymous_read: bool = False
    public: list[Literal["docs", "metrics"]] = Field([], max_length=2)
    limits: dict[Literal["submit", "admin"], LimitsSpec] = {}
    tokens: list[TokenEntry] = Field([], max_length=100000)


def _problem(err: dict, cfg) -> str:
    """One validation error as "tokens[2] ('ci'): roles.0: Input should be ...", never echoing a token."""
    loc, where = list(err["loc"]), ""
    if len(loc) >= 2 and loc[0] == "tokens" and isinstance(loc[1], int):
        entry = cfg["tokens"][loc[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        where, loc = f"tokens[{loc[1]}] ({name!r})" if isinstance(name, str) else f"tokens[{loc[1]}]", loc[2:]
    field = ".".join(map(str, loc))
    secret = where and (not loc or loc[0] not in ("name", "roles", "limits"))     # a token, or a misspelt key's value
    got = "" if secret or isinstance(err.get("input"), (dict, list)) else f" (got {err.get('input')!r:.80})"
    return ": ".join(x for x in (where, field, err["msg"] + got) if x)


class Auth:
    def __init__(self, tokens: dict[str, Principal], anonymous_read: bool = False, public: tuple = ()):
        self.tokens, self.anonymous_read, self.public = tokens, anonymous_read, frozenset(public)
        self._digests = [(hashlib.sha256(_token_bytes(t)).digest(), p) for t, p in tokens.items()]

    @classmethod
    def from_file(cls, path: Path, allow_weak: bool = False) -> "Auth":
        """The tokens file, strictly: any problem stops the server at start-up with the entry and field named.
        `allow_weak` (serve --allow-weak-tokens): short tokens and a file others may read are logged, not refused."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
            mode = path.stat().st_mode & 0o777
        except (OSError, ValueError) as e:
            raise QuantfarmError(f"cannot read the tokens file {path}: {e}") from e
        try:
            file = TokensFile.model_validate(cfg)
        except ValidationError as e:
            raise QuantfarmError(f"tokens file {path}: " + "; ".join(_problem(x, cfg) for x in e.errors())) from None
        weak, seen, tokens = [], {}, {}
        for i, t in enumerate(file.tokens):
            entry = f"tokens[{i}] ({t.name!r})" if t.name else f"tokens[{i}] (unnamed)"
            if t.token in seen:
                raise QuantfarmError(f"tokens file {path}: {entry} has the same token as {seen[t.token]}; each token "
                                     "may be listed once (merge their roles and limits into one entry)")
            seen[t.token] = entry
            if len(t.token) < MIN_TOKEN_CHARS:
                weak.append(f"{entry}: the token has {len(t.token)} characters, fewer than {MIN_TOKEN_CHARS}; make a "
                            "long random one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'")
            role = max(t.roles, key=RANK.get)
            limits = ROLE_DEFAULTS[role].over(file.limits.get(role)).over(t.limits)
            tokens[t.token] = Principal(t.name or unnamed_identity(t.token), role, limits)
        if mode & 0o066:
            weak.append(f"the file has mode {mode:04o}: group or others may read or change it; chmod 600 {path}")
        if weak and not allow_weak:
            raise QuantfarmError(f"tokens file {path}: " + "; ".join(weak)
                                 + " (or start serve with --allow-weak-tokens to accept this)")
        for w in weak:
            log.warning("tokens file %s (allowed by --allow-weak-tokens): %s", path, w)
        return cls(tokens, file.anonymous_read, tuple(file.public))

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
