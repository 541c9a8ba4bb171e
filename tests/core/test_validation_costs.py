"""Validation costs nothing a plan can inflate: every tensor it makes is on the meta
device (no memory, no compute), and every value a plan computes is held to
``Limits.max_intermediate_bytes`` before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tpmlab.errors import LimitError
from tpmlab.ir.validate import Limits, validate

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model("tiny-llama")


def record(model, body):
    """The plan ``body(model, tr)`` records, without running it (``tr.record`` adds nodes
    the tracing API would not make, such as factory ops with no traced argument)."""
    tr = model.trace(PROMPT)
    with tr.recording():
        body(model, tr)
    return tr.plan()


def check(model, plan, limits=Limits()):
    host = model.lab.backend.host(model.name)
    return validate(plan, host.info, limits=limits, meta_module=host._meta.get)


class RealTensors(TorchDispatchMode):
    """Counts the bytes of every tensor an op makes off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.made.append((str(func), t.numel() * t.element_size()))
        return out

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.made)


def constants_galore(m, tr):
    h = m.layers[0].output
    tr.record("zeros", [2**28])  # 1 GiB of float32, never saved
    tr.record("ones", [2**14, 2**14])  # 1 GiB
    tr.record("full", [(2**27,), 3.0])
    tr.record("arange", [2**26])
    h.new_zeros(2**28)  # (a plan cannot name a device)
    torch.zeros_like(h)
    (tr.record("zeros", [2**26]) + tr.record("ones", [2**26])).sum()
    tr.record("tensor", [[1.0, 2.0, 3.0]]) * 2
    h[:, -1].save()


def test_validation_makes_no_real_tensors(model):
    plan = record(model, constants_galore)
    with RealTensors() as seen:
        check(model, plan)
    # only the token-id checks touch real (tiny) tensors: the prompt's ids
    assert seen.nbytes < 4096, seen.made


def test_validation_of_a_large_constant_plan_keeps_the_memory_flat(model, tmp_path):
    """Measured in a fresh process: peak resident memory grows by far less than the
    gigabytes the plan's ops would make (before, validation made them for real)."""
    from tpmlab.ir.codec import encode_plan

    blob = tmp_path / "plan.bin"
    blob.write_bytes(encode_plan(record(model, constants_galore)))
    code = f"""
import json, resource, torch, tpmlab
from tpmlab.runtime.backend import LocalBackend
from tpmlab.ir.codec import decode_plan
from tpmlab.ir.validate import validate
lab = tpmlab.Lab(LocalBackend(device="cpu", dtype=torch.float32))
m = lab.model("tiny-llama")
host = lab.backend.host("tiny-llama")
with m.trace("warm up") as tr:  # the first meta ops load their kernels: not the plan's cost
    (m.layers[0].output.new_zeros(3) + m.layers[0].output.sum()).save()
plan = decode_plan(open({str(blob)!r}, "rb").read())
validate(tr.plan(), host.info, meta_module=host._meta.get)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
validate(plan, host.info, meta_module=host._meta.get)
print(json.dumps({{"grew": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew"]
    assert grew < 64 * 2**20, f"validation grew the peak RSS by {grew:,} bytes"


def test_intermediate_limit_names_the_node_and_line(model):
    plan = record(model, lambda m, tr: tr.record("ones", [2**17, 2**17]).sum().save())  # 2**34
    with RealTensors() as seen, pytest.raises(LimitError, match=r"68,719,476,736 bytes.*"
                                                                r"limit of 17,179,869,184") as err:
        check(model, plan)
    assert seen.nbytes < 4096
    assert err.value.node == 0 and err.value.op == "ones"
    assert "test_validation_costs.py" in err.value.line


def test_intermediate_limit_counts_what_is_made_not_what_is_viewed(model):
    small = Limits(max_intermediate_bytes=200_000)  # logits of the prompt: 1,966,080 bytes

    def views(m, tr):
        logits = m.output.logits
        logits[:, :].save()  # a view of the model's own value: nothing new
        logits.expand(4, 10, 49152)[:, -1].argmax(-1).save()  # a view, then a small result
        logits[0, -1].softmax(-1).save()  # 196,608 bytes: under the limit

    check(model, record(model, views), small)
    with pytest.raises(LimitError, match=r"makes a value of 1,966,080 bytes") as err:
        check(model, record(model, lambda m, tr: m.output.logits.softmax(-1).max().save()), small)
    assert err.value.op == "softmax"
    with pytest.raises(LimitError, match=r"contiguous makes a value of 7,864,320 bytes"):
        check(model, record(model, lambda m, tr: m.output.logits.expand(4, 10, 49152)
                            .contiguous().save()), small)
    with pytest.raises(LimitError, match="bytes for any one value"):  # modules applied too
        check(model, record(model, lambda m, tr: m.lm_head(m.model.norm.output).save()), small)
