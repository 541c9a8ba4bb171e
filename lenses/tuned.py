"""Tuned lens (Belrose et al., 2023, "Eliciting Latent Predictions from Transformers
with the Tuned Lens"): the logit lens after a learned affine *translator* per layer.

For lens row ``r`` (the residual entering layer 0, or the output of layer ``l``)::

    T_r(h)   = h + U_r (D_r^T h) + b_r            U_r, D_r: [d_model, rank], b_r: [d_model]
    logits_r = W_U · final_norm(T_r(h))

Every translator starts as the identity (``U_r = 0``, ``b_r = 0``, so the untrained
tuned lens *is* the logit lens) and is trained to minimise, over tokens of text the
model generated itself from a few seed prompts (nothing is downloaded)::

    L_r = E_tokens KL( p_final || softmax(logits_r) )

The engine computes no gradients, so training runs here, on the client: residuals
are saved from traces, the final norm's and the unembedding's weights are fetched
once with ``.param("weight").save()`` and the model's own final logits are recomputed
from its normalised last hidden state. That needs the unembedding matrix in client
memory (``vocab x d_model`` floats: 113 MB for the default model) and is meant for
models whose unembedding fits; the trained lens then decodes on the engine like any
lens, its translators sent as plan constants.

The default model ships a trained low-rank lens (``lenses/artifacts/``, bfloat16);
other models are trained on first use (``run`` does it, and
``load(model, train_if_missing=True)``), reporting to a ``progress`` callback (or a tqdm
bar in a console), and cached in ``$TPMLAB_HOME/lenses/tuned/``. A lens is tied to the
weights it was trained on: loading it for another model version raises
:class:`tpmlab.lenses.artifact.ArtifactMismatchError`.

    >>> tuned = tpmlab.lenses.get("tuned")
    >>> lens = tuned.load(model)                       # shipped, cached or trained
    >>> res = tuned.run(model, "The Eiffel Tower is located in the city of", tuned_lens=lens)
    >>> res.plot(metric="kl")

Decoding is the logit lens's (:func:`logit.decode <logit.decode>` with the translators as
its ``translate``), so results, options and the dashboard view are the logit lens's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

import tpmlab.lenses
from tpmlab.lenses import Option, Progress
from tpmlab.lenses.artifact import ArtifactMismatchError, check_model, load_artifact, save_artifact
from tpmlab.lenses.common import nonnegative, translate
from tpmlab.lenses.contract import Steps

#: The lens this one extends: its rows, decoding, options, result and view.
logit = tpmlab.lenses.get("logit")

NAME = "tuned"
TITLE = "tuned lens"
DESCRIPTION = ("The logit lens after a learned affine translator per layer (trained on "
               "first use for a model without one).")
KIND = "tuned"

VIEW = dataclasses.replace(
    logit.VIEW,
    options=logit.VIEW.options + (
        Option("tuned_lens", "object", "tuned lens", "a TunedLens (default: load(model))"),
        Option("train_if_missing", "bool", "train if missing",
               "train and cache a lens when the model has none", shown=False),
        Option("training", "object", "training", "keyword arguments for train()"),
    ),
    detail="as the logit lens, after each row's translator")
SHIPPED_DIR = Path(__file__).resolve().parent / "artifacts"

#: seed prompts for self-generated training text: varied registers, nothing downloaded
SEED_PROMPTS = [
    "The history of the Roman Empire", "In mathematics, a prime number", "def fibonacci(n):",
    "Once upon a time, in a small village", "The recipe calls for two cups of flour",
    "Photosynthesis is the process by which", "The stock market fell sharply today after",
    "Dear Sir or Madam, I am writing to", "The capital of Japan is", "import numpy as np\n",
    "Q: What is the boiling point of water?\nA:", "The football match ended with",
    "Quantum mechanics describes", "My favourite book is", "The weather in London",
    "To install the package, run", "The Eiffel Tower is located in", "Scientists have discovered",
    "The president announced a new policy on", "Here is a list of fruits:",
    "The theory of evolution by natural selection", "In 1969, astronauts", "SELECT name FROM",
    "The guitar is a musical instrument", "Water is composed of", "The best way to learn a language",
    "Breaking news:", "The human heart has four chambers", "Chapter 1\n\nIt was a dark and",
    "The function returns", "A haiku about autumn:", "The population of India",
]


@dataclass
class TunedLens:
    """Affine translators for lens rows ``rows`` (labels as in the logit lens: ``"input"``,
    ``"0"``...). ``up``/``down`` ``[R, d_model, rank]``, ``bias`` ``[R, d_model]``. Rows
    without a translator (the last layer, whose output the model decodes itself) are the
    identity."""

    model: str
    model_version: str
    rows: list[str]
    up: torch.Tensor
    down: torch.Tensor
    bias: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.up.shape[-1]

    @property
    def d_model(self) -> int:
        return self.bias.shape[-1]

    def translate(self, h: torch.Tensor, row: int) -> torch.Tensor:
        """``T_row(h)`` for ``h`` ``[..., d_model]`` (client side, differentiable)."""
        return translate(h, self.down[row], self.up[row], self.bias[row])

    def constants(self, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(down, up, bias)`` float32 stacked for ``labels`` (zeros: identity where untrained)."""
        d, r = self.d_model, self.rank
        down = torch.zeros(len(labels), d, r)
        up = torch.zeros(len(labels), d, r)
        bias = torch.zeros(len(labels), d)
        index = {label: i for i, label in enumerate(self.rows)}
        for j, label in enumerate(labels):
            if label in index:
                i = index[label]
                down[j], up[j], bias[j] = self.down[i].float(), self.up[i].float(), self.bias[i].float()
        return down, up, bias

    def engine_translator(self, labels: Sequence[str]):
        """A function applying the translators of ``labels`` to a traced ``[R, P, d]`` value
        (their parameters travel as plan constants)."""
        down, up, bias = self.constants(labels)
        return lambda h: translate(h, down, up, bias)

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        tensors = {}
        for i, label in enumerate(self.rows):
            tensors[f"{label}.up"] = self.up[i].to(dtype)
            tensors[f"{label}.down"] = self.down[i].to(dtype)
            tensors[f"{label}.bias"] = self.bias[i].to(dtype)
        meta = {**self.meta, "kind": KIND, "model": self.model, "model_version": self.model_version,
                "d_model": self.d_model, "rank": self.rank, "rows": list(self.rows)}
        return save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> TunedLens:
        """Read a saved lens; with ``model``, check it was trained on those weights."""
        tensors, meta = load_artifact(path, kind=KIND, model=model)
        rows = list(meta["rows"])
        stack = lambda part: torch.stack([tensors[f"{r}.{part}"].float() for r in rows])  # noqa: E731
        return cls(model=meta["model"], model_version=meta["model_version"], rows=rows,
                   up=stack("up"), down=stack("down"), bias=stack("bias"), meta=meta)


# -- the model's head on the client ---------------------------------------------------------------

class Head:
    """The final norm and unembedding with weights fetched once from the engine.

    ``final_norm`` runs as the model's own norm module (its meta-device copy, called with
    the fetched parameters through :func:`torch.func.functional_call`), so RMSNorm and
    LayerNorm need no separate code."""

    def __init__(self, model: Any) -> None:
        a = model.adapter
        self.norm_module = model.envoy(a.final_norm).module
        norm_names = [n for n, _ in self.norm_module.named_parameters()]
        head_names = [n for n, _ in model.envoy(a.unembed).module.named_parameters()] or ["weight"]
        with model.trace(input_ids=torch.tensor([0])):
            norm_p = {n: model.final_norm.param(n).save() for n in norm_names}
            head_p = {n: _param(model, a.unembed, n).save() for n in head_names}
        # clones: values from an in-process engine may be inference tensors, unusable by autograd
        self.norm_params = {n: p.value.float().clone() for n, p in norm_p.items()}
        self.weight = head_p["weight"].value.float().clone()
        self.bias = head_p["bias"].value.float().clone() if "bias" in head_p else None

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.norm_module, self.norm_params, (h,))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return F.linear(normed, self.weight, self.bias)


def _param(model: Any, path: str, name: str):
    """``module.param(name)``; a tied unembedding is read where the model lists it (the
    embedding), since its deployment knows the shared tensor under that name only."""
    if f"{path}.{name}" not in model.info.params and name == "weight" \
            and getattr(model.config, "tie_word_embeddings", False):
        return model.embed.param("weight")
    return model.envoy(path).param(name)


# -- training ---------------------------------------------------------------------------------------

def collect(model: Any, *, prompts: Sequence[str] = SEED_PROMPTS, new_tokens: int = 48,
            seed: int = 0, batch: int = 8, progress: Progress | bool | None = True,
            ) -> dict[str, torch.Tensor]:
    """Generate text from ``prompts`` (sampling, seeded) and save, per generated token, the
    lens rows' residuals ``hidden`` ``[N, R, d]`` and the normalised last hidden state
    ``final`` ``[N, d]``. ``R`` rows: the input and layers ``0..n_layers-2``.

    ``progress``: a callback ``(done, total, text)`` called after each request (it may raise
    to stop), ``True`` for a console bar, ``False``/``None`` for silence."""
    n_layers = model.adapter.n_layers
    labels = ["input"] + [str(i) for i in range(n_layers - 1)]
    hidden, final = [], []
    chunks = [list(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    report = Steps(progress, 2 * len(chunks), "tuned lens: collecting")
    try:
        for k, chunk in enumerate(chunks):
            sequences = _generated(model, chunk, new_tokens, seed + k)
            report(2 * k + 1)
            saved = []
            with model.trace() as tr:
                for ids in sequences:
                    with tr.invoke(input_ids=ids):
                        rows = [model.layers[0].input] + [model.layers[i].output
                                                          for i in range(n_layers - 1)]
                        saved.append((torch.cat(rows, 0).save(), model.final_norm.output[0].save()))
            for h, f in saved:
                keep = slice(1, None)  # position 0 (BOS / attention sink) is left out
                hidden.append(h.value[:, keep].transpose(0, 1).float())
                final.append(f.value[keep].float())
            report(2 * k + 2)
    finally:
        report.close()
    return {"hidden": torch.cat(hidden), "final": torch.cat(final), "rows": labels}


def _generated(model: Any, prompts: list[str], new_tokens: int, seed: int) -> list[torch.Tensor]:
    with model.generate(prompts, max_new_tokens=new_tokens, do_sample=True, top_p=0.95,
                        temperature=1.0, seed=seed) as gen:
        pass
    return [ids.long() for ids in gen.output_ids]


def train(model: Any, *, data: dict | None = None, rank: int = 32, steps: int = 150,
          batch_tokens: int = 32, lr: float = 2e-3, seed: int = 0,
          progress: Progress | bool | None = True, time_limit: float | None = None,
          **collect_kw: Any) -> TunedLens:
    """Train translators for every row but the last layer on self-generated text.

    Each step draws ``batch_tokens`` tokens and takes one Adam step on
    ``sum_r KL(p_final || q_r)`` (mean over tokens, nats). ``time_limit`` (seconds)
    stops early. ``progress`` as in :func:`collect` (called after each step). Returns a
    :class:`TunedLens` whose ``meta["training"]`` records the settings and the mean KL per
    row before and after, on held-out tokens.
    """
    started = time.perf_counter()
    if data is None:
        data = collect(model, seed=seed, progress=progress, **collect_kw)
    head = Head(model)
    hidden, final, rows = data["hidden"].clone(), data["final"].clone(), data["rows"]
    n, n_rows, d = hidden.shape
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    held = order[: max(1, n // 8)]
    train_idx = order[max(1, n // 8):]
    lens = TunedLens(model=model.name, model_version=model.version, rows=list(rows),
                     up=torch.zeros(n_rows, d, rank),
                     down=torch.randn(n_rows, d, rank, generator=gen) / math.sqrt(d),
                     bias=torch.zeros(n_rows, d))
    params = [lens.up.requires_grad_(), lens.down.requires_grad_(), lens.bias.requires_grad_()]
    opt = torch.optim.Adam(params, lr=lr)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logp = head.logits(final[idx]).log_softmax(-1)  # [B, V]
        h = hidden[idx].transpose(0, 1)  # [R, B, d]
        logq = head.logits(head.norm(translate(h, lens.down, lens.up, lens.bias))).log_softmax(-1)
        return (logp.exp() * (logp - logq)).sum(-1).mean(-1)  # [R]

    def held_kl() -> torch.Tensor:
        with torch.no_grad():
            kl = torch.stack([loss_on(chunk) for chunk in held.split(batch_tokens)]).mean(0)
        return nonnegative(kl)  # reported, rounded: never "-0.0" (the loss itself is not clamped)

    before = held_kl()
    report = Steps(progress, steps, "tuned lens: training")
    done = 0
    try:
        for step in range(steps):
            idx = train_idx[torch.randint(len(train_idx), (batch_tokens,), generator=gen)]
            loss = loss_on(idx)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            done = step + 1
            report(done, f"kl={loss.mean().item():.3f}")
            if time_limit is not None and time.perf_counter() - started > time_limit:
                break
    finally:
        report.close()
    for p in params:
        p.requires_grad_(False)
    after = held_kl()
    lens.meta["training"] = {
        "steps": done, "batch_tokens": batch_tokens, "lr": lr, "rank": rank, "seed": seed,
        "tokens": n, "held_out_tokens": len(held), "seconds": round(time.perf_counter() - started, 1),
        "objective": "KL(final || lens) on self-generated text",
        "held_out_kl_before": [round(x, 4) for x in before.tolist()],
        "held_out_kl_after": [round(x, 4) for x in after.tolist()],
    }
    return lens


# -- finding a lens ---------------------------------------------------------------------------------

def cache_path(model: Any) -> Path:
    from tpmlab.models import tpmlab_home

    digest = model.version.split(":")[-1][:16]
    return Path(tpmlab_home()) / "lenses" / "tuned" / f"{model.name}-{digest}.safetensors"


def shipped_path(model: Any) -> Path:
    return SHIPPED_DIR / f"tuned-{model.name}.safetensors"


def load(model: Any, path: str | Path | None = None, *, train_if_missing: bool = False,
         progress: Progress | bool | None = True, **train_kw: Any) -> TunedLens:
    """The tuned lens for ``model``: from ``path`` if given; else the cache in
    ``$TPMLAB_HOME``; else the one shipped with tpmlab; else, with ``train_if_missing``,
    train one (``train(model, progress=progress, **train_kw)``) and cache it. Every source
    is checked against the model's version. A training stopped by ``progress`` caches
    nothing."""
    if path is not None:
        return TunedLens.load(path, model)
    here = cache_path(model)
    # lenses cached under a version of an older digest scheme are named by that version
    older = sorted(p for p in here.parent.glob(f"{model.name}-*.safetensors") if p != here)
    for candidate in (here, *older, shipped_path(model)):
        if candidate.is_file():
            try:
                return TunedLens.load(candidate, model)
            except ArtifactMismatchError:
                if candidate not in older:  # another version's cached lens: not this one
                    raise
    if not train_if_missing:
        raise FileNotFoundError(
            f"no tuned lens for {model.name} ({model.version}) in {cache_path(model).parent} or "
            f"{SHIPPED_DIR}; call load(model, train_if_missing=True) or train(model)")
    lens = train(model, progress=progress, **train_kw)
    lens.save(cache_path(model))
    return lens


# -- decoding -------------------------------------------------------------------------------------

@dataclass(repr=False)
class TunedLensResult(logit.LogitLensResult):
    """A :class:`LogitLensResult` whose rows were translated before decoding."""

    lens = NAME
    title = TITLE
    view = VIEW


def run(model: Any, prompt: Any, *, tuned_lens: TunedLens | None = None, train_if_missing: bool = True,
        training: dict[str, Any] | None = None, layers: Sequence[int] | None = None,
        include_input: bool = True, top_k: int = 5, keep_logits: bool = False,
        progress: Progress | None = None) -> TunedLensResult | list[TunedLensResult]:
    """Tuned-lens decoding of ``prompt`` (same result fields and options as the logit
    lens). ``tuned_lens`` defaults to :func:`load` ``(model)``; a model without one gets one
    trained and cached first (``train_if_missing``; ``training``: keyword arguments for
    :func:`train`), reporting to ``progress`` (a console bar when there is no callback)."""
    lens = tuned_lens
    if lens is None:
        lens = load(model, train_if_missing=train_if_missing,
                    progress=True if progress is None else progress, **(training or {}))
    check_model({"model": lens.model, "model_version": lens.model_version,
                 "d_model": lens.d_model}, model, where="this tuned lens")
    return logit.decode(model, prompt, TunedLensResult, layers=layers, include_input=include_input,
                        top_k=top_k, keep_logits=keep_logits, translate=lens.engine_translator,
                        progress=progress)


def compare(model: Any, prompts: Sequence[str], lens: TunedLens | None = None) -> dict[str, Any]:
    """Mean KL(final || lens) per row over all positions (but the first) of ``prompts``, for
    the logit lens and the tuned lens: ``{"rows", "logit_kl", "tuned_kl"}`` (nats)."""
    lens = lens or load(model)
    plain = logit.run(model, list(prompts), top_k=1)
    tuned = run(model, list(prompts), tuned_lens=lens, top_k=1)
    mean = lambda results: torch.cat([r.data["kl"][:, 1:] for r in results], 1).mean(1)  # noqa: E731
    return {"rows": plain[0].rows, "logit_kl": mean(plain), "tuned_kl": mean(tuned)}
