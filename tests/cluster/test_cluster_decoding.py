"""On 1, 2 and 3 Dask stages, generation decodes as Hugging Face's ``generate`` does, case by
case (the in-process engine runs the same cases: tests/core/test_decoding.py). A decode
step's message carries only that step's increment (each stage extends its own attention
mask and position ids, the last stage its own copy of the sequences for a repetition
penalty): 3 stages check it on a middle stage too."""

from __future__ import annotations

import pytest

from ..decoding_cases import CASES, check_decoding
from .conftest import deploy

MODEL = "tiny-llama"


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}stages")
def staged(request, lab, ref_lab):
    model = deploy(lab, MODEL, request.param)
    assert model.info.n_stages == request.param
    ref_lab.model(MODEL)
    yield model, ref_lab.backend.host(MODEL).model
    lab.undeploy(MODEL)


@pytest.mark.parametrize("case", list(CASES))
def test_decoding_matches_hf_generate(staged, case):
    model, hf = staged
    check_decoding(model, hf, case)


def test_a_stage_extends_its_own_mask_positions_and_history():
    """What a decode step's message leaves out, a stage makes from its last step: the
    attention mask and position ids by the driver's rule, the sequences (on the last stage)
    from the prompt and each step's new column; a decode step with nothing to extend fails
    with a clear error."""
    import torch

    from tpmlab.cluster.actor import StageActor, _Request
    from tpmlab.cluster.partition import StageSpan
    from tpmlab.errors import ExecutionError
    from tpmlab.runtime.decoding import next_step_inputs

    actor = object.__new__(StageActor)  # only what the two helpers read
    actor.device, actor.span = torch.device("cpu"), StageSpan(1, 2, 2, 3, 0)
    st = _Request(plan=None, runner=None, layout=None, generate=True)
    mask, pos = torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[0, 0, 1], [0, 1, 2]])
    assert [t.tolist() for t in actor._step_inputs(
        st, {"step": 0, "attention_mask": mask, "position_ids": pos})] == [mask.tolist(),
                                                                           pos.tolist()]
    want = (mask, pos)
    for step in (1, 2):
        want = next_step_inputs(*want)
        got = actor._step_inputs(st, {"step": step})
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    assert torch.equal(actor._history(st, {"step": 0, "ids": ids}), ids)
    new = torch.tensor([[3], [4]])
    assert torch.equal(actor._history(st, {"step": 1, "ids": new}), torch.cat([ids, new], -1))
    with pytest.raises(ExecutionError, match="without its attention mask"):
        actor._step_inputs(_Request(plan=None, runner=None, layout=None, generate=True),
                           {"step": 3})
