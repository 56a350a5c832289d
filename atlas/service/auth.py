"""Bearer-token authentication of the mapping service.

The token comes from a file (one token per line: several lines let an operator rotate tokens
without downtime) or an environment variable (``ATLAS_TOKEN`` by default); a Kubernetes Secret
can provide either. Tokens are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from atlas.errors import AtlasError

#: A token shorter than this is refused (a guessable token is no protection).
MIN_TOKEN_LENGTH = 16


class AuthConfigError(AtlasError):
    """The service has no usable token configured."""


def load_tokens(token_file: str | None, token_env: str = "ATLAS_TOKEN", *, allow_anonymous: bool = False
                ) -> list[bytes] | None:
    """The accepted tokens, or None for an open service (``allow_anonymous`` and no token)."""
    tokens: list[str] = []
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise AuthConfigError(f"cannot read the token file {path} ({e.strerror or e})") from None
        tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not tokens:
            raise AuthConfigError(f"the token file {path} holds no token")
    elif os.environ.get(token_env, "").strip():
        tokens = [os.environ[token_env].strip()]
    elif allow_anonymous:
        return None
    else:
        raise AuthConfigError(
            f"no bearer token configured: give token_file (atlas serve --token-file F) or set ${token_env}, "
            "or set allow_anonymous: true for a service nobody else can reach")
    short = [t for t in tokens if len(t) < MIN_TOKEN_LENGTH]
    if short:
        raise AuthConfigError(f"a token is shorter than {MIN_TOKEN_LENGTH} characters; use a long random one "
                              "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return [t.encode() for t in tokens]


def check_authorization(header: str | None, tokens: list[bytes] | None) -> str | None:
    """None when the ``Authorization`` header carries an accepted token, else why not."""
    if tokens is None:
        return None
    if not header:
        return "missing bearer token: send the header 'Authorization: Bearer <token>'"
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return "the Authorization header must be 'Bearer <token>'"
    given = value.strip().encode()
    ok = False
    for token in tokens:  # compare with every token: the time taken does not reveal which matched
        ok |= hmac.compare_digest(given, token)
    return None if ok else "invalid bearer token"
