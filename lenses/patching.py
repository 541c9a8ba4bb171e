"""Activation patching.

**Causal tracing** (Meng et al., 2022, ROME). Corrupt the subject: add Gaussian noise to
the embeddings of the subject tokens, ``e[s] += eps``, ``eps ~ N(0, (noise * sigma)^2)``
with ``sigma`` the standard deviation of the embedding matrix's entries and ``noise = 3``;
the noise is drawn here from a seeded generator and sent as a constant (``samples``
draws, one batch row each). Then restore one clean state at a time::

    p_clean   = P(answer | clean prompt)
    p_corrupt = mean_s P(answer | corrupted_s)
    IE(l, p)  = mean_s P(answer | corrupted_s, state(l, p) := clean state(l, p)) - p_corrupt

``kind``: ``"resid"`` (the layer's output), ``"attn"`` or ``"mlp"`` (that module's output,
restored at layers ``l - window//2 .. l + window//2 - (1 - window % 2)``; ``window``
defaults to 1 for ``resid`` and to ROME's 10 for ``attn``/``mlp``).

**Prompt-pair patching.** Run the corrupted prompt with one clean state patched in; with
``LD = logit(answer) - logit(wrong)`` at the last position::

    score(l, p) = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)     (1: fully restored)

Every (layer, position) is one invoke; up to ``max_invokes_per_pass`` run in each forward
pass, and ``progress`` hears between passes. Causal tracing is the lens's ``run`` (what its
dashboard shows).

    >>> patching = tpmlab.lenses.get("patching")
    >>> res = patching.causal_trace(model, "The Eiffel Tower is located in the city of",
    ...                             subject="The Eiffel Tower", answer=" Paris")
    >>> res.plot()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tpmlab.lenses import LensResult, Progress, Provenance
from tpmlab.lenses.common import answer_token, first, layer_list, token_ids, token_strings
from tpmlab.lenses.contract import Axis, Cell, LensInputError, LensView, Metric, Option
from tpmlab.lenses.result import grid_table, plain, position_labels, shown, token_label

NAME = "patching"
TITLE = "causal tracing"
DESCRIPTION = ("Activation patching: restore one clean state (layer, position) into a "
               "corrupted run and measure how much of the answer comes back.")
KINDS = ("resid", "attn", "mlp")

VIEW = LensView(
    inputs="prompt", rows=Axis("layer"), cols=Axis("position", "position (\u25b8 subject)"),
    metrics=(Metric("effect", "effect", colorscale="Purples", centered=None, diverging="RdBu_r"),),
    options=(
        Option("subject", "text", "subject", "the part of the prompt to corrupt"),
        Option("answer", "text", "answer", "the model's top-1 if empty"),
        Option("kind", "choice", "state", "which state to restore", choices=KINDS),
        Option("samples", "int", "samples", "noise draws", shown=False),
        Option("window", "int", "window", "layers restored together (attn, mlp)", shown=False),
        Option("noise", "float", "noise", "noise scale, in embedding standard deviations",
               shown=False),
        Option("seed", "int", "seed", "seed of the noise", shown=False),
        Option("layers", "object", "layers", "which layers (default: all)"),
        Option("max_invokes_per_pass", "int", "invokes per pass",
               "invokes packed in one forward pass", shown=False),
    ),
    detail="the answer's probability clean, corrupted and restored at the cell; the "
           "strongest layer at that position",
    example={"prompt": "The Eiffel Tower is located in the city of",
             "subject": "The Eiffel Tower", "samples": 2})


def subject_positions(model: Any, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` inside ``prompt`` (by character offsets)."""
    start = prompt.find(subject)
    if start < 0:
        raise LensInputError(f"subject {subject!r} does not occur in {prompt!r}")
    end = start + len(subject)
    enc = model.tokenizer(prompt, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]


def _value(model: Any, kind: str, layer: int) -> Any:
    """Inside a trace: the value patched for ``kind`` at ``layer`` (``[rows, pos, d]``)."""
    a = model.adapter
    if kind == "resid":
        return model.layers[layer].output
    module = model.envoy(f"{a.layer_path(layer)}.{a.attn if kind == 'attn' else a.mlp}")
    return first(module.output) if kind == "attn" else module.output


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    lo = max(0, layer - window // 2)
    hi = min(n_layers, layer - window // 2 + window)
    return list(range(lo, hi))


@dataclass(repr=False)
class PatchingResult(LensResult):
    """``data["effect"]`` ``[L, P]`` (indirect effect, or normalised logit difference) per
    layer (``layers``) and position (``tokens``); baselines in ``data``."""

    layers: list[int] | None = None
    tokens: list[str] | None = None

    lens = NAME
    title = TITLE
    view = VIEW

    def table(self) -> list[dict[str, Any]]:
        return grid_table(self.layers, self.tokens, self.data, ("effect",))

    def peak(self) -> dict[str, Any]:
        """The (layer, position) with the largest effect."""
        e = self.data["effect"]
        i, p = divmod(int(e.argmax()), e.shape[1])
        return {"layer": self.layers[i], "position": p, "token": self.tokens[p],
                "effect": plain(e[i, p])}

    # -- the grid: layers x positions ------------------------------------------------------------
    def _subject(self) -> list[int]:
        return [int(p) for p in self.data.get("subject_positions", torch.zeros(0)).tolist()]

    def row_labels(self) -> list[str]:
        return [str(x) for x in self.layers]

    def col_labels(self) -> list[str]:
        subject = self._subject()
        return [("\u25b8" if p in subject else "") + label
                for p, label in enumerate(position_labels(self.tokens))]

    def marked_cols(self) -> list[int]:
        """The subject tokens (causal tracing)."""
        return self._subject()

    def metric(self, name: str) -> torch.Tensor:
        self.view.metric(name)
        return self.data["effect"].float()

    def hover(self, metric: str) -> list[list[str]]:
        e, subject, what = self.data["effect"], self._subject(), self.options.get("metric", "effect")
        return [[f"<b>layer {layer}</b>, position {p} ({token_label(t, 16)})"
                 f"{' (subject)' if p in subject else ''}<br>{what}: {shown(e[i, p])}"
                 for p, t in enumerate(self.tokens)] for i, layer in enumerate(self.layers)]

    def heading(self, metric: Metric) -> str:
        return (f"{self.options.get('method', 'patching')} ({self.options.get('kind', '')}) "
                f"\u00b7 {self.options.get('metric', metric.label)} \u00b7 {self.provenance.model}")

    def focus(self) -> tuple[int, int]:
        """The :meth:`peak`."""
        peak = self.peak()
        return self.layers.index(peak["layer"]), peak["position"]

    def cell(self, row: int, col: int) -> Cell:
        d = self.data
        layer, pos = self.clip(row, col)
        effect = float(d["effect"][layer, pos])
        facts = {"effect": shown(effect), "metric": str(self.options.get("metric"))}
        if "p_clean" in d:
            facts.update({"P(answer) clean": shown(d["p_clean"]),
                          "P(answer) corrupted": shown(d["p_corrupt"]),
                          "P(answer) restored here": shown(d["p_corrupt"] + effect),
                          "subject token": "yes" if pos in self._subject() else "no"})
        if "logit_diff" in d:
            facts.update({"logit diff clean": shown(d["ld_clean"], ".3f"),
                          "logit diff corrupted": shown(d["ld_corrupt"], ".3f"),
                          "logit diff patched": shown(d["logit_diff"][layer, pos], ".3f")})
        column = d["effect"][:, pos]
        best = int(column.argmax())
        facts["strongest layer at this position"] = f"{self.layers[best]} ({shown(column[best])})"
        return Cell(title=f"layer {self.layers[layer]}, position {pos}", token=self.tokens[pos],
                    facts=facts)


def _run_jobs(model: Any, jobs: list[Any], record: Any, max_per_pass: int,
              progress: Progress | None, done: int, total: int, text: str,
              ) -> tuple[list[Any], list[Any]]:
    """Run ``record(tr, job)`` (returning a proxy to save) for each job, packed into passes
    of ``max_per_pass`` invokes; ``progress`` hears before each pass (counting from ``done``
    of ``total``) and after the last. Returns the saved values and the traces."""
    out, traces = [], []
    for n, start in enumerate(range(0, len(jobs), max_per_pass)):
        if progress is not None:
            progress(done + n, total, text)
        saved = []
        with model.trace() as tr:
            for job in jobs[start:start + max_per_pass]:
                saved.append(record(tr, job))
        traces.append(tr)
        out += [s.value for s in saved]
    if progress is not None:
        progress(total, total, text)
    return out, traces


def _passes(n_jobs: int, max_per_pass: int) -> int:
    return -(-n_jobs // max_per_pass)


def causal_trace(model: Any, prompt: str, *, subject: str | None = None,
                 subject_tokens: Sequence[int] | None = None, answer: str | int | None = None,
                 kind: str = "resid", window: int | None = None, samples: int = 5,
                 noise: float = 3.0, seed: int = 0, layers: Sequence[int] | None = None,
                 max_invokes_per_pass: int = 64, progress: Progress | None = None) -> PatchingResult:
    """Causal tracing of ``prompt`` (see the module docstring). ``answer`` defaults to the
    model's clean top-1 token; ``window`` to 1 for ``resid``, 10 for ``attn``/``mlp``.
    Returns ``effect`` = IE ``[L, P]`` plus ``p_clean``, ``p_corrupt``, ``noise_std`` and the
    noise itself (``noise`` ``[samples, n_subj, d]``)."""
    if kind not in KINDS:
        raise LensInputError(f"kind must be one of {KINDS}, got {kind!r}")
    if subject is None and subject_tokens is None:
        raise LensInputError("give the subject (the part of the prompt to corrupt) or its "
                         "token positions (subject_tokens)")
    window = (1 if kind == "resid" else 10) if window is None else window
    ids = token_ids(model, prompt)
    subj = list(subject_tokens) if subject_tokens is not None else subject_positions(model, prompt, subject)
    chosen = layer_list(model, layers)
    n_layers, P = model.adapter.n_layers, len(ids)
    rows = ids[None].expand(samples, P).contiguous()
    jobs = [None] + [(layer, p) for layer in chosen for p in range(P)]
    total = 1 + _passes(len(jobs), max_invokes_per_pass)
    if progress is not None:
        progress(0, total, TITLE)
    # clean run: answer, clean states, embedding std (one pass)
    with model.trace(input_ids=ids) as clean_trace:
        sigma = model.embed.param("weight").float().std().save()
        logits = model.output.logits[0, -1].float()
        top = logits.argmax(-1).save()
        clean_probs = logits.softmax(-1).save()
        clean = {layer: _value(model, kind, layer)[0].save() for layer in range(n_layers)}
    target = answer_token(model, answer) if answer is not None else int(top.value)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(samples, len(subj), model.adapter.d_model, generator=gen) * noise * sigma.value
    subj_idx = torch.tensor(subj, dtype=torch.long)

    def corrupted(tr, restore):
        with tr.invoke(input_ids=rows):
            model.embed.output[:, subj_idx] += eps
            if restore is not None:
                layer, p = restore
                for w in _window(layer, window, n_layers) if kind != "resid" else [layer]:
                    _value(model, kind, w)[:, p] = clean[w].value[p]
            return model.output.logits[:, -1].float().softmax(-1)[:, target].mean().save()

    probs, traces = _run_jobs(model, jobs, corrupted, max_invokes_per_pass, progress, 1, total,
                             "causal tracing")
    p_corrupt = probs[0]
    effect = torch.stack(probs[1:]).view(len(chosen), P) - p_corrupt
    return PatchingResult(
        data={"effect": effect, "p_clean": clean_probs.value[target], "p_corrupt": p_corrupt,
              "noise_std": sigma.value * noise, "noise": eps, "answer_id": torch.tensor(target),
              "subject_positions": subj_idx, "input_ids": ids},
        provenance=Provenance.from_traces(model, clean_trace, *traces), layers=chosen,
        tokens=token_strings(model, ids),
        options={"method": "causal tracing", "kind": kind, "window": window, "samples": samples,
                 "seed": seed, "metric": "indirect effect", "passes": total})


def patch_pairs(model: Any, clean: str, corrupted: str, *, answer: str | int, wrong: str | int,
                kind: str = "resid", layers: Sequence[int] | None = None,
                max_invokes_per_pass: int = 64, progress: Progress | None = None) -> PatchingResult:
    """Patch each clean state (layer, position) into the corrupted run; ``effect`` is the
    normalised logit difference ``[L, P]`` (prompts must have the same number of tokens)."""
    if kind not in KINDS:
        raise LensInputError(f"kind must be one of {KINDS}, got {kind!r}")
    c_ids, x_ids = token_ids(model, clean), token_ids(model, corrupted)
    if len(c_ids) != len(x_ids):
        raise LensInputError(f"clean and corrupted prompts must have the same number of tokens "
                         f"({len(c_ids)} vs {len(x_ids)})")
    good, bad = answer_token(model, answer), answer_token(model, wrong)
    chosen = layer_list(model, layers)
    P, n_layers = len(c_ids), model.adapter.n_layers
    jobs = [(layer, p) for layer in chosen for p in range(P)]
    total = 1 + _passes(len(jobs), max_invokes_per_pass)

    def ld():
        logits = model.output.logits[0, -1].float()
        return (logits[good] - logits[bad]).save()

    if progress is not None:
        progress(0, total, "prompt-pair patching")
    with model.trace() as base_trace:
        with base_trace.invoke(input_ids=c_ids):
            states = {layer: _value(model, kind, layer)[0].save() for layer in range(n_layers)}
            ld_clean = ld()
        with base_trace.invoke(input_ids=x_ids):
            ld_corrupt = ld()

    def patched(tr, job):
        layer, p = job
        with tr.invoke(input_ids=x_ids):
            _value(model, kind, layer)[:, p] = states[layer].value[p]
            return ld()

    lds, traces = _run_jobs(model, jobs, patched, max_invokes_per_pass, progress, 1, total,
                               "prompt-pair patching")
    lc, lx = ld_clean.value, ld_corrupt.value
    effect = (torch.stack(lds).view(len(chosen), P) - lx) / (lc - lx)
    return PatchingResult(
        data={"effect": effect, "ld_clean": lc, "ld_corrupt": lx,
              "logit_diff": torch.stack(lds).view(len(chosen), P), "input_ids": c_ids},
        provenance=Provenance.from_traces(model, base_trace, *traces), layers=chosen,
        tokens=token_strings(model, c_ids),
        options={"method": "prompt-pair patching", "kind": kind,
                 "metric": "normalised logit difference", "passes": total})


#: The lens's entry point (the contract's ``run``): :func:`causal_trace`.
run = causal_trace
