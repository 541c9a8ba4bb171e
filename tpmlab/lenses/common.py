"""Pieces several lenses share, each in one place: tokenizing prompts and answers on the
client, the tuned-lens translator formula, reading the residual stream inside a trace, and
the per-cell statistics of a vocabulary projection computed on the engine. A lens written
elsewhere may use them too.

Everything here uses only the public tracing API, so it runs the same way on
the in-process engine and on pipeline stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .contract import LensInputError


def token_ids(model: Any, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A prompt as a 1-D ``long`` tensor of token ids (text is tokenized on the client)."""
    if isinstance(prompt, str):
        return torch.tensor(model.tokenizer(prompt)["input_ids"], dtype=torch.long)
    ids = torch.as_tensor(prompt, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise LensInputError(f"one prompt at a time: expected token ids [pos], got {tuple(ids.shape)}")
    return ids


def token_strings(model: Any, ids: torch.Tensor | Sequence[int]) -> list[str]:
    """Each token id decoded on its own (for axis labels and tables)."""
    return [model.tokenizer.decode([int(i)]) for i in torch.as_tensor(ids).reshape(-1)]


def vocabulary(model: Any, *ids: torch.Tensor) -> dict[int, str]:
    """``{id: text}`` for every distinct token id in ``ids`` (each decoded once): a result
    keeps it to name the tokens it holds without the tokenizer."""
    distinct = torch.cat([torch.as_tensor(t).reshape(-1) for t in ids]).unique().tolist()
    return {int(i): model.tokenizer.decode([int(i)]) for i in distinct}


def answer_token(model: Any, answer: str | int, *, single: bool = False) -> int:
    """The token id of an answer: an ``int`` is already one; text is tokenized without
    special tokens and its first token taken (answers are read as they follow the prompt,
    so ``" Paris"`` with its space). ``single``: the text must be exactly one token."""
    if isinstance(answer, int):
        return answer
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LensInputError(f"answer {answer!r} has no tokens")
    if single and len(ids) != 1:
        raise LensInputError(f"{answer!r} is {len(ids)} tokens ({ids}); give one token or its id")
    return ids[0]


def translate(h: Any, down: Any, up: Any, bias: Any) -> Any:
    """The affine translator of the tuned lens (Belrose et al., 2023), low rank::

        T(h) = h + U (D^T h) + b           U, D: [d_model, rank], b: [d_model]

    for every vector of ``h`` ``[*rows, n, d_model]`` with its row's ``down`` (D) and ``up``
    (U) ``[*rows, d_model, rank]`` and ``bias`` (b) ``[*rows, d_model]``; with one translator
    (no row dimensions) ``h`` may be any ``[..., d_model]``. ``U = 0, b = 0`` is the
    identity. Works on tensors (client side, differentiable) and on traced values (the
    translators then travel as plan constants and run where the residuals are).
    """
    if bias.ndim > 1:
        bias = bias.unsqueeze(-2)  # [*rows, 1, d_model]: the same bias for the row's n vectors
    return h + (h @ down) @ up.transpose(-1, -2) + bias


def layer_list(model: Any, layers: Sequence[int] | None) -> list[int]:
    """Layer indices ``0..n_layers-1`` (negative ones count from the end), checked."""
    n = model.adapter.n_layers
    chosen = range(n) if layers is None else layers
    out = []
    for i in chosen:
        if not -n <= int(i) < n:
            raise IndexError(f"layer {i} out of range: the model has {n} layers")
        out.append(int(i) % n)
    return out


def first(value: Any) -> Any:
    """The main tensor of a module output: ``output[0]`` of an attention module's
    ``(attn_output, attn_weights)`` tuple (Hugging Face, transformers 5)."""
    return value[0]


def residual_rows(model: Any, layers: Sequence[int], include_input: bool) -> tuple[list[Any], list[str]]:
    """Inside a trace: the residual-stream values ``[1, pos, d_model]`` the lens reads, and
    their labels. ``"input"`` is the residual entering layer 0 (embeddings, plus learned
    position embeddings where the model has them); ``"i"`` is the output of layer ``i``."""
    rows, labels = [], []
    if include_input:
        rows.append(model.layers[0].input)
        labels.append("input")
    for i in layers:
        rows.append(model.layers[i].output)
        labels.append(str(i))
    return rows, labels


def nonnegative(x: Any) -> Any:
    """``x`` clamped at zero, with no negative zero (a tensor, or a traced value in a plan).

    For quantities that are >= 0 in exact arithmetic (KL divergence, entropy) but that float
    rounding can put a hair below zero, by an amount that changes with the order of the
    reduction (so with the thread count). ``clamp`` keeps ``-0.0`` (it equals 0), hence the
    ``+ 0.0``: in IEEE arithmetic ``-0.0 + 0.0 == +0.0`` and every other value is unchanged.
    """
    return x.clamp(min=0.0) + 0.0


def vocab_statistics(model: Any, hidden: Any, final_logits: Any, *, top_k: int,
                     positions: torch.Tensor, keep_logits: bool = False,
                     translate: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Record, inside a trace, the statistics of decoding ``hidden`` with the model's head.

    ``hidden``: proxy ``[R, P, d_model]`` (R lens rows); ``final_logits``: proxy ``[P, vocab]``,
    the model's own output; ``positions``: ``arange(P)``. With ``translate`` (tuned lens),
    ``hidden`` is first mapped by it. For each row ``r`` and position ``p``::

        z_r     = unembed(final_norm(translate(h_r)))             lens logits [vocab]
        q_r     = softmax(z_r),  p_F = softmax(final logits)
        kl      = KL(p_F || q_r) = sum_v p_F(v) (log p_F(v) - log q_r(v))     nats, >= 0
        entropy = H(q_r) = -sum_v q_r(v) log q_r(v)                           nats, >= 0
        target  = argmax_v p_F(v)                                  the model's top-1 token
        target_prob = q_r(target);  target_rank = 1 + #{v : z_r(v) > z_r(target)}

    Returns saved proxies: ``top_probs``/``top_ids`` ``[R, P, top_k]``, ``kl``, ``entropy``,
    ``target_prob``, ``target_rank`` ``[R, P]``, ``target_ids`` ``[P]`` and, with
    ``keep_logits``, ``logits`` ``[R, P, vocab]`` (the only full-vocabulary value saved).
    """
    h = hidden.float()
    if translate is not None:
        h = translate(h)
    logits = model.unembed(model.final_norm(h)).float()
    logq = logits.log_softmax(-1)
    final = final_logits.float()
    logp_final = final.log_softmax(-1)
    # Both are >= 0; rounding can leave the final layer's KL at -1e-8 (see nonnegative).
    kl = nonnegative((logp_final.exp() * (logp_final - logq)).sum(-1))
    entropy = nonnegative(-(logq.exp() * logq).sum(-1))
    top = logq.topk(top_k, dim=-1)
    target = final.argmax(-1)
    target_logit = logits[:, positions, target]
    rank = (logits > target_logit.unsqueeze(-1)).sum(-1) + 1
    out = {
        "top_probs": top.values.exp().save(),
        "top_ids": top.indices.save(),
        "kl": kl.save(),
        "entropy": entropy.save(),
        "target_prob": logq[:, positions, target].exp().save(),
        "target_rank": rank.save(),
        "target_ids": target.save(),
    }
    if keep_logits:
        out["logits"] = logits.save()
    return out


def values(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``.value`` of each saved proxy, after the trace ran."""
    return {k: v.value for k, v in saved.items()}
