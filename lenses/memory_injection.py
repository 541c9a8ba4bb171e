"""Memory injection (Sakarvadia et al., 2023, "Memory Injections: Correcting Multi-Hop
Reasoning Failures during Inference in Transformer-Based Language Models").

A *memory* is a short text whose token vectors are summed into one direction ``m``::

    m = sum_{t in memory} E[t]          (variant "embed":   rows of the input embedding)
    m = sum_{t in memory} W_U[t]        (variant "unembed": rows of the unembedding)

and added, scaled by ``tau``, to the output of one layer's attention module at chosen
positions (all by default)::

    attn_out(l)[:, positions, :] += tau * m

The effect is read as the probability of the answer's first token at the last position,
before and after. :func:`sweep` (the lens's ``run``) runs every (prompt, layer, tau) as one
invoke and packs up to ``max_invokes_per_pass`` invokes into each forward pass, reporting
to ``progress`` between passes.

    >>> mi = tpmlab.lenses.get("memory_injection")
    >>> res = mi.sweep(model, prompts, answers, memory="France", layers=range(30), taus=[2, 4, 8])
    >>> res.summary()[0]     # mean/median probability before and after, fraction improved
    >>> res.plot()
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tpmlab.lenses import LensResult, Progress, Provenance
from tpmlab.lenses.common import answer_token, first, layer_list, token_ids
from tpmlab.lenses.contract import Axis, Bars, Cell, LensInputError, LensView, Metric, Option, Table
from tpmlab.lenses.result import plain, shown, token_label

NAME = "memory_injection"
TITLE = "memory injection"
DESCRIPTION = ("Add a memory (summed token vectors) to one layer's attention output: the "
               "answer's probability before and after, per layer and scale.")

VIEW = LensView(
    inputs="prompts", rows=Axis("layer"), cols=Axis("tau", "\u03c4 (scale)"),
    metrics=(
        Metric("mean_delta", "mean change", "mean_delta", centered=True),
        Metric("mean_after", "mean after", "mean_after"),
        Metric("median_delta", "median change", "median_delta", centered=True),
        Metric("fraction_improved", "fraction improved", "fraction_improved"),
    ),
    options=(
        Option("memory", "text", "memory", "the text to inject"),
        Option("taus", "floats", "\u03c4", "scales of the memory vector"),
        Option("variant", "choice", "variant", "sum embedding or unembedding rows",
               choices=("embed", "unembed"), shown=False),
        Option("layers", "object", "layers", "which layers (default: all)"),
        Option("positions", "object", "positions", "where to add it (default: every position)"),
        Option("max_invokes_per_pass", "int", "invokes per pass",
               "invokes packed in one forward pass", shown=False),
    ),
    detail="each prompt's probability of its answer before and after the injection",
    bars=True,
    example={"prompt": "The Eiffel Tower is in the country of => France; "
                       "The Louvre is in the country of => France",
             "memory": "Paris France", "taus": (2.0, 4.0, 8.0)})


def memory_vector(model: Any, memory: str | Sequence[int], variant: str = "embed") -> torch.Tensor:
    """``m`` ``[d_model]``: the sum of the memory tokens' embedding (``"embed"``) or
    unembedding (``"unembed"``) rows, gathered on the engine (only ``m`` comes back)."""
    if variant not in ("embed", "unembed"):
        raise LensInputError(f"variant must be 'embed' or 'unembed', got {variant!r}")
    ids = (torch.tensor(model.tokenizer(memory, add_special_tokens=False)["input_ids"])
           if isinstance(memory, str) else torch.as_tensor(memory, dtype=torch.long))
    a = model.adapter
    with model.trace(input_ids=torch.tensor([0])):
        if variant == "embed" or (f"{a.unembed}.weight" not in model.info.params
                                  and getattr(model.config, "tie_word_embeddings", False)):
            w = model.embed.param("weight")  # tied: the unembedding is this same matrix
        else:
            w = model.unembed.param("weight")
        m = w[ids].float().sum(0).save()
    return m.value


@dataclass(repr=False)
class MemoryInjectionResult(LensResult):
    """``data["before"]`` ``[N]`` and ``data["after"]`` ``[N, L, T]``: the answer's first-token
    probability for ``N`` prompts, ``L`` layers (``layers``), ``T`` scales (``taus``).
    The grid: layers x taus, coloured by a :meth:`summary` statistic."""

    prompts: list[str] | None = None
    layers: list[int] | None = None
    taus: list[float] | None = None

    lens = NAME
    title = TITLE
    view = VIEW

    def table(self) -> list[dict[str, Any]]:
        b, a = self.data["before"], self.data["after"]
        return [{"prompt": p, "layer": layer, "tau": tau, "before": plain(b[i]),
                 "after": plain(a[i, j, k]), "delta": plain(a[i, j, k] - b[i])}
                for i, p in enumerate(self.prompts) for j, layer in enumerate(self.layers)
                for k, tau in enumerate(self.taus)]

    def summary(self) -> list[dict[str, Any]]:
        """Per (layer, tau): mean and median probability before/after, mean and median change,
        and the fraction of prompts whose probability went up."""
        b, a = self.data["before"], self.data["after"]
        out = []
        for j, layer in enumerate(self.layers):
            for k, tau in enumerate(self.taus):
                after, delta = a[:, j, k], a[:, j, k] - b
                out.append({"layer": layer, "tau": tau,
                            "mean_before": plain(b.mean()), "mean_after": plain(after.mean()),
                            "median_before": statistics.median(b.tolist()),
                            "median_after": statistics.median(after.tolist()),
                            "mean_delta": plain(delta.mean()),
                            "median_delta": statistics.median(delta.tolist()),
                            "fraction_improved": (delta > 0).float().mean().item()})
        return out

    def best(self) -> dict[str, Any]:
        """The (layer, tau) with the largest mean change."""
        return max(self.summary(), key=lambda r: r["mean_delta"])

    # -- the grid: layers x taus -----------------------------------------------------------------
    def row_labels(self) -> list[str]:
        return [str(x) for x in self.layers]

    def col_labels(self) -> list[str]:
        return [f"{t:g}" for t in self.taus]

    def metric(self, name: str) -> torch.Tensor:
        """``[layers, taus]`` values of a :meth:`summary` statistic."""
        self.view.metric(name)
        return torch.tensor([row[name] for row in self.summary()],
                            dtype=torch.float64).view(len(self.layers), len(self.taus))

    def hover(self, metric: str) -> list[list[str]]:
        cells = self.summary()
        return [[f"<b>layer {layer}, \u03c4 {tau:g}</b><br>mean P before {shown(c['mean_before'])}"
                 f"<br>mean P after {shown(c['mean_after'])}<br>improved {shown(c['fraction_improved'], '.0%')}"
                 for k, tau in enumerate(self.taus) for c in [cells[j * len(self.taus) + k]]]
                for j, layer in enumerate(self.layers)]

    def focus(self) -> tuple[int, int]:
        """The cell of :meth:`best`."""
        best = self.best()
        return self.layers.index(best["layer"]), self.taus.index(best["tau"])

    def bars(self, row: int, col: int) -> Bars:
        """Before/after first-token probability per prompt at cell ``(row, col)``."""
        layer, tau = self.clip(row, col)
        return Bars(
            title=f"P(answer) at layer {self.layers[layer]}, \u03c4 {self.taus[tau]:g}: "
                  "before (grey), after (blue)",
            categories=tuple(token_label(p, 24) for p in self.prompts),
            series=(("before", tuple(self.data["before"].tolist()), "#9aa5b1"),
                    ("after", tuple(self.data["after"][:, layer, tau].tolist()), "#2563eb")),
            y_title="probability")

    def cell(self, row: int, col: int) -> Cell:
        layer, tau = self.clip(row, col)
        before = self.data["before"].tolist()
        after = self.data["after"][:, layer, tau].tolist()
        return Cell(
            title=f"layer {self.layers[layer]}, \u03c4 {self.taus[tau]:g}",
            tables=(Table(("prompt", "P(answer) before \u2192 after"), tuple(
                (p, f"{shown(b, '.3f')} \u2192 {shown(a, '.3f')}")
                for p, b, a in zip(self.prompts, before, after)), tokens=False),),
            facts={"memory variant": str(self.options.get("variant")),
                   "mean change": shown(sum(a - b for a, b in zip(after, before)) / len(before), "+.4f")})


def inject(model: Any, layer: int, vector: torch.Tensor, positions: Sequence[int] | None = None) -> None:
    """Inside a trace/invoke: ``attn_out(layer)[:, positions, :] += vector`` (``output[0]`` of
    the attention module's ``(attn_output, attn_weights)``)."""
    attn = model.envoy(f"{model.adapter.layer_path(layer)}.{model.adapter.attn}")
    out = first(attn.output)
    index = slice(None) if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    out[:, index, :] += vector


def sweep(model: Any, prompts: Sequence[str], answers: Sequence[str | int], *,
          memory: str | Sequence[int] | torch.Tensor, variant: str = "embed",
          layers: Sequence[int] | None = None, taus: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
          positions: Sequence[int] | None = None, max_invokes_per_pass: int = 64,
          progress: Progress | None = None) -> MemoryInjectionResult:
    """Inject ``memory`` at every layer in ``layers`` and scale in ``taus`` for every prompt.

    ``memory``: text, token ids, or a ready vector ``m`` ``[d_model]``. Each prompt's
    baseline and every (layer, tau) run as invokes of a few batched forward passes
    (``max_invokes_per_pass`` invokes each); ``options["passes"]`` records how many.
    ``progress(done, total, text)`` is called before each pass and after the last (it may
    raise to stop the sweep there).
    """
    if len(prompts) != len(answers):
        raise LensInputError(f"{len(prompts)} prompts but {len(answers)} answers")
    if isinstance(memory, str) and not memory.strip():
        raise LensInputError("give a memory: the text whose token vectors are injected")
    m = memory if isinstance(memory, torch.Tensor) else memory_vector(model, memory, variant)
    chosen = layer_list(model, layers)
    taus = [float(t) for t in taus]
    ids = [token_ids(model, p) for p in prompts]
    targets = [answer_token(model, a) for a in answers]
    jobs = [(i, None, None) for i in range(len(prompts))]
    jobs += [(i, j, k) for i in range(len(prompts)) for j in range(len(chosen))
             for k in range(len(taus))]
    before = torch.zeros(len(prompts))
    after = torch.zeros(len(prompts), len(chosen), len(taus))
    chunks = [jobs[i:i + max_invokes_per_pass] for i in range(0, len(jobs), max_invokes_per_pass)]
    traces = []
    for n, chunk in enumerate(chunks):
        if progress is not None:
            progress(n, len(chunks), TITLE)
        saved = []
        with model.trace() as tr:
            for i, j, k in chunk:
                with tr.invoke(input_ids=ids[i]):
                    if j is not None:
                        inject(model, chosen[j], taus[k] * m, positions)
                    prob = model.output.logits[0, -1].float().softmax(-1)[targets[i]]
                    saved.append(prob.save())
        traces.append(tr)
        for (i, j, k), s in zip(chunk, saved):
            if j is None:
                before[i] = s.value
            else:
                after[i, j, k] = s.value
    if progress is not None:
        progress(len(chunks), len(chunks), TITLE)
    return MemoryInjectionResult(
        data={"before": before, "after": after, "memory": m, "answer_ids": torch.tensor(targets)},
        provenance=Provenance.from_traces(model, *traces),
        options={"variant": variant, "positions": positions, "passes": len(chunks),
                 **({"memory": memory} if isinstance(memory, str) else {})},
        prompts=list(prompts), layers=chosen, taus=taus)


#: The lens's entry point (the contract's ``run``): :func:`sweep`.
run = sweep
