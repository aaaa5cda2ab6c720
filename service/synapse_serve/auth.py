"""Bearer-token authentication: tokens map to owners; only SHA-256 hashes are kept.

Token specs (``SYNAPSE_TOKENS``, comma-separated, or one per line in ``SYNAPSE_TOKENS_FILE``)::

    owner:token            a plaintext token (hashed at load, the plaintext is dropped)
    owner:sha256=<hex>     the SHA-256 of a token, so no plaintext needs to be on disk
    …:admin                either form with ``:admin`` appended: may see and act on every owner's instances

Presented tokens are hashed and compared against every stored hash with
``hmac.compare_digest``, so timing does not tell which owner (if any) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from synapse_serve.errors import InvalidConfig
from synapse_serve.names import OWNER as _OWNER
LOCAL_OWNER = "local"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner whose instances they see, and whether they may see everyone's."""

    owner: str
    admin: bool = False


LOCAL = Principal(LOCAL_OWNER, admin=True)  # everyone, when authentication is off


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_spec(spec: str) -> tuple[str, str, bool]:
    """``(owner, sha256 hex, admin)`` from one token spec; InvalidConfig names what is wrong (never the token)."""
    parts = spec.strip().split(":")
    admin = len(parts) > 2 and parts[-1] == "admin"
    if admin:
        parts = parts[:-1]
    if len(parts) > 2 and parts[0] and _OWNER.fullmatch(parts[0]):  # owner:a:b — the token would hold a ':'
        raise InvalidConfig(f"token spec for owner {parts[0]!r} is malformed: a token may not contain ':' (a spec "
                            "ending in :admin grants admin to the token before it)")
    if len(parts) != 2 or not _OWNER.fullmatch(parts[0]) or not parts[1]:
        owner = parts[0] if parts and _OWNER.fullmatch(parts[0]) else "?"
        raise InvalidConfig(f"token spec for owner {owner!r} is malformed: use owner:token, owner:sha256=<hex> "
                            "or either with :admin; owners are 1-64 letters, digits, '.', '_' or '-'")
    owner, secret = parts
    if secret.startswith("sha256="):
        digest = secret.removeprefix("sha256=").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise InvalidConfig(f"token spec for owner {owner!r}: sha256= needs 64 hex digits")
        return owner, digest, admin
    if len(secret) < 16:
        raise InvalidConfig(f"token for owner {owner!r} is shorter than 16 characters; use a long random one")
    if not all("!" <= c <= "~" for c in secret):  # what a request's header carries: no such token could log in
        raise InvalidConfig(f"token for owner {owner!r} has a space or a character that is not visible ASCII; an "
                            "Authorization header cannot carry it as given (no request would authenticate)")
    return owner, hash_token(secret), admin


class TokenTable:
    """The known tokens (as hashes) and their owners; one token is one principal (InvalidConfig otherwise)."""

    def __init__(self, entries: list[tuple[str, str, bool]]) -> None:
        seen: dict[str, Principal] = {}
        owners: dict[str, str] = {}
        for owner, digest, admin in entries:
            twin = owners.setdefault(owner.casefold(), owner)
            if twin != owner:  # one folder where the file system ignores case: one owner's instances the other's
                raise InvalidConfig(f"the owners {twin!r} and {owner!r} differ only in case; a state directory on a "
                                    "file system that ignores case (macOS, Windows) would give them one folder: "
                                    "name them apart")
            principal = Principal(owner, admin)
            other = seen.setdefault(digest, principal)
            if other != principal:  # last-wins would hand one owner's token to another
                raise InvalidConfig(
                    f"one token is listed for {other.owner!r}{' (admin)' if other.admin else ''} and for "
                    f"{owner!r}{' (admin)' if admin else ''}: each token must belong to exactly one owner")
        self.entries = [(bytes.fromhex(digest), principal) for digest, principal in seen.items()]

    @classmethod
    def load(cls, tokens: str = "", tokens_file: Path | None = None) -> TokenTable:
        specs = [s for s in tokens.split(",") if s.strip()]
        if tokens_file is not None:
            try:  # a byte-order mark is no part of the first spec
                lines = Path(tokens_file).read_text(encoding="utf-8-sig").splitlines()
            except UnicodeDecodeError as exc:
                raise InvalidConfig(f"the tokens file is not UTF-8 text (byte {exc.start}); tokens are visible "
                                    "ASCII") from None
            specs += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls([parse_spec(spec) for spec in specs])

    def __len__(self) -> int:
        return len(self.entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal a token belongs to, or None; the time taken does not depend on which one matched."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, principal in self.entries:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


class UnsafeSettings(ValueError):
    """Settings the server refuses to start with; the message says how to fix them."""


def token_table(settings) -> TokenTable | None:
    """The tokens, or None when authentication is off.

    ``auth=auto`` turns it on when tokens are configured or the address is not loopback; a
    public address with auth off, or auth on without tokens, is refused.
    """
    configured = bool(settings.tokens.strip()) or settings.tokens_file is not None
    enabled = settings.auth == "on" or (settings.auth == "auto" and (configured or not is_loopback(settings.host)))
    if not enabled:
        if not is_loopback(settings.host) and not settings.allow_public_without_auth:
            raise UnsafeSettings(
                f"refusing to serve {settings.host} with auth off: anyone who can reach it could read and change "
                "every instance. Set tokens (SYNAPSE_TOKENS or SYNAPSE_TOKENS_FILE) and SYNAPSE_AUTH=auto, or, "
                "only behind a trusted authenticating proxy, SYNAPSE_ALLOW_PUBLIC_WITHOUT_AUTH=true")
        return None
    try:
        table = TokenTable.load(settings.tokens, settings.tokens_file)
    except (InvalidConfig, OSError) as exc:
        raise UnsafeSettings(f"cannot load tokens: {getattr(exc, 'detail', exc)}") from None
    if not len(table):
        raise UnsafeSettings(
            f"authentication is on (listening on {settings.host}) but no tokens are configured: set "
            "SYNAPSE_TOKENS='owner:<long random token>' or SYNAPSE_TOKENS_FILE")
    return table


def auth_mode(settings, tokens: TokenTable | None) -> str:
    """How the server authenticates, in words for the start-up log and ``synapse-serve check``."""
    if tokens is None:
        warning = " (tokens are configured but SYNAPSE_AUTH=off ignores them)" if (
            settings.tokens.strip() or settings.tokens_file is not None) else ""
        return f"off: every caller is the admin owner 'local'{warning}"
    admins = sum(p.admin for _, p in tokens.entries)
    return f"on: {len(tokens)} tokens ({admins} admin)"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; anything else can be reached from other machines."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
