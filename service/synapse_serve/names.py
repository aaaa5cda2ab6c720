"""Names and keys: how instances are named and addressed (no JAX here: the API and any backend share it)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from synapse_serve.errors import InvalidName

NAME_RULE = "1 to 128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
OWNER_RULE = "1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # tokens, files and directories hold owners of this rule


def validate_name(name: Any, what: str = "instance name") -> str:
    """``name`` if it follows NAME_RULE, else InvalidName saying the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(f"invalid {what} {str(name)[:140]!r}: use {NAME_RULE}", name=str(name)[:140])
    return name


def validate_owner(owner: Any) -> str:
    """``owner`` if it follows OWNER_RULE, else InvalidName saying the rule (an owner a token could not name would
    be accepted, then lost at restart: its files could not be read back)."""
    if not isinstance(owner, str) or not OWNER.fullmatch(owner):
        raise InvalidName(f"invalid owner {str(owner)[:140]!r}: use {OWNER_RULE}", name=str(owner)[:140])
    return owner


class InstanceKey(NamedTuple):
    """Whose instance, and its name (both follow NAME_RULE; owners are at most 64 characters of it)."""

    owner: str
    name: str

    @classmethod
    def of(cls, owner: str, name: Any) -> InstanceKey:
        """A validated key: InvalidName if either part breaks the rule."""
        return cls(validate_owner(owner), validate_name(name))

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"


class CompartmentRef(NamedTuple):
    """A tensor argument that names a compartment on the server instead of sending its values.

    ``instance`` None means the instance being called (its value when the call starts);
    otherwise another instance of the same owner.
    """

    compartment: str
    instance: str | None = None
