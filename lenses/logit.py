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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tpmlab.lenses import LensResult, Provenance
from tpmlab.lenses.common import (
    layer_list,
    residual_rows,
    token_ids,
    token_strings,
    values,
    vocab_statistics,
)
from tpmlab.lenses.result import plain, shown

NAME = "logit"
METRICS = ("target_prob", "kl", "entropy", "target_rank", "top_prob")


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

    lens = "logit"

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

    def metric(self, name: str) -> torch.Tensor:
        """``[R, P]`` values of one of :data:`METRICS` (``top_prob``: the top-1 probability)."""
        if name == "top_prob":
            return self.data["top_probs"][..., 0]
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
        return self.data[name].float()

    def plot(self, metric: str = "target_prob", title: str | None = None):
        """Heatmap of ``metric`` over rows x positions, each cell labelled with its top-1 token."""
        import plotly.graph_objects as go

        z = self.metric(metric)
        text = [[cell[0] for cell in row] for row in self.top_tokens]
        hover = [[f"layer {self.rows[r]}, pos {p} {self.tokens[p]!r}<br>top: "
                  + ", ".join(f"{t!r} {shown(pr, '.3f')}" for t, pr in zip(
                      self.top_tokens[r][p], self.data["top_probs"][r, p].tolist()))
                  + f"<br>KL {shown(self.data['kl'][r, p], '.3f')} nats, "
                  f"H {shown(self.data['entropy'][r, p], '.3f')}"
                  for p in range(len(self.tokens))] for r in range(len(self.rows))]
        x = [f"{p}:{t}" for p, t in enumerate(self.tokens)]
        fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=self.rows, text=text,
                                   texttemplate="%{text}", hovertext=hover,
                                   hoverinfo="text", colorbar={"title": metric}))
        fig.update_layout(title=title or f"{self.lens} lens: {metric} ({self.provenance.model})",
                          xaxis_title="position", yaxis_title="layer")
        return fig


def record(model: Any, ids: torch.Tensor, *, layers: Sequence[int] | None = None,
           include_input: bool = True, top_k: int = 5, keep_logits: bool = False,
           translate: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Inside an open trace/invoke over ``ids``: record the lens and return
    ``(saved proxies, row labels)``. ``translate`` maps the stacked residuals
    ``[R, P, d]`` before decoding (the tuned lens passes its translators)."""
    rows, labels = residual_rows(model, layer_list(model, layers), include_input)
    hidden = torch.cat(rows, 0)  # [R, P, d_model]
    final_logits = model.output.logits[0]  # [P, vocab]
    saved = vocab_statistics(model, hidden, final_logits, top_k=top_k,
                             positions=torch.arange(len(ids)), keep_logits=keep_logits,
                             translate=translate(labels) if translate is not None else None)
    return saved, labels


def run(model: Any, prompt: str | Sequence[int] | torch.Tensor | list, *,
        layers: Sequence[int] | None = None, include_input: bool = True, top_k: int = 5,
        keep_logits: bool = False) -> LogitLensResult | list[LogitLensResult]:
    """Logit lens of ``prompt`` (text or token ids); a list of prompts runs as one batch
    (one invoke each) and returns one result per prompt.

    ``layers``: which layer outputs to decode (default all); ``include_input``: also the
    residual entering layer 0; ``keep_logits``: also bring back the full
    ``[rows, pos, vocab]`` logits (large).
    """
    return _run(model, prompt, layers=layers, include_input=include_input, top_k=top_k,
                keep_logits=keep_logits, translate=None, result_type=LogitLensResult)


def _run(model: Any, prompt: Any, *, result_type: type, translate: Any, **opts: Any) -> Any:
    batch = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    prompts = prompt if batch else [prompt]
    all_ids = [token_ids(model, p) for p in prompts]
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
    return results if batch else results[0]
