"""Memory injection (Sakarvadia et al., 2023, "Memory Injections: Correcting Multi-Hop
Reasoning Failures during Inference in Transformer-Based Language Models").

A *memory* is a short text whose token vectors are summed into one direction ``m``::

    m = sum_{t in memory} E[t]          (variant "embed":   rows of the input embedding)
    m = sum_{t in memory} W_U[t]        (variant "unembed": rows of the unembedding)

and added, scaled by ``tau``, to the output of one layer's attention module at chosen
positions (all by default)::

    attn_out(l)[:, positions, :] += tau * m

The effect is read as the probability of the answer's first token at the last position,
before and after. :func:`sweep` runs every (prompt, layer, tau) as one invoke and packs
as many invokes as the engine allows into each forward pass.

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

from tpmlab.lenses import LensResult, Provenance
from tpmlab.lenses.common import first, layer_list, token_ids
from tpmlab.lenses.result import plain

NAME = "memory_injection"
MAX_INVOKES_PER_PASS = 64


def answer_token(model: Any, answer: str | int) -> int:
    """The answer's first token (answers are read as they follow the prompt: ``" Paris"``)."""
    if isinstance(answer, int):
        return answer
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} has no tokens")
    return ids[0]


def memory_vector(model: Any, memory: str | Sequence[int], variant: str = "embed") -> torch.Tensor:
    """``m`` ``[d_model]``: the sum of the memory tokens' embedding (``"embed"``) or
    unembedding (``"unembed"``) rows, gathered on the engine (only ``m`` comes back)."""
    if variant not in ("embed", "unembed"):
        raise ValueError(f"variant must be 'embed' or 'unembed', got {variant!r}")
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
    probability for ``N`` prompts, ``L`` layers (``layers``), ``T`` scales (``taus``)."""

    prompts: list[str] | None = None
    layers: list[int] | None = None
    taus: list[float] | None = None

    lens = "memory_injection"

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

    def plot(self, stat: str = "mean_delta", title: str | None = None):
        """Heatmap of a :meth:`summary` statistic over layers x tau."""
        import plotly.graph_objects as go

        rows = {(r["layer"], r["tau"]): r[stat] for r in self.summary()}
        z = [[rows[(layer, tau)] for tau in self.taus] for layer in self.layers]
        fig = go.Figure(go.Heatmap(z=z, x=[str(t) for t in self.taus],
                                   y=[str(x) for x in self.layers], colorbar={"title": stat},
                                   colorscale="RdBu", zmid=0 if "delta" in stat else None))
        fig.update_layout(title=title or f"memory injection: {stat}", xaxis_title="tau",
                          yaxis_title="layer")
        return fig


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
          positions: Sequence[int] | None = None,
          max_invokes_per_pass: int = MAX_INVOKES_PER_PASS) -> MemoryInjectionResult:
    """Inject ``memory`` at every layer in ``layers`` and scale in ``taus`` for every prompt.

    ``memory``: text, token ids, or a ready vector ``m`` ``[d_model]``. Each prompt's
    baseline and every (layer, tau) run as invokes of a few batched forward passes
    (``max_invokes_per_pass`` invokes each); ``options["passes"]`` records how many.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
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
    prov = Provenance(model=model.name, model_version=model.version)
    passes = 0
    for start in range(0, len(jobs), max_invokes_per_pass):
        chunk = jobs[start:start + max_invokes_per_pass]
        saved = []
        with model.trace() as tr:
            for i, j, k in chunk:
                with tr.invoke(input_ids=ids[i]):
                    if j is not None:
                        inject(model, chosen[j], taus[k] * m, positions)
                    prob = model.output.logits[0, -1].float().softmax(-1)[targets[i]]
                    saved.append(prob.save())
        prov.add(tr)
        passes += 1
        for (i, j, k), s in zip(chunk, saved):
            if j is None:
                before[i] = s.value
            else:
                after[i, j, k] = s.value
    return MemoryInjectionResult(
        data={"before": before, "after": after, "memory": m, "answer_ids": torch.tensor(targets)},
        provenance=prov, options={"variant": variant, "positions": positions, "passes": passes},
        prompts=list(prompts), layers=chosen, taus=taus)
