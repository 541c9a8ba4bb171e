"""What a client and a validator know about a deployed model, without its weights.

``events`` is the order in which module inputs and outputs happen in one forward
pass (measured once where the weights are, see :mod:`tpmlab.runtime.probe`);
``shapes`` gives each event's value as a template in which ``"B"`` stands for the
batch rows and ``"T"`` for the positions of the pass. ``vocab_size`` is the number of
rows of the input embedding: token ids must lie in ``0 <= id < vocab_size`` (on a GPU an
id outside it is a device-side assert that poisons the worker's CUDA context).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

START = -1  # the event index of "before the pass": nodes that read no module value


def event_key(path: str, io: str) -> str:
    return f"{path}:{io}"


@dataclass
class ModelInfo:
    name: str
    version: str
    family: str
    dtype: str
    events: list[str]
    shapes: dict[str, Any]
    modules: list[str]
    params: dict[str, Any] = field(default_factory=dict)  # full name -> [shape, dtype]
    # Pipeline stages: for each stage, the first event index it owns (stage 0 owns from START).
    stage_starts: list[int] = field(default_factory=lambda: [START])
    stage_workers: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None  # rows of the input embedding (None: not known, not checked)

    def __post_init__(self) -> None:
        self._index = {e: i for i, e in enumerate(self.events)}
        self._modules = set(self.modules)
        self._with_params: set[str] | None = None

    def holds_parameters(self, path: str) -> bool:
        """Whether the module at ``path`` (or a submodule of it) has parameters."""
        if self._with_params is None:
            owners: set[str] = set()
            for name in self.params:
                parts = name.split(".")[:-1]
                owners.update(".".join(parts[:i]) for i in range(len(parts) + 1))
            self._with_params = owners
        return path in self._with_params

    def event_index(self, path: str, io: str) -> int | None:
        # a module's whole inputs ``(args, kwargs)`` are there when its first input is
        return self._index.get(event_key(path, "input" if io == "inputs" else io))

    def has_module(self, path: str) -> bool:
        return path in self._modules

    def stage_of(self, event_index: int) -> int:
        """The pipeline stage that owns an event (by index; START belongs to stage 0)."""
        stage = 0
        for i, start in enumerate(self.stage_starts):
            if event_index >= start:
                stage = i
        return stage

    @property
    def n_stages(self) -> int:
        return len(self.stage_starts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(**d)
