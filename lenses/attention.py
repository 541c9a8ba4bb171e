"""Attention lens: what each attention head writes, read in the vocabulary.

Per head ``h`` of layer ``l`` (``z`` = the input of the output projection,
``[pos, n_heads * head_dim]``; grouped-query models already repeat their KV heads
there, so ``z`` has one slice per *query* head)::

    o(l,h) = z[:, h*hd:(h+1)*hd] · W_O[:, h*hd:(h+1)*hd]^T          [pos, d_model]
    attn_out(l) = sum_h o(l,h) + b_O(l)                             (b_O: e.g. GPT-2's c_proj bias)

Two projections to the vocabulary, named apart:

* **direct logit attribution** (``dla``): the final norm linearised at the model's own
  final residual ``x_F`` (the last layer's output), so the parts add up::

      RMSNorm:   dla(c) = W_U · (g / rms(x_F) ⊙ c)                rms(x) = sqrt(mean(x^2) + eps)
      LayerNorm: dla(c) = W_U · (g / std(x_F) ⊙ (c - mean(c)))

  The heads of a layer plus its bias term (``bias_dla``) add up exactly to the layer's
  attention contribution to the final logits (``layer_dla``), and for RMSNorm models
  with no biases the embeddings plus every attention and MLP output add up to the logits.
* **head-alone lens** (``alone``): the head's vector decoded on its own as if it were the
  residual: ``softmax(W_U · final_norm(o(l,h)))``; with trained per-head translators
  (Sakarvadia et al., 2023b) ``o`` is first mapped by ``T_{l,h}(o) = o + U (D^T o) + b``
  (:func:`tpmlab.lenses.common.translate`; see :func:`load_translators`).

Only reductions leave the engine: per head and selected position, the DLA of the target
tokens, the top-k tokens of both projections, and the head-alone probability of the
targets.

    >>> attention = tpmlab.lenses.get("attention")
    >>> res = attention.run(model, "The Eiffel Tower is located in the city of")
    >>> res.data["dla"][:, -1, :, 0]        # [layer, head] logit of ' Paris' at the last position
    >>> res.token(int(res.data["dla_top_ids"][3, -1, 2, 0]))   # a token the result names
    >>> res.plot()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpmlab.lenses import LensResult, Progress, Provenance
from tpmlab.lenses.artifact import load_artifact, save_artifact
from tpmlab.lenses.common import (
    answer_token,
    first,
    layer_list,
    token_ids,
    token_strings,
    translate,
    vocabulary,
)
from tpmlab.lenses.contract import Axis, Cell, LensView, Metric, Option, Table
from tpmlab.lenses.result import plain, position_labels, shown, token_label

NAME = "attention"
TITLE = "attention lens"
DESCRIPTION = ("Per head at one position: its direct logit attribution to the target token "
               "and its output decoded alone.")
KIND = "attention"

VIEW = LensView(
    inputs="prompt", rows=Axis("layer"), cols=Axis("head"),
    metrics=(
        Metric("dla", "direct logit attribution", "logit", centered=True),
        Metric("alone_target_prob", "head-alone P(target)", "probability"),
        Metric("alone_top_prob", "head-alone top-1 probability", "probability"),
    ),
    options=(
        Option("positions", "position", "position", "the token position read", live=True),
        Option("targets", "object", "targets", "tokens (ids or strings) to attribute to "
               "(default: the model's own top-1)"),
        Option("top_k", "int", "top k", "tokens kept per head", shown=False),
        Option("layers", "object", "layers", "which layers (default: all)"),
        Option("translators", "object", "translators", "trained per-head translators"),
    ),
    detail="the head's top tokens by direct logit attribution and decoded alone; its DLA "
           "to the target beside its layer's",
    example={"prompt": "The Eiffel Tower is located in the city of"})


@dataclass
class HeadTranslators:
    """Per-head affine translators ``T(o) = o + U (D^T o) + b`` for heads ``(layer, head)``.
    ``up``/``down`` ``[n, d_model, rank]``, ``bias`` ``[n, d_model]``."""

    model: str
    model_version: str
    heads: list[tuple[int, int]]
    up: torch.Tensor
    down: torch.Tensor
    bias: torch.Tensor

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for i, (layer, head) in enumerate(self.heads):
            tensors[f"{layer}.{head}.up"] = self.up[i]
            tensors[f"{layer}.{head}.down"] = self.down[i]
            tensors[f"{layer}.{head}.bias"] = self.bias[i]
        return save_artifact(path, tensors, {
            "kind": KIND, "model": self.model, "model_version": self.model_version,
            "d_model": self.bias.shape[-1], "rank": self.up.shape[-1],
            "heads": [list(h) for h in self.heads]})

    def constants(self, layers: Sequence[int], n_heads: int):
        """``(down, up, bias)`` ``[L, H, d, r]``/``[L, H, d]``: zeros (identity) where untrained."""
        d, r = self.bias.shape[-1], self.up.shape[-1]
        down, up = torch.zeros(len(layers), n_heads, d, r), torch.zeros(len(layers), n_heads, d, r)
        bias = torch.zeros(len(layers), n_heads, d)
        where = {lh: i for i, lh in enumerate(self.heads)}
        for j, layer in enumerate(layers):
            for h in range(n_heads):
                if (layer, h) in where:
                    i = where[(layer, h)]
                    down[j, h], up[j, h], bias[j, h] = self.down[i], self.up[i], self.bias[i]
        return down, up, bias


def load_translators(path: str | Path, model: Any = None) -> HeadTranslators:
    """Read per-head translators saved in the lens artifact format (kind ``"attention"``:
    tensors ``"{layer}.{head}.up|down|bias"``), checked against ``model``'s version."""
    tensors, meta = load_artifact(path, kind=KIND, model=model)
    heads = [tuple(h) for h in meta["heads"]]
    stack = lambda part: torch.stack([tensors[f"{lh[0]}.{lh[1]}.{part}"].float() for lh in heads])  # noqa: E731
    return HeadTranslators(meta["model"], meta["model_version"], heads, stack("up"),
                           stack("down"), stack("bias"))


@dataclass(repr=False)
class AttentionLensResult(LensResult):
    """``data`` (``L`` layers, ``P`` selected positions, ``H`` heads, ``T`` targets, ``k``):
    ``dla`` ``[L, P, H, T]``, ``bias_dla`` and ``layer_dla`` ``[L, P, T]``, ``dla_top_ids``
    /``dla_top_values`` ``[L, P, H, k]``, ``alone_top_ids``/``alone_top_probs``
    ``[L, P, H, k]``, ``alone_target_prob`` ``[L, P, H, T]``, ``targets`` ``[P, T]``,
    ``positions`` ``[P]``, ``input_ids``. ``vocab`` names every token id the data holds
    (:meth:`token`).

    The grid: layers x heads (with several positions, each position's heads side by side),
    for the first target."""

    layers: list[int] | None = None
    tokens: list[str] | None = None
    target_tokens: list[list[str]] | None = None
    vocab: dict[int, str] | None = None

    lens = NAME
    title = TITLE
    view = VIEW

    def token(self, token_id: int | torch.Tensor) -> str:
        """The text of a token id held in the result."""
        return self.vocab[int(token_id)]

    def table(self) -> list[dict[str, Any]]:
        d, out = self.data, []
        for i, layer in enumerate(self.layers):
            for j, pos in enumerate(d["positions"].tolist()):
                for h in range(d["dla"].shape[2]):
                    out.append({
                        "layer": layer, "head": h, "position": pos, "token": self.tokens[pos],
                        "target": self.target_tokens[j][0], "dla": plain(d["dla"][i, j, h, 0]),
                        "dla_top1": self.token(d["dla_top_ids"][i, j, h, 0]),
                        "alone_top1": self.token(d["alone_top_ids"][i, j, h, 0]),
                        "alone_top1_prob": plain(d["alone_top_probs"][i, j, h, 0]),
                        "alone_target_prob": plain(d["alone_target_prob"][i, j, h, 0]),
                    })
        return out

    # -- the grid: layers x (position, head) -----------------------------------------------------
    def _where(self, col: int) -> tuple[int, int]:
        """Column ``col`` as (position index, head)."""
        return divmod(col, self.data["dla"].shape[2])

    def row_labels(self) -> list[str]:
        return [str(x) for x in self.layers]

    def col_labels(self) -> list[str]:
        P, H = self.data["dla"].shape[1:3]
        if P == 1:
            return [f"H{h}" for h in range(H)]
        names = position_labels(self.tokens)
        return [f"{names[int(self.data['positions'][j])]} H{h}" for j in range(P) for h in range(H)]

    def metric(self, name: str) -> torch.Tensor:
        """``[layers, positions * heads]`` values of a metric (first target)."""
        self.view.metric(name)
        d = self.data
        value = {"dla": d["dla"][..., 0], "alone_target_prob": d["alone_target_prob"][..., 0],
                 "alone_top_prob": d["alone_top_probs"][..., 0]}[name]
        return value.reshape(value.shape[0], -1).float()

    def cell_text(self, metric: str) -> list[list[str]]:
        """Each head's top token: by DLA for the DLA metric, else decoded alone."""
        ids = self.data["dla_top_ids" if metric == "dla" else "alone_top_ids"][..., 0]
        return [[token_label(self.token(t), 7) for t in row.reshape(-1).tolist()] for row in ids]

    def hover(self, metric: str) -> list[list[str]]:
        d, out = self.data, []
        for i, layer in enumerate(self.layers):
            line = []
            for c in range(len(self.col_labels())):
                j, h = self._where(c)
                dla_top = ", ".join(token_label(self.token(t), 12)
                                    for t in d["dla_top_ids"][i, j, h, :3].tolist())
                alone = ", ".join(f"{token_label(self.token(t), 12)} {shown(p, '.2f')}" for t, p in zip(
                    d["alone_top_ids"][i, j, h, :3].tolist(), d["alone_top_probs"][i, j, h, :3].tolist()))
                line.append(f"<b>L{layer} H{h}</b><br>DLA to {token_label(self.target_tokens[j][0], 12)}: "
                            f"{shown(d['dla'][i, j, h, 0], '.3f')}<br>top DLA: {dla_top}<br>"
                            f"head alone: {alone}")
            out.append(line)
        return out

    def heading(self, metric: Metric) -> str:
        positions = self.data["positions"].tolist()
        if len(positions) > 1:
            return f"{self.title} \u00b7 {metric.label} \u00b7 positions {positions}"
        p = positions[0]
        return (f"{self.title} \u00b7 {metric.label} \u00b7 position {p} "
                f"({token_label(self.tokens[p])}) \u2192 {token_label(self.target_tokens[0][0])}")

    def focus(self) -> tuple[int, int]:
        """The head with the largest direct logit attribution (by magnitude)."""
        z = self.metric("dla").abs()
        return divmod(int(z.argmax()), z.shape[1])

    def cell(self, row: int, col: int) -> Cell:
        """One head's top tokens: by direct logit attribution and by its head-alone distribution."""
        d = self.data
        layer, col = self.clip(row, col)
        j, head = self._where(col)
        position = int(d["positions"][j])
        dla = tuple((self.token(t), v) for t, v in zip(d["dla_top_ids"][layer, j, head].tolist(),
                                                         d["dla_top_values"][layer, j, head].tolist()))
        alone = tuple((self.token(t), p) for t, p in zip(d["alone_top_ids"][layer, j, head].tolist(),
                                                           d["alone_top_probs"][layer, j, head].tolist()))
        return Cell(
            title=f"layer {self.layers[layer]}, head {head}", token=self.tokens[position],
            tables=(Table(("top DLA token", "logit"), dla),
                    Table(("head-alone token", "probability"), alone)),
            facts={
                "position": str(position),
                "target": repr(self.target_tokens[j][0]),
                "DLA to target": shown(d["dla"][layer, j, head, 0]),
                "layer's attention DLA": shown(d["layer_dla"][layer, j, 0]),
                "head-alone P(target)": shown(d["alone_target_prob"][layer, j, head, 0]),
            })


def _has_param(model: Any, path: str, name: str) -> bool:
    return f"{path}.{name}" in model.info.params


def record_heads(model: Any, layer: int, positions: torch.Tensor) -> tuple[Any, Any, Any]:
    """Inside a trace: ``(heads [P, H, d], bias [d] or None, attn_out [P, d])`` of ``layer``."""
    a = model.adapter
    H, hd = a.n_heads, a.head_dim
    o_path = f"{a.layer_path(layer)}.{a.o_proj}"
    o_proj = model.envoy(o_path)
    z = o_proj.input[0][positions].view(len(positions), H, hd)
    w = o_proj.param("weight")
    if a.weight_layout == "conv1d":  # GPT-2's Conv1D: y = z W + b, W [H*hd, d]
        heads = torch.einsum("phk,hkd->phd", z, w.view(H, hd, a.d_model))
    else:  # nn.Linear: y = z W^T + b, W [d, H*hd]
        heads = torch.einsum("phk,dhk->phd", z, w.view(a.d_model, H, hd))
    bias = o_proj.param("bias") if _has_param(model, o_path, "bias") else None
    attn = model.envoy(f"{a.layer_path(layer)}.{a.attn}")
    attn_out = first(attn.output)[0][positions]
    return heads, bias, attn_out


def _final_scale(model: Any, x_final: Any) -> tuple[Any, bool]:
    """``(s [P, d], centred)``: the final norm's scale at the final residual, and whether
    components must be centred first (LayerNorm)."""
    a = model.adapter
    norm = model.envoy(a.final_norm).module
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", 1e-5)
    g = model.final_norm.param("weight").float()
    x = x_final.float()
    if _has_param(model, a.final_norm, "bias"):  # LayerNorm
        var = x.var(-1, keepdim=True, unbiased=False)
        return g / (var + eps).sqrt(), True
    return g * (x.square().mean(-1, keepdim=True) + eps).rsqrt(), False


def _project(model: Any, vectors: Any) -> Any:
    """``W_U · v`` without the unembedding's bias (components must add up)."""
    logits = model.unembed(vectors)
    if _has_param(model, model.adapter.unembed, "bias"):
        logits = logits - model.unembed.param("bias")
    return logits


def dla_vectors(model: Any, comp: Any, scale: Any, centred: bool) -> Any:
    """``scale ⊙ comp`` (centred first for LayerNorm); ``comp`` ``[..., P, d]`` or ``[..., P, H, d]``
    with ``scale`` broadcast accordingly by the caller."""
    c = comp.float()
    if centred:
        c = c - c.mean(-1, keepdim=True)
    return c * scale


def run(model: Any, prompt: str | Sequence[int] | torch.Tensor, *,
        layers: Sequence[int] | None = None, positions: int | Sequence[int] = -1,
        targets: Sequence[int | str] | None = None, top_k: int = 5,
        translators: HeadTranslators | None = None,
        progress: Progress | None = None) -> AttentionLensResult:
    """Attention lens of one prompt at ``positions`` (a position or several; default: the
    last).

    ``targets``: token ids or strings (single tokens) whose DLA and head-alone probability
    are reported at every position; default: the model's own top-1 token at each position.
    ``translators``: trained per-head translators for the head-alone lens.
    ``progress(done, total, text)``: called before and after the one forward pass.
    """
    a = model.adapter
    ids = token_ids(model, prompt)
    n = len(ids)
    positions = [positions] if isinstance(positions, int) else list(positions)
    for p in positions:
        if not -n <= p < n:
            raise IndexError(f"position {p} out of range: the prompt has {n} tokens")
    pos = torch.tensor([p % n for p in positions], dtype=torch.long)
    chosen = layer_list(model, layers)
    L, P, H = len(chosen), len(pos), a.n_heads
    target_const = None
    if targets is not None:
        tids = [answer_token(model, t, single=True) for t in targets]
        target_const = torch.tensor(tids, dtype=torch.long)[None].expand(P, -1).contiguous()
    if progress is not None:
        progress(0, 1, TITLE)
    with model.trace(input_ids=ids) as tr:
        parts = [record_heads(model, layer, pos) for layer in chosen]
        heads = torch.stack([p[0] for p in parts])  # [L, P, H, d]
        attn = torch.stack([p[2] for p in parts])  # [L, P, d]
        x_final = model.layers[-1].output[0][pos]  # [P, d]
        scale, centred = _final_scale(model, x_final)
        if target_const is None:
            tgt = model.output.logits[0][pos].argmax(-1).unsqueeze(-1)  # [P, 1]
        else:
            tgt = target_const
        T = 1 if target_const is None else target_const.shape[1]
        head_logits = _project(model, dla_vectors(model, heads, scale[None, :, None, :], centred))
        dla = head_logits.gather(-1, tgt[None, :, None, :].expand(L, P, H, T))
        dla_top = head_logits.topk(top_k, dim=-1)
        layer_logits = _project(model, dla_vectors(model, attn, scale[None], centred))
        layer_dla = layer_logits.gather(-1, tgt[None].expand(L, P, T))
        saved = {"dla": dla.save(), "dla_top_ids": dla_top.indices.save(),
                 "dla_top_values": dla_top.values.save(), "layer_dla": layer_dla.save()}
        if target_const is None:
            saved["targets"] = tgt.save()
        biases = [p[1] for p in parts]
        if all(b is not None for b in biases):
            b = torch.stack(biases)[:, None, :]  # [L, 1, d]
            bias_logits = _project(model, dla_vectors(model, b, scale[None], centred))
            saved["bias_dla"] = bias_logits.gather(-1, tgt[None].expand(L, P, T)).save()
        alone_in = heads.float()
        if translators is not None:  # per head: [L, H, P, d] with [L, H, d, rank] translators
            down, up, tb = translators.constants(chosen, H)
            alone_in = translate(alone_in.transpose(1, 2), down, up, tb).transpose(1, 2)
        alone = model.unembed(model.final_norm(alone_in)).float().log_softmax(-1)
        alone_top = alone.topk(top_k, dim=-1)
        saved["alone_top_ids"] = alone_top.indices.save()
        saved["alone_top_probs"] = alone_top.values.exp().save()
        saved["alone_target_prob"] = alone.gather(-1, tgt[None, :, None, :].expand(L, P, H, T)).exp().save()
    data = {k: v.value for k, v in saved.items()}
    if target_const is not None:
        data["targets"] = target_const
    if "bias_dla" not in data:
        data["bias_dla"] = torch.zeros(L, P, data["dla"].shape[-1])
    data["positions"], data["input_ids"] = pos, ids
    vocab = vocabulary(model, data["targets"], data["dla_top_ids"], data["alone_top_ids"])
    if progress is not None:
        progress(1, 1, TITLE)
    return AttentionLensResult(
        data=data, provenance=Provenance.from_traces(model, tr),
        options={"positions": positions, "top_k": top_k, "translators": translators is not None},
        layers=chosen, tokens=token_strings(model, ids),
        target_tokens=[[vocab[int(t)] for t in row] for row in data["targets"]], vocab=vocab)
