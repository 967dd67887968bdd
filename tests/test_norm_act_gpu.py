"""fastmed::norm_act on CUDA (the Triton kernels) against the CPU kernel and eager PyTorch, with
gradients (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmed.ops import norm_act as NA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("error:fastmed. the Triton norm_act kernels failed"),  # Triton must run
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["leaky_relu", "relu", "none"])
def test_cuda_equals_cpu_and_eager(dtype, act):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 19, 23, 17, generator=g, dtype=torch.float64) * 2 + 1)
    w, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.5, torch.randn(5, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ins = [t.to("cuda", dtype).requires_grad_(True) for t in (x, w, b)]
    y = NA.norm_act(*ins, 1e-5, act, 0.01)
    y.backward(dy.to("cuda", dtype))
    ref = [t.clone().requires_grad_(True) for t in (x, w, b)]
    yr = NA.norm_act_reference(*ref, 1e-5, act, 0.01)
    yr.backward(dy)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(y.double().cpu(), yr.detach(), rtol=tol, atol=tol)
    for a, r in zip(ins, ref):
        torch.testing.assert_close(a.grad.double().cpu(), r.grad, rtol=tol * 10, atol=tol * 10)
    if dtype == torch.float32:  # the same arithmetic as the C++ kernel
        yc = NA.norm_act(x.float(), w.float(), b.float(), 1e-5, act, 0.01)
        torch.testing.assert_close(y.detach().cpu(), yc, rtol=2e-6, atol=2e-6)
        e = F.instance_norm(ins[0].detach(), weight=ins[1].detach(), bias=ins[2].detach(), eps=1e-5)
        e = e if act == "none" else F.relu(e) if act == "relu" else F.leaky_relu(e, 0.01)
        torch.testing.assert_close(y.detach(), e, rtol=1e-5, atol=1e-5)


def test_cuda_in_place_and_opcheck():
    x = torch.randn(2, 3, 8, 9, 10, device="cuda")
    w, b = torch.rand(3, device="cuda") + 0.5, torch.randn(3, device="cuda")
    ref = NA.norm_act(x, w, b)
    y = x.clone()
    NA.norm_act_(y, w, b)
    assert torch.equal(y, ref)
    torch.library.opcheck(torch.ops.fastmed.norm_act_fwd.default, (x, w, b, 1e-5, 0.01, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channels_last_read_as_is(dtype):
    """Channels-last input stays channels last (no copy) and gives the planar result."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 24, 20, 16, generator=g).to("cuda", dtype)
    w, b = torch.rand(32, generator=g).cuda() + 0.5, torch.randn(32, generator=g).cuda()
    xc = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    yc, yp = NA.norm_act(xc, w, b), NA.norm_act(xp, w, b)
    assert yc.is_contiguous(memory_format=torch.channels_last_3d)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # the statistics add in another order
    torch.testing.assert_close(yc.float(), yp.float(), rtol=tol, atol=tol)
    dy = torch.randn_like(yp)
    yc.backward(dy)
    yp.backward(dy)
    torch.testing.assert_close(xc.grad.float(), xp.grad.float(), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("shape,cl", [((1, 4, 96, 96, 96), False), ((1, 3, 97, 97, 97), False),
                                      ((2, 130, 20, 21, 22), True)])
def test_cuda_big_plane_and_determinism(shape, cl):
    """Planes over many programs (a partial last chunk; channels last with two channel blocks):
    float64 reference, the same bits twice."""
    x = torch.randn(*shape, device="cuda") * 3 + 100  # an offset mean: exact variance needed
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y1, y2 = NA.norm_act(x), NA.norm_act(x)
    assert torch.equal(y1, y2)
    ref = NA.norm_act_reference(x.double().cpu()).cuda()
    torch.testing.assert_close(y1.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
def test_cuda_batch_and_group_norm(dtype, cl):
    """Group norm and batch norm (train with running statistics, eval) by the Triton kernels against
    eager F.group_norm / F.batch_norm, with gradients (PReLU's weight's too)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 8, 12, 10, 9, generator=g) * 2 + 5).to("cuda", dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    pt = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(8, generator=g) + 0.5).to("cuda", pt)
    b = torch.randn(8, generator=g).to("cuda", pt)
    pw = (torch.rand(8, generator=g) - 0.3).to("cuda", pt)
    dy = torch.randn(x.shape, generator=g).to("cuda", dtype)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4e-2}[dtype]

    def run(fn, ins):
        ins = [t.detach().clone().requires_grad_(True) for t in ins]
        y = fn(*ins)
        y.backward(dy.to(y.dtype))
        return [y.detach().double()] + [t.grad.double() for t in ins]

    xs = (x.to(pt), w, b, pw)
    for name, ours, eager in (
        ("group", lambda x_, w_, b_, p_: NA.group_norm_act(x_, 4, w_, b_, 1e-5, "prelu", prelu=p_),
         lambda x_, w_, b_, p_: F.prelu(F.group_norm(x_, 4, w_, b_, 1e-5), p_)),
        ("batch", lambda x_, w_, b_, p_: NA.batch_norm_act(x_, None, None, w_, b_, True, 0.1, 1e-5, "prelu",
                                                          prelu=p_),
         lambda x_, w_, b_, p_: F.prelu(F.batch_norm(x_, None, None, w_, b_, True, 0.1, 1e-5), p_))):
        got = run(ours, (x, w, b, pw))
        ref = run(eager, xs)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=tol * 10, atol=tol * 10, msg=name)
    rm, rv = torch.zeros(8, device="cuda", dtype=pt), torch.ones(8, device="cuda", dtype=pt)
    rm2, rv2 = rm.clone(), rv.clone()
    y = NA.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu")
    ye = F.relu(F.batch_norm(x.to(pt), rm2, rv2, w, b, True, 0.1, 1e-5))
    torch.testing.assert_close(y.double(), ye.double(), rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(rm, rm2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rv2, rtol=1e-5, atol=1e-6)
    y = NA.batch_norm_act(x, rm, rv, w, b, False, 0.1, 1e-5, "leaky_relu", 0.01)
    ye = F.leaky_relu(F.batch_norm(x.to(pt), rm, rv, w, b, False, 0.1, 1e-5), 0.01)
    torch.testing.assert_close(y.double(), ye.double(), rtol=tol * 10, atol=tol * 10)
