"""nnsight's tutorial operations on 2 Dask stages give nnsight 0.8's numbers on the same
weights (the ports of tests/nnsight_ports.py, also run in process in
tests/core/test_nnsight_parity.py)."""

from __future__ import annotations

import pytest
import torch

from tests.nnsight_ports import PORTS, nn_model_for

from .conftest import deploy

pytest.importorskip("nnsight")


@pytest.fixture(scope="module", params=["tiny-llama", pytest.param("smollm2-135m",
                                                                   marks=pytest.mark.slow)])
def pair(request, lab):
    model = deploy(lab, request.param, 2)
    assert model.info.n_stages == 2
    yield model, nn_model_for(model)
    lab.undeploy(request.param)


@pytest.mark.parametrize("port", PORTS, ids=lambda f: f.__name__)
def test_port_on_two_stages(pair, port):
    model, nn_model = pair
    ours, theirs = port(model, nn_model)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
