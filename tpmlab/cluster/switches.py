"""On/off switches that a worker's environment sets for the stages made there."""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def switched_on(name: str) -> bool:
    """Whether the environment variable ``name`` leaves its feature on: unset, or anything
    but ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(name, "1").strip() not in OFF
