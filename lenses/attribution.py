"""Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): a first-order estimate of
every activation-patching effect from one forward and one backward pass.

With the metric ``LD = logit(answer) - logit(wrong)`` at the last position, activation
patching (see the ``patching`` lens's ``patch_pairs``) runs the corrupted prompt once per
(layer, position) with the clean state patched in. AtP replaces each of those runs by its
linear approximation around the corrupted run::

    LD_patched(l, p) - LD_corrupt  ~  (a_clean(l, p) - a_corrupt(l, p)) . dLD/da_corrupt(l, p)
    score(l, p) = that estimate / (LD_clean - LD_corrupt)          (1: fully restored)

for ``a`` each layer's residual output (``resid``), its attention output (the output
projection's output, ``attn``) and its MLP output (``mlp``), at every position. Clean and
corrupted prompts run as two invokes of one trace, the gradient of the corrupted run's
``LD`` is taken there, and the dot products are reduced on the stages: only ``[L, P]``
numbers per kind come back. Several prompt pairs run batched in one trace
(:func:`attribute_pairs`): their metrics add up, and since each pair owns its rows each
pair's gradient is its own.

    >>> atp = tpmlab.lenses.get("attribution")
    >>> res = atp.run(model, "The Eiffel Tower is located in the city of",
    ...               "The Colosseum is located in the city of", answer=" Paris", wrong=" Rome")
    >>> res.data["resid"]            # [L, P] estimated normalised effect
    >>> res.plot(metric="mlp")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tpmlab.lenses import LensResult, Progress, Provenance
from tpmlab.lenses.common import answer_token, layer_list, token_ids, token_strings
from tpmlab.lenses.contract import Axis, Cell, LensView, Metric, Option, Table
from tpmlab.lenses.result import grid_table, position_labels, shown, token_label

NAME = "attribution"
TITLE = "attribution patching"
DESCRIPTION = ("Attribution patching: (clean - corrupted) . gradient of the logit difference "
               "for every layer and position, residual, attention and MLP, in one pass.")
KINDS = ("resid", "attn", "mlp")
EXAMPLE = {"prompt": ("The Eiffel Tower is located in the city of",
                      "The Colosseum is located in the city of"),
           "answer": " Paris", "wrong": " Rome"}

VIEW = LensView(
    inputs="pair", rows=Axis("layer"), cols=Axis("position"),
    metrics=tuple(Metric(k, label, "estimated effect", centered=True, diverging="RdBu_r")
                  for k, label in (("resid", "residual stream"), ("attn", "attention output"),
                                   ("mlp", "MLP output"))),
    options=(
        Option("answer", "text", "answer", "the token whose logit the metric raises"),
        Option("wrong", "text", "wrong", "the token whose logit the metric lowers"),
        Option("layers", "object", "layers", "which layers (default: all)"),
    ),
    detail="the estimated effect of patching each kind at the cell, and the logit differences",
    example=EXAMPLE)


@dataclass(repr=False)
class AttributionResult(LensResult):
    """``data[k]`` ``[L, P]`` for each of :data:`KINDS` (the normalised estimate ``score``),
    ``data[k + "_raw"]`` the estimated change of ``LD``, and ``ld_clean``/``ld_corrupt``."""

    layers: list[int] | None = None
    tokens: list[str] | None = None

    lens = NAME
    title = TITLE
    view = VIEW

    def table(self) -> list[dict[str, Any]]:
        return grid_table(self.layers, self.tokens, self.data, KINDS)

    def row_labels(self) -> list[str]:
        return [str(x) for x in self.layers]

    def col_labels(self) -> list[str]:
        return position_labels(self.tokens)

    def metric(self, name: str) -> torch.Tensor:
        self.view.metric(name)
        return self.data[name].float()

    def hover(self, metric: str) -> list[list[str]]:
        d = self.data
        return [[f"<b>layer {layer}</b>, position {p} ({token_label(t, 16)})<br>"
                 + ", ".join(f"{k} {shown(d[k][i, p])}" for k in KINDS)
                 for p, t in enumerate(self.tokens)] for i, layer in enumerate(self.layers)]

    def cell(self, row: int, col: int) -> Cell:
        d = self.data
        i, p = self.clip(row, col)
        return Cell(
            title=f"layer {self.layers[i]}, position {p}", token=self.tokens[p],
            tables=(Table(("kind", "estimated effect"),
                          tuple((k, float(d[k][i, p])) for k in KINDS), tokens=False),),
            facts={"logit diff clean": shown(d["ld_clean"], ".3f"),
                   "logit diff corrupted": shown(d["ld_corrupt"], ".3f"),
                   "estimated logit diff patched (resid)":
                       shown(d["ld_corrupt"] + d["resid_raw"][i, p], ".3f")})


def _values(model: Any, layer: int) -> dict[str, Any]:
    """Inside a trace: the activations AtP attributes at ``layer`` (each ``[rows, pos, d]``)."""
    a = model.adapter
    path = a.layer_path(layer)
    return {"resid": model.layers[layer].output,
            "attn": model.envoy(f"{path}.{a.o_proj}").output,
            "mlp": model.envoy(f"{path}.{a.mlp}").output}


def attribute_pairs(model: Any, pairs: Sequence[tuple[Any, Any]], *, answer: str | int,
                    wrong: str | int, layers: Sequence[int] | None = None,
                    progress: Progress | None = None) -> list[AttributionResult]:
    """AtP for several (clean, corrupted) pairs in one forward and backward pass; the two
    prompts of a pair must have the same number of tokens. One result per pair."""
    good, bad = answer_token(model, answer), answer_token(model, wrong)
    chosen = layer_list(model, layers)
    ids = [(token_ids(model, c), token_ids(model, x)) for c, x in pairs]
    for c, x in ids:
        if len(c) != len(x):
            raise ValueError(f"clean and corrupted prompts must have the same number of tokens "
                             f"({len(c)} vs {len(x)})")
    if progress is not None:
        progress(0, 1, TITLE)
    with model.trace() as tr:
        per_pair, metric = [], None
        for c_ids, x_ids in ids:
            with tr.invoke(input_ids=c_ids):
                clean = [_values(model, layer) for layer in chosen]
                logits = model.output.logits[0, -1].float()
                ld_clean = (logits[good] - logits[bad]).save()
            with tr.invoke(input_ids=x_ids):
                corrupt = [_values(model, layer) for layer in chosen]
                logits = model.output.logits[0, -1].float()
                ld = logits[good] - logits[bad]
                metric = ld if metric is None else metric + ld
            per_pair.append((clean, corrupt, ld_clean, ld.save()))
        metric.backward()
        saved = []
        for clean, corrupt, ld_clean, ld_corrupt in per_pair:
            raw = {k: torch.cat([((cl[k] - co[k]) * co[k].grad).sum(-1)  # [1, P] per layer
                                 for cl, co in zip(clean, corrupt)], 0).float().save()
                   for k in KINDS}
            saved.append((raw, ld_clean, ld_corrupt))
    if progress is not None:
        progress(1, 1, TITLE)
    out = []
    for (c_ids, _), (raw, ld_clean, ld_corrupt) in zip(ids, saved):
        lc, lx = ld_clean.value.float(), ld_corrupt.value.float()
        data: dict[str, Any] = {"ld_clean": lc, "ld_corrupt": lx, "input_ids": c_ids}
        for k in KINDS:
            data[f"{k}_raw"] = raw[k].value
            data[k] = raw[k].value / (lc - lx)
        out.append(AttributionResult(
            data=data, provenance=Provenance.from_traces(model, tr), layers=chosen,
            tokens=token_strings(model, c_ids),
            options={"answer": answer, "wrong": wrong, "layers": layers, "pairs": len(ids)}))
    return out


def run(model: Any, clean: str | Sequence[int] | torch.Tensor,
        corrupted: str | Sequence[int] | torch.Tensor, *, answer: str = " Paris",
        wrong: str = " Rome", layers: Sequence[int] | None = None,
        progress: Progress | None = None) -> AttributionResult:
    """AtP of one prompt pair (see the module docstring and :func:`attribute_pairs`)."""
    return attribute_pairs(model, [(clean, corrupted)], answer=answer, wrong=wrong,
                           layers=layers, progress=progress)[0]
