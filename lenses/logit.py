"""Logit lens (nostalgebraist, 2020): decode every layer's residual stream with the
model's own final norm and unembedding.

For a prompt with positions ``p`` and lens rows ``r`` (the residual entering layer 0,
then the output of each layer ``l``)::

    logits_r[p] = W_U · final_norm(h_r[p])        (+ the unembedding bias, if any)

The last row is the output of the last layer, so ``final_norm`` is applied exactly
once and that row equals the model's own logits. All reductions (top-k, KL to the
final distribution, entropy, probability and rank of the model's top-1 token) run
on the engine; the ``[rows, pos, vocab]`` logits stay there unless ``keep_logits``.

    >>> logit = tpmlab.lenses.get("logit")
    >>> res = logit.run(model, "The Eiffel Tower is located in the city of")
    >>> res.top_tokens[-1][-1]          # last row, last position
    [' Paris', ...]
    >>> res.plot(metric="kl")

As a dashboard: ``tpmlab.widgets.dashboard(model, "logit", prompt=...)``. Its
:func:`decode` is the seam other lenses that decode residuals reuse (the tuned lens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tpmlab.lenses import LensResult, Progress, Provenance
from tpmlab.lenses.common import (
    layer_list,
    residual_rows,
    token_ids,
    token_strings,
    values,
    vocab_statistics,
)
from tpmlab.lenses.contract import Axis, Cell, LensView, Metric, Option, Table
from tpmlab.lenses.result import plain, position_labels, shown, token_label

NAME = "logit"
TITLE = "logit lens"
DESCRIPTION = "Every layer's residual stream decoded by the model's own final norm and unembedding."

TOP_N = 5  # tokens listed per cell in hover text

#: What can colour the grid: ``[rows, positions]`` values of :meth:`LogitLensResult.metric`.
METRICS = (
    Metric("target_prob", "probability", "P(final top-1)", zmin=0.0, zmax=1.0),
    Metric("target_rank", "rank", "log10 rank", "Viridis_r", log10=True),
    Metric("kl", "KL", "KL (nats)", "Viridis_r"),
    Metric("entropy", "entropy", "entropy (nats)", "Viridis_r"),
    Metric("top_prob", "top-1 probability", "P(top-1)", zmin=0.0, zmax=1.0),
)

#: The options of :func:`run` that the logit lens and the lenses built on it share.
OPTIONS = (
    Option("top_k", "int", "top k", "tokens kept per cell", shown=False),
    Option("include_input", "bool", "input row", "also decode the residual entering layer 0",
           shown=False),
    Option("layers", "object", "layers", "which layer outputs to decode (default: all)"),
    Option("keep_logits", "bool", "keep logits", "also bring back the [rows, pos, vocab] logits",
           shown=False),
)

VIEW = LensView(
    inputs="prompt", rows=Axis("layer"), cols=Axis("position"), metrics=METRICS, options=OPTIONS,
    detail="the cell's top-k tokens with probabilities; the model's final top-1 token with its "
           "probability and rank there; KL to the final distribution and entropy",
    example={"prompt": "The Eiffel Tower is located in the city of"})


@dataclass(repr=False)
class LogitLensResult(LensResult):
    """Per row ``r`` (``rows``) and position ``p`` (``tokens``):

    ``data["top_probs"]``/``["top_ids"]`` ``[R, P, k]``; ``["kl"]`` KL(final || row) in nats,
    ``["entropy"]`` in nats, ``["target_prob"]`` and ``["target_rank"]`` (1 = top) of the
    model's final top-1 token ``["target_ids"]`` ``[P]``; ``["input_ids"]`` ``[P]``;
    ``["logits"]`` ``[R, P, vocab]`` only if kept.
    """

    rows: list[str] | None = None
    tokens: list[str] | None = None
    top_tokens: list[list[list[str]]] | None = None
    target_tokens: list[str] | None = None

    lens = NAME
    title = TITLE
    view = VIEW

    def table(self) -> list[dict[str, Any]]:
        d = self.data
        out = []
        for r, row in enumerate(self.rows):
            for p, tok in enumerate(self.tokens):
                out.append({
                    "layer": row, "position": p, "token": tok,
                    "top1": self.top_tokens[r][p][0], "top1_prob": plain(d["top_probs"][r, p, 0]),
                    "target": self.target_tokens[p], "target_prob": plain(d["target_prob"][r, p]),
                    "target_rank": plain(d["target_rank"][r, p]), "kl": plain(d["kl"][r, p]),
                    "entropy": plain(d["entropy"][r, p]),
                })
        return out

    # -- the grid: rows x positions ---------------------------------------------------------------
    def row_labels(self) -> list[str]:
        return list(self.rows)

    def col_labels(self) -> list[str]:
        return position_labels(self.tokens)

    def metric(self, name: str) -> torch.Tensor:
        """``[R, P]`` values of one of :data:`METRICS` (``top_prob``: the top-1 probability)."""
        self.view.metric(name)  # ValueError naming the metrics
        if name == "top_prob":
            return self.data["top_probs"][..., 0]
        return self.data[name].float()

    def cell_text(self, metric: str) -> list[list[str]]:
        """The top-1 token of every cell."""
        return [[token_label(cell[0], 7) for cell in row] for row in self.top_tokens]

    def hover(self, metric: str) -> list[list[str]]:
        """Each cell's top tokens with probabilities and its statistics."""
        d, out = self.data, []
        n = min(TOP_N, d["top_probs"].shape[-1])
        for r, row in enumerate(self.rows):
            line = []
            for p, tok in enumerate(self.tokens):
                tops = "<br>".join(
                    f"&nbsp;&nbsp;{token_label(t, 16)!s}&nbsp;&nbsp;{shown(pr, '.3f')}"
                    for t, pr in zip(self.top_tokens[r][p][:n], d["top_probs"][r, p, :n].tolist()))
                line.append(
                    f"<b>layer {row}</b>, position {p} ({token_label(tok, 16)})<br>top {n}:<br>{tops}<br>"
                    f"P(final top-1 {token_label(self.target_tokens[p], 16)}) "
                    f"{shown(d['target_prob'][r, p], '.3f')}, rank {int(d['target_rank'][r, p])}<br>"
                    f"KL {shown(d['kl'][r, p], '.3f')}, entropy {shown(d['entropy'][r, p], '.3f')} nats")
            out.append(line)
        return out

    def cell(self, row: int, col: int) -> Cell:
        """One cell's top-k tokens with probabilities and its statistics."""
        d = self.data
        row, pos = self.clip(row, col)
        return Cell(
            title=f"layer {self.rows[row]}, position {pos}", token=self.tokens[pos],
            tables=(Table(("token", "probability"), tuple(zip(
                self.top_tokens[row][pos], d["top_probs"][row, pos].tolist()))),),
            facts={
                "final top-1": repr(self.target_tokens[pos]),
                "its probability": shown(d["target_prob"][row, pos]),
                "its rank": str(int(d["target_rank"][row, pos])),
                "KL(final || layer)": f"{shown(d['kl'][row, pos])} nats",
                "entropy": f"{shown(d['entropy'][row, pos])} nats",
            })


def record(model: Any, ids: torch.Tensor, *, layers: Sequence[int] | None = None,
           include_input: bool = True, top_k: int = 5, keep_logits: bool = False,
           translate: Callable[[list[str]], Callable[[Any], Any]] | None = None,
           ) -> tuple[dict[str, Any], list[str]]:
    """Inside an open trace/invoke over ``ids``: record the lens and return
    ``(saved proxies, row labels)``. ``translate(labels)`` gives the map applied to the
    stacked residuals ``[R, P, d_model]`` of those rows before decoding."""
    rows, labels = residual_rows(model, layer_list(model, layers), include_input)
    hidden = torch.cat(rows, 0)  # [R, P, d_model]
    final_logits = model.output.logits[0]  # [P, vocab]
    saved = vocab_statistics(model, hidden, final_logits, top_k=top_k,
                             positions=torch.arange(len(ids)), keep_logits=keep_logits,
                             translate=translate(labels) if translate is not None else None)
    return saved, labels


def run(model: Any, prompt: str | Sequence[int] | torch.Tensor | list, *,
        layers: Sequence[int] | None = None, include_input: bool = True, top_k: int = 5,
        keep_logits: bool = False, translate: Callable[[list[str]], Callable[[Any], Any]] | None = None,
        progress: Progress | None = None) -> LogitLensResult | list[LogitLensResult]:
    """Logit lens of ``prompt`` (text or token ids); a list of prompts runs as one batch
    (one invoke each) and returns one result per prompt.

    ``layers``: which layer outputs to decode (default all); ``include_input``: also the
    residual entering layer 0; ``keep_logits``: also bring back the full
    ``[rows, pos, vocab]`` logits (large); ``translate``: ``translate(labels)`` gives a map
    applied to the rows' stacked residuals ``[R, P, d_model]`` (traced) before decoding,
    e.g. trained translators; ``progress(done, total, text)``: called before and after the
    one forward pass.
    """
    return decode(model, prompt, LogitLensResult, layers=layers, include_input=include_input,
                  top_k=top_k, keep_logits=keep_logits, translate=translate, progress=progress)


def decode(model: Any, prompt: Any, result_type: type[LogitLensResult], *,
           layers: Sequence[int] | None = None, include_input: bool = True, top_k: int = 5,
           keep_logits: bool = False, translate: Callable[[list[str]], Callable[[Any], Any]] | None = None,
           progress: Progress | None = None) -> Any:
    """:func:`run`, returning ``result_type`` (a :class:`LogitLensResult` subclass): the
    seam for lenses that decode the residual stream the same way after their own
    ``translate`` (the tuned lens)."""
    batch = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    prompts = prompt if batch else [prompt]
    all_ids = [token_ids(model, p) for p in prompts]
    opts = {"layers": layers, "include_input": include_input, "top_k": top_k,
            "keep_logits": keep_logits}
    if progress is not None:
        progress(0, 1, result_type.title)
    recorded = []
    with model.trace() as tr:
        for ids in all_ids:
            with tr.invoke(input_ids=ids):
                recorded.append(record(model, ids, translate=translate, **opts))
    prov = Provenance.from_traces(model, tr)
    results = []
    for ids, (saved, labels) in zip(all_ids, recorded):
        data = values(saved)
        data["input_ids"] = ids
        results.append(result_type(
            data=data, provenance=prov, options=dict(opts), rows=labels,
            tokens=token_strings(model, ids),
            top_tokens=[[token_strings(model, cell) for cell in row] for row in data["top_ids"]],
            target_tokens=token_strings(model, data["target_ids"])))
    if progress is not None:
        progress(1, 1, result_type.title)
    return results if batch else results[0]
