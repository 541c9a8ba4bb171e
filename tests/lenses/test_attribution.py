"""Attribution patching: (clean - corrupted) . gradient equals the same formula by plain
PyTorch autograd on the same weights (in process and on Dask stages), tracks an exact
activation-patching sweep, batches prompt pairs, and reaches the registry and the generic
dashboard from its one file."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import tpmlab.lenses

from .conftest import hf_model

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


@pytest.fixture(scope="module")
def atp():
    return tpmlab.lenses.get("attribution")


def _torch_atp(hf, adapter, clean_ids, corrupt_ids, good, bad):
    """AtP by hand: hooks save the clean activations, then the corrupted run's gradients."""
    paths = {}
    for i in range(adapter.n_layers):
        base = adapter.layer_path(i)
        paths[("resid", i)] = base
        paths[("attn", i)] = f"{base}.{adapter.o_proj}"
        paths[("mlp", i)] = f"{base}.{adapter.mlp}"

    def run(ids, keep_grad):
        acts, handles = {}, []
        for key, path in paths.items():
            def hook(m, a, out, key=key):
                if keep_grad:
                    out.retain_grad()
                acts[key] = out
            handles.append(hf.get_submodule(path).register_forward_hook(hook))
        try:
            emb = hf.get_input_embeddings()(ids[None]).detach().requires_grad_(keep_grad)
            with torch.set_grad_enabled(keep_grad):
                logits = functional_call(hf, {}, args=(), kwargs={"inputs_embeds": emb}).logits
            ld = logits[0, -1, good] - logits[0, -1, bad]
            if keep_grad:
                ld.backward()
        finally:
            for h in handles:
                h.remove()
        return acts, ld.detach()

    clean, lc = run(clean_ids, False)
    corrupt, lx = run(corrupt_ids, True)
    return {k: torch.stack([((clean[(k, i)] - corrupt[(k, i)]) * corrupt[(k, i)].grad).sum(-1)[0]
                            for i in range(adapter.n_layers)]) / (lc - lx)
            for k in ("resid", "attn", "mlp")}


def test_matches_autograd_by_hand(engine, lab, atp):
    model = engine.model("tiny-llama")
    res = atp.run(model, CLEAN, CORRUPT, answer=" Paris", wrong=" Rome")
    ids = [torch.tensor(model.tokenizer(p)["input_ids"]) for p in (CLEAN, CORRUPT)]
    good, bad = (model.tokenizer(w)["input_ids"][0] for w in (" Paris", " Rome"))
    want = _torch_atp(hf_model(lab, "tiny-llama"), model.adapter, *ids, good, bad)
    for k in ("resid", "attn", "mlp"):
        torch.testing.assert_close(res.data[k], want[k], rtol=1e-4, atol=1e-5)
    assert res.data["resid"].shape == (model.adapter.n_layers, len(ids[0]))


def test_batched_pairs_equal_single_runs(lab, atp):
    model = lab.model("tiny-gpt2")
    g = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randint(0, 200, (n,), generator=g) for _ in range(2)) for n in (6, 4)]
    both = atp.attribute_pairs(model, pairs, answer=7, wrong=11)
    for (clean, corrupt), got in zip(pairs, both):
        one = atp.run(model, clean, corrupt, answer=7, wrong=11)
        for k in ("resid", "attn", "mlp"):
            torch.testing.assert_close(got.data[k], one.data[k], rtol=1e-4, atol=1e-5)


def test_grid_plot_and_generic_dashboard(lab, atp):
    model = lab.model("tiny-llama")
    res = atp.run(model, CLEAN, CORRUPT, answer=" Paris", wrong=" Rome", layers=[0, 2])
    assert res.row_labels() == ["0", "2"] and len(res.table()) == 2 * len(res.tokens)
    fig = res.plot("mlp")
    assert fig.data[0].type == "heatmap"
    assert "estimated effect" in res.cell(1, 3).tables[0].header[1]
    assert tpmlab.lenses.info("attribution").title == "attribution patching"
    pytest.importorskip("anywidget")
    from tpmlab.widgets import dashboard

    dash = dashboard(model, "attribution", prompt=(CLEAN, CORRUPT), answer=" Paris",
                     wrong=" Rome")
    assert dash.result.lens == "attribution"


@pytest.mark.slow
def test_tracks_exact_activation_patching_on_the_default_model(lab, atp):
    """The correlation of AtP with the exact sweep (one patched run per layer and position),
    over all 30 layers and every position, per kind. AtP is a linear estimate: where
    patching changes the run a lot (the subject's tokens in early layers) it is known to be
    off, so the bar is modest, and the numbers are printed."""
    patching = tpmlab.lenses.get("patching")
    model = lab.model("smollm2-135m")
    res = atp.run(model, CLEAN, CORRUPT, answer=" Paris", wrong=" Rome")
    report = {}
    for kind in ("resid", "attn", "mlp"):
        exact = patching.patch_pairs(model, CLEAN, CORRUPT, answer=" Paris", wrong=" Rome",
                                     kind=kind).data["effect"]
        est = res.data[kind]
        pearson = float(torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1])
        ranks = [t.flatten().argsort().argsort().double() for t in (est, exact)]
        spearman = float(torch.corrcoef(torch.stack(ranks))[0, 1])
        top = divmod(int(exact.abs().argmax()), exact.shape[1])
        report[kind] = {"pearson": round(pearson, 3), "spearman": round(spearman, 3),
                        "largest exact (layer, pos)": top,
                        "exact there": round(float(exact[top]), 3),
                        "AtP there": round(float(est[top]), 3)}
    print("AtP vs exact activation patching:", report)
    assert report["resid"]["pearson"] > 0.5 and report["attn"]["pearson"] > 0.5, report
