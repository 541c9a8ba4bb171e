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
restored at layers ``l - window//2 .. l + window//2 - (1 - window % 2)``, ``window`` 10 in ROME).

**Prompt-pair patching.** Run the corrupted prompt with one clean state patched in; with
``LD = logit(answer) - logit(wrong)`` at the last position::

    score(l, p) = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)     (1: fully restored)

Every (layer, position) is one invoke; many run in each forward pass.

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

from tpmlab.lenses import LensResult, Provenance
from tpmlab.lenses.common import first, layer_list, token_ids, token_strings
from tpmlab.lenses.result import plain

NAME = "patching"
KINDS = ("resid", "attn", "mlp")
MAX_INVOKES_PER_PASS = 64


def _answer_id(model: Any, answer: str | int) -> int:
    if isinstance(answer, int):
        return answer
    return model.tokenizer(answer, add_special_tokens=False)["input_ids"][0]


def subject_positions(model: Any, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` inside ``prompt`` (by character offsets)."""
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in {prompt!r}")
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

    lens = "patching"

    def table(self) -> list[dict[str, Any]]:
        e = self.data["effect"]
        return [{"layer": layer, "position": p, "token": t, "effect": plain(e[i, p])}
                for i, layer in enumerate(self.layers) for p, t in enumerate(self.tokens)]

    def peak(self) -> dict[str, Any]:
        """The (layer, position) with the largest effect."""
        e = self.data["effect"]
        i, p = divmod(int(e.argmax()), e.shape[1])
        return {"layer": self.layers[i], "position": p, "token": self.tokens[p],
                "effect": plain(e[i, p])}

    def plot(self, title: str | None = None):
        import plotly.graph_objects as go

        e = self.data["effect"]
        fig = go.Figure(go.Heatmap(z=e.T.tolist(), x=[str(x) for x in self.layers],
                                   y=[f"{p}:{t}" for p, t in enumerate(self.tokens)],
                                   colorscale="Purples", colorbar={"title": self.options["metric"]}))
        fig.update_layout(title=title or f"{self.options['method']} ({self.options['kind']})",
                          xaxis_title="layer", yaxis_title="position",
                          yaxis={"autorange": "reversed"})
        return fig


def _run_jobs(model, jobs, record, max_per_pass, prov):
    """Run ``record(tr, job)`` (returning a proxy to save) for each job, packed into passes."""
    out, passes = [], 0
    for start in range(0, len(jobs), max_per_pass):
        saved = []
        with model.trace() as tr:
            for job in jobs[start:start + max_per_pass]:
                saved.append(record(tr, job))
        prov.add(tr)
        passes += 1
        out += [s.value for s in saved]
    return out, passes


def causal_trace(model: Any, prompt: str, *, subject: str | None = None,
                 subject_tokens: Sequence[int] | None = None, answer: str | int | None = None,
                 kind: str = "resid", window: int = 1, samples: int = 5, noise: float = 3.0,
                 seed: int = 0, layers: Sequence[int] | None = None,
                 max_invokes_per_pass: int = MAX_INVOKES_PER_PASS) -> PatchingResult:
    """Causal tracing of ``prompt`` (see the module docstring). ``answer`` defaults to the
    model's clean top-1 token. Returns ``effect`` = IE ``[L, P]`` plus ``p_clean``,
    ``p_corrupt``, ``noise_std`` and the noise itself (``noise`` ``[samples, n_subj, d]``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ids = token_ids(model, prompt)
    subj = list(subject_tokens) if subject_tokens is not None else subject_positions(model, prompt, subject)
    chosen = layer_list(model, layers)
    n_layers, P = model.adapter.n_layers, len(ids)
    rows = ids[None].expand(samples, P).contiguous()
    prov = Provenance(model=model.name, model_version=model.version)
    # clean run: answer, clean states, embedding std (one pass)
    with model.trace(input_ids=ids) as tr:
        sigma = model.embed.param("weight").float().std().save()
        logits = model.output.logits[0, -1].float()
        top = logits.argmax(-1).save()
        clean_probs = logits.softmax(-1).save()
        clean = {layer: _value(model, kind, layer)[0].save() for layer in range(n_layers)}
    prov.add(tr)
    target = _answer_id(model, answer) if answer is not None else int(top.value)
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

    jobs = [None] + [(layer, p) for layer in chosen for p in range(P)]
    probs, passes = _run_jobs(model, jobs, corrupted, max_invokes_per_pass, prov)
    p_corrupt = probs[0]
    effect = torch.stack(probs[1:]).view(len(chosen), P) - p_corrupt
    return PatchingResult(
        data={"effect": effect, "p_clean": clean_probs.value[target], "p_corrupt": p_corrupt,
              "noise_std": sigma.value * noise, "noise": eps, "answer_id": torch.tensor(target),
              "subject_positions": subj_idx, "input_ids": ids},
        provenance=prov, layers=chosen, tokens=token_strings(model, ids),
        options={"method": "causal tracing", "kind": kind, "window": window, "samples": samples,
                 "seed": seed, "metric": "indirect effect", "passes": passes + 1})


def patch_pairs(model: Any, clean: str, corrupted: str, *, answer: str | int, wrong: str | int,
                kind: str = "resid", layers: Sequence[int] | None = None,
                max_invokes_per_pass: int = MAX_INVOKES_PER_PASS) -> PatchingResult:
    """Patch each clean state (layer, position) into the corrupted run; ``effect`` is the
    normalised logit difference ``[L, P]`` (prompts must have the same number of tokens)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    c_ids, x_ids = token_ids(model, clean), token_ids(model, corrupted)
    if len(c_ids) != len(x_ids):
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens "
                         f"({len(c_ids)} vs {len(x_ids)})")
    good, bad = _answer_id(model, answer), _answer_id(model, wrong)
    chosen = layer_list(model, layers)
    P, n_layers = len(c_ids), model.adapter.n_layers
    prov = Provenance(model=model.name, model_version=model.version)

    def ld():
        logits = model.output.logits[0, -1].float()
        return (logits[good] - logits[bad]).save()

    with model.trace() as tr:
        with tr.invoke(input_ids=c_ids):
            states = {layer: _value(model, kind, layer)[0].save() for layer in range(n_layers)}
            ld_clean = ld()
        with tr.invoke(input_ids=x_ids):
            ld_corrupt = ld()
    prov.add(tr)

    def patched(tr, job):
        layer, p = job
        with tr.invoke(input_ids=x_ids):
            _value(model, kind, layer)[:, p] = states[layer].value[p]
            return ld()

    jobs = [(layer, p) for layer in chosen for p in range(P)]
    lds, passes = _run_jobs(model, jobs, patched, max_invokes_per_pass, prov)
    lc, lx = ld_clean.value, ld_corrupt.value
    effect = (torch.stack(lds).view(len(chosen), P) - lx) / (lc - lx)
    return PatchingResult(
        data={"effect": effect, "ld_clean": lc, "ld_corrupt": lx,
              "logit_diff": torch.stack(lds).view(len(chosen), P), "input_ids": c_ids},
        provenance=prov, layers=chosen, tokens=token_strings(model, c_ids),
        options={"method": "prompt-pair patching", "kind": kind,
                 "metric": "normalised logit difference", "passes": passes + 1})
