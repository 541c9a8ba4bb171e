"""A deployment loaded by store version reproduces an earlier result exactly, and says so."""

import torch

import tpmlab
from tpmlab.models import resolve
from tpmlab.store import Store

PROMPT = "The Eiffel Tower is located in the city of"


def test_model_at_tag_reproduces_result(tmp_path, monkeypatch):
    monkeypatch.setenv("TPMLAB_HOME", str(tmp_path))
    base = resolve("tiny-llama").load()
    store = Store(tmp_path / "store")
    digest = store.commit(base.model.state_dict(), config=base.model.config.to_dict(),
                          message="tiny llama")
    store.tag("paper-v1", digest)
    edited = {k: v.clone() for k, v in base.model.state_dict().items()}
    edited["model.layers.1.mlp.down_proj.weight"] += 0.5
    store.commit(edited, config=base.model.config.to_dict(), message="edit", parent=digest)

    lab = tpmlab.connect("local")
    tagged = lab.model("tiny-llama@paper-v1")
    with tagged.trace(PROMPT) as tr:
        out = tagged.output.logits.save()
    assert tr.result.model_version == f"sha256:{digest}" == tagged.version

    plain = lab.model("tiny-llama")
    with plain.trace(PROMPT):
        ref = plain.output.logits.save()
    assert torch.equal(out.value, ref.value)  # the stored version is bit-identical

    by_digest = lab.model(f"tiny-llama@{digest[:12]}")
    with by_digest.trace(PROMPT):
        again = by_digest.output.logits.save()
    assert torch.equal(again.value, out.value)
    lab.close()
