"""The attribution lens gives nnsight's own attribution patching, number for number.

nnsight's side is written the way its attribution-patching tutorial does it: a clean and a
corrupted invoke in one trace, every residual / attention / MLP output saved, the metric's
backward opened as ``with metric.backward():`` inside the corrupted invoke, each output's
``.grad`` saved there (in reverse order, as the backward reaches them), then
``(clean - corrupted) * grad`` summed over ``d_model``. It runs on a separate copy of the
same weights (made trainable, as a freshly loaded model is, so that its forward records a
graph). Tolerance: ``rtol=1e-5, atol=1e-6`` on the normalised scores and the logit
differences (in process on the CPU the two agree bit for bit)."""

from __future__ import annotations

import pytest
import torch

import tpmlab.lenses
from tests.conftest import TINY_MODELS

from .conftest import lab_for

nnsight = pytest.importorskip("nnsight")

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"
KINDS = ("resid", "attn", "mlp")
TOL = {"rtol": 1e-5, "atol": 1e-6}
ORDER = ("attn", "mlp", "resid")  # the order a layer makes them in (nnsight reads in order)


def _get(env, path: str):
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def nnsight_atp(nn_model, adapter, clean: str, corrupt: str, good: int, bad: int) -> dict:
    """Attribution patching in nnsight 0.8, as its tutorial writes it."""
    n = adapter.n_layers
    modules = []
    for i in range(n):
        base = adapter.layer_path(i)
        parts = {"resid": base, "attn": f"{base}.{adapter.o_proj}", "mlp": f"{base}.{adapter.mlp}"}
        modules += [_get(nn_model, parts[k]) for k in ORDER]
    clean_out, corrupt_out, corrupt_grads = [], [], []
    with nn_model.trace() as tracer:
        with tracer.invoke(clean):
            for m in modules:
                clean_out.append(m.output.save())
            logits = nn_model.output.logits
            ld_clean = (logits[0, -1, good] - logits[0, -1, bad]).save()
        with tracer.invoke(corrupt):
            acts = []
            for m in modules:
                acts.append(m.output)
                corrupt_out.append(acts[-1].save())
            logits = nn_model.output.logits
            ld_corrupt = (logits[0, -1, good] - logits[0, -1, bad]).save()
            with ld_corrupt.backward():
                for a in reversed(acts):
                    corrupt_grads.append(a.grad.save())
    corrupt_grads.reverse()
    lc, lx = ld_clean.detach(), ld_corrupt.detach()
    raw = [((c - x) * g).sum(-1)[0].detach()
           for c, x, g in zip(clean_out, corrupt_out, corrupt_grads)]
    out = {"ld_clean": lc, "ld_corrupt": lx}
    for j, kind in enumerate(ORDER):
        out[kind] = torch.stack(raw[j::len(ORDER)]) / (lc - lx)
    return out


def _nnsight_model(model):
    import warnings

    hf = model.source.load().model.requires_grad_(True)  # a separate copy of the same weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnsight.LanguageModel(hf, tokenizer=model.tokenizer)


def _check(model, reference_model) -> None:
    good, bad = (model.tokenizer(w)["input_ids"][0] for w in (" Paris", " Rome"))
    want = nnsight_atp(_nnsight_model(reference_model), model.adapter, CLEAN, CORRUPT, good, bad)
    got = tpmlab.lenses.get("attribution").run(model, CLEAN, CORRUPT, answer=" Paris",
                                               wrong=" Rome")
    assert float(want["resid"].abs().max()) > 0.01  # a real signal, not zeros against zeros
    for k in (*KINDS, "ld_clean", "ld_corrupt"):
        torch.testing.assert_close(got.data[k], want[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", TINY_MODELS + [pytest.param("smollm2-135m",
                                                             marks=pytest.mark.slow)])
def test_in_process_equals_nnsight(name):
    model = lab_for("local").model(name)
    _check(model, model)


def test_on_dask_stages_equals_nnsight():
    _check(lab_for("dask").model("tiny-llama"), lab_for("local").model("tiny-llama"))
