"""A save is a copy made when the save runs; nnsight's saved value is the live tensor, which
later in-place writes change. :class:`SaveTracker` warns where a plan writes in place into a
value after saving it, the one place where the two would differ silently."""

from __future__ import annotations

import warnings

from ..ir.ops import OPS
from ..ir.plan import SAVE, Node, Ref


class SavedValueWrittenWarning(UserWarning):
    """An in-place write to a value after it was saved: the saved value does not show it."""


class SaveTracker:
    """Follows which nodes share memory (views, in-place ops) and which memory was saved."""

    def __init__(self) -> None:
        self._roots: dict[int, int] = {}  # node -> the node whose memory it shares
        self._saved: dict[int, str | None] = {}  # saved memory -> the line that saved it

    def observe(self, node: Node) -> None:
        """Take in a newly recorded node; warn if it writes saved memory in place."""
        first = node.args[0] if node.args and isinstance(node.args[0], Ref) else None
        if first is None:
            return
        spec = OPS.get(node.op)
        root = self._roots.get(first.id, first.id)
        if spec is not None and spec.aliases_first:
            self._roots[node.id] = root
        if node.op == SAVE:
            self._saved.setdefault(root, node.line)
        elif spec is not None and spec.mutates and root in self._saved:
            warnings.warn(
                f"{node.describe()} at {node.line} writes in place into a value saved earlier "
                f"(at {self._saved[root]}): the saved value is a copy made at .save() and does "
                "not show this write (nnsight's would); call .save() after the write to keep "
                "the written value", SavedValueWrittenWarning, stacklevel=4)
