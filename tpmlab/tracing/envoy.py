"""Envoys: the client's mirror of the model's module tree.

An :class:`Envoy` stands for one module of the real architecture, built on the
meta device (no weights). Native Hugging Face names work (``model.model.layers[3].mlp``)
and so do the aliases ``embed``, ``layers``, ``final_norm`` and ``unembed``.
Inside a trace, ``.output`` and ``.input`` are proxies of the module's output and
first input (``.inputs``: every input, ``(args, kwargs)``), assigning to them replaces
the value, and calling an envoy applies the module to a value; ``.source`` reaches values
inside the module's forward (:mod:`tpmlab.tracing.source`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import NotSupportedError, TpmlabError
from ..ir.plan import CALL_MODULE, PARAM
from .proxy import Proxy
from .unsupported import MODULE_ALTERNATIVES

if TYPE_CHECKING:
    from .model import LabModel
    from .source import Source


class Envoy:
    """Proxy of one module. ``path`` is its native dotted path (``""`` for the whole model)."""

    def __init__(self, lab_model: LabModel, path: str, module: nn.Module) -> None:
        object.__setattr__(self, "_model", lab_model)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_attached", {})  # the user's own modules (an SAE, a probe)

    def _child(self, name: str) -> Envoy:
        children = self._children
        if name not in children:
            sub = self.module.get_submodule(name)
            path = f"{self.path}.{name}" if self.path else name
            children[name] = Envoy(self._model, path, sub)
        return children[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.path == "":
            alias = self._model.adapter_alias(name)
            if alias is not None:
                return self._model.envoy(alias)
        if name in self.module._modules:
            return self._child(name)
        if name in self._attached:
            return self._attached[name]
        if name in self.module._parameters:
            raise TpmlabError(f"read parameters inside a trace with {self.path}.param({name!r}); "
                              f"its shape is {tuple(self.module._parameters[name].shape)}")
        if name in MODULE_ALTERNATIVES:
            raise NotSupportedError(MODULE_ALTERNATIVES[name])
        raise AttributeError(f"module {self.path or '<model>'} ({type(self.module).__name__}) "
                             f"has no submodule {name!r}; it has {list(self.module._modules)}")

    def __getitem__(self, index: int) -> Envoy:
        if not isinstance(self.module, (nn.ModuleList, nn.Sequential)):
            raise TpmlabError(f"{self.path} is not a list of modules")
        n = len(self.module)
        if not -n <= index < n:
            raise IndexError(f"{self.path} has {n} modules, index {index} is out of range")
        return self._child(str(index % n))

    def __len__(self) -> int:
        return len(self.module)

    def __iter__(self) -> Iterator[Envoy]:
        if isinstance(self.module, (nn.ModuleList, nn.Sequential)):
            return (self[i] for i in range(len(self.module)))
        raise TpmlabError(f"{self.path} is not a list of modules")

    # -- values in a trace --------------------------------------------------------------------
    @property
    def output(self) -> Proxy:
        """The module's output at this point of the pass (for decoder layers: the residual stream
        ``[batch, pos, d_model]``)."""
        return self._model.tracing.current(self.path).point(self.path, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._set("output", value)

    @property
    def input(self) -> Proxy:
        """The module's first input."""
        return self._model.tracing.current(self.path).point(self.path, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._set("input", value)

    @property
    def inputs(self) -> Proxy:
        """Every input of the module's call, ``(args, kwargs)`` as nnsight gives them:
        ``args, kwargs = layer.inputs``; ``layer.inputs = ((h * 2,), kwargs)`` replaces them.
        Keyword inputs that are not data (a KV cache object) are left out (and kept as they
        are when the inputs are replaced)."""
        return self._model.tracing.current(self.path).point(self.path, "inputs")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._set("inputs", value)

    def _set(self, io: str, value: Any) -> None:
        self._model.tracing.current(self.path).set_point(self.path, io, value)

    @property
    def source(self) -> Source:
        """Values inside the module's forward by nnsight's ``.source`` names: a submodule's
        call (``mlp.source.self_act_fn_0.output``) and, on an attention block, the attention
        function's output (``self_attn.source.attention_interface_1.output``); see
        :mod:`tpmlab.tracing.source`."""
        from .source import Source

        return Source(self)

    def skip(self, value: Any) -> None:
        """Make ``value`` this module's output (nnsight's ``skip``). The module still runs and
        its own result is dropped: the numbers are those of skipping it."""
        self._set("output", value)

    def param(self, name: str) -> Proxy:
        """A parameter of this module as a value (e.g. ``o_proj.param("weight")``), read where it lives."""
        tracer = self._model.tracing.current(self.path)
        return tracer.record(PARAM, [name], path=self.path)

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Apply this module to values: ``model.unembed(model.final_norm(h))``."""
        tracer = self._model.tracing.current(self.path)
        return tracer.record(CALL_MODULE, list(args), kwargs, path=self.path)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            self._set(name, value)
            return
        if isinstance(value, nn.Module) and not name.startswith("_"):
            # a user's module (``layer.sae = sae``), called on values inside a trace: it runs
            # on the engine as whitelisted ops of its weights; the deployment is unchanged
            if name in self.module._modules:
                raise TpmlabError(f"{self.path} already has a submodule {name!r}")
            self._attached[name] = value
            return
        raise TpmlabError(f"cannot set {name!r} on a module proxy (only .output, .input, .inputs and "
                          "your own modules: layer.sae = sae)")

    def __repr__(self) -> str:
        return f"<Envoy {self.path or '<model>'}: {type(self.module).__name__}>"
