"""kernels/dispatch.py: which implementation of an op runs (the Triton kernel on CUDA tensors and under
the interpreter, else the reference), and the switches that force or forbid the reference."""

import pytest
import torch

from edgellm import kernels
from edgellm.kernels import forbid_reference_on_cuda


def test_dispatch_rule(monkeypatch):
    calls = []
    op = kernels.KernelOp("probe", lambda x: calls.append("ref") or x, triton=lambda x: calls.append("triton") or x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    op(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op(torch.zeros(1))
    with kernels.use_reference():
        op(torch.zeros(1))
    assert calls == ["ref", "triton", "ref"]
    assert kernels.KernelOp("no_kernel_yet", lambda x: "ref")(torch.zeros(1)) == "ref"


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_reference_switch_really_forbids(tiny_models):
    from edgellm.kernels.dispatch import ReferenceOnCudaError, KernelOp

    probe = KernelOp("probe", lambda x: x)  # an op with no Triton kernel
    with forbid_reference_on_cuda(), pytest.raises(ReferenceOnCudaError):
        probe(torch.zeros(1, device="cuda"))
