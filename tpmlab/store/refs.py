"""Version references: full digests, unambiguous digest prefixes, and tags."""

from __future__ import annotations

import re

from .errors import RefError, StoreInputError
from .objects import ObjectStore, check_key

DIGEST = re.compile(r"^[0-9a-f]{64}$")
PREFIX = re.compile(r"^[0-9a-f]{4,64}$")
MIN_PREFIX = 4


def check_tag_name(name: str) -> None:
    """Reject tag names that could be mistaken for digests or are not plain names."""
    try:
        check_key("tags", name)
    except StoreInputError:
        raise StoreInputError(
            f"invalid tag name {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        ) from None
    if DIGEST.match(name):
        raise StoreInputError(f"invalid tag name {name!r}: it looks like a version digest")


def read_tag(objects: ObjectStore, name: str) -> str | None:
    """The digest a tag points at, or ``None`` if there is no such tag."""
    try:
        check_key("tags", name)
        return objects.get("tags", name).decode().strip()
    except (ValueError, KeyError):
        return None


def resolve(objects: ObjectStore, ref: str) -> str:
    """The full digest ``ref`` names.

    Tried in order: a full 64-hex digest of a stored version, a tag, a prefix of at
    least 4 hex digits matching exactly one stored version. Digests and prefixes may
    carry a ``"sha256:"`` prefix.
    """
    if not isinstance(ref, str) or not ref:
        raise RefError(f"a version reference must be a non-empty string, got {ref!r}")
    if ref.startswith("sha256:"):  # the form tpmlab.models writes versions in
        ref = ref.removeprefix("sha256:")
    if DIGEST.match(ref) and objects.exists("manifests", ref):
        return ref
    tagged = read_tag(objects, ref)
    if tagged is not None:
        return tagged
    if PREFIX.match(ref):
        found = sorted(d for d in objects.list("manifests") if d.startswith(ref))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            shown = ", ".join(d[:16] for d in found[:5])
            raise RefError(f"version prefix {ref!r} is ambiguous: matches {len(found)} versions ({shown}...)")
    raise RefError(f"no version or tag named {ref!r} in the store")
