"""fastmed::norm_act_fwd / norm_act_bwd (instance norm + activation) against PyTorch's eager layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmed.ops import norm_act as NA


def eager(x, w, b, eps, act, slope):
    z = F.instance_norm(x, weight=w, bias=b, eps=eps)
    return z if act == "none" else F.relu(z) if act == "relu" else F.leaky_relu(z, slope)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9, 5), (1, 4, 37, 45), (3, 1, 2, 3, 4), (1, 2, 1, 1, 2)])
@pytest.mark.parametrize("act", ["leaky_relu", "relu", "none"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_equal_eager(shape, act, affine, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    ins = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    ref_ins = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = NA.norm_act(ins[0], ins[1], ins[2], 1e-5, act, 0.01)
    ref = eager(ref_ins[0], ref_ins[1], ref_ins[2], 1e-5, act, 0.01)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, ref, **tol)
    y.backward(dy)
    ref.backward(dy)
    for a, r in zip(ins, ref_ins):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


def test_gradcheck_float64():
    x = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: NA.norm_act(x, w, b, 1e-5, "leaky_relu", 0.2), (x, w, b))


@pytest.mark.parametrize("shape, fmt", [((2, 4, 6, 7, 8), torch.channels_last_3d), ((2, 5, 33, 40, 21), torch.channels_last_3d),
                                        ((3, 6, 37, 45), torch.channels_last)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["leaky_relu", "relu"])
def test_channels_last_kernel(shape, fmt, dtype, act):
    """Channels-last input runs the (N, S, C) kernel and stays channels last; values and gradients
    equal the planar kernel's up to the order of the float64 sums."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w, b = (torch.rand(shape[1], generator=g) + 0.5).to(dtype), torch.randn(shape[1], generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    res = []
    for xx in (x, x.to(memory_format=fmt)):
        ins = [t.clone().requires_grad_(True) for t in (xx, w, b)]
        y = NA.norm_act(*ins, 1e-5, act, 0.01)
        y.backward(dy)
        res.append((y, *[t.grad for t in ins]))
    assert res[1][0].is_contiguous(memory_format=fmt) and not res[1][0].is_contiguous()
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for a, c in zip(res[0], res[1]):
        torch.testing.assert_close(c, a, rtol=tol, atol=tol)
    # deterministic for any thread count
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = NA.norm_act(x.to(memory_format=fmt), w, b, 1e-5, act, 0.01)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, res[1][0].detach())
    torch.library.opcheck(torch.ops.fastmed.norm_act_fwd.default, (x.to(memory_format=fmt), w, b, 1e-5, 0.01, 2))
    # in place
    xc = x.to(memory_format=fmt).clone()
    NA.norm_act_(xc, w, b, 1e-5, act, 0.01)
    assert torch.equal(xc, res[1][0].detach())


def test_channels_last_and_strided_input():
    big = torch.randn(2, 4, 6, 7, 16)
    torch.testing.assert_close(NA.norm_act(big[..., ::2]), NA.norm_act(big[..., ::2].contiguous()), rtol=0, atol=0)


def test_deterministic_and_float64_reference():
    x = torch.randn(2, 3, 17, 9, 11)
    a, b = NA.norm_act(x), NA.norm_act(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.double(), NA.norm_act_reference(x.double()), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="weight"):
        NA.norm_act(x, torch.ones(2))
    with pytest.raises(ValueError, match="act"):
        NA.norm_act(x, act="gelu")
    with pytest.raises(TypeError, match="x"):
        NA.norm_act(x.half())
    with pytest.raises(ValueError, match="x"):
        NA.norm_act(torch.randn(3))
    with pytest.raises(ValueError, match="spatial element"):
        NA.norm_act(torch.randn(1, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="eps"):
        NA.norm_act(x, eps=0.0)
    with pytest.raises(ValueError, match="bias"):  # another device (Triton would be switched off on a GPU)
        NA.norm_act(x, torch.ones(3), torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="weight"):
        NA.norm_act(x, torch.ones(3, dtype=torch.long))


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    torch.library.opcheck(NA.norm_act_fwd, (x, w, b, 1e-5, 0.01, 2))
    f = torch.compile(lambda x: NA.norm_act(x * 2, w, b) + 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), NA.norm_act(x * 2, w, b) + 1)


@pytest.mark.parametrize("act", ["leaky_relu", "relu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_equals_out_of_place(act, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn((2, 3, 6, 7, 5), generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    w, b = torch.rand(3, dtype=dtype) + 0.5, torch.randn(3, dtype=dtype)
    ref = NA.norm_act(x, w, b, 1e-5, act, 0.02)
    y = x.clone()
    out = NA.norm_act_(y, w, b, 1e-5, act, 0.02)
    assert out is y and torch.equal(y, ref)
    torch.library.opcheck(torch.ops.fastmed.norm_act_.default, (x.clone(), w, b, 1e-5, 0.02, 1))
    with pytest.raises(ValueError, match="contiguous"):
        NA.norm_act_(x.transpose(2, 3), w, b)
    with pytest.raises(ValueError, match="weight"):
        NA.norm_act_(x.clone(), torch.ones(4), b)
    with pytest.raises(TypeError, match="x must be float32"):
        NA.norm_act_(x.half())


def test_triton_failure_falls_back_with_one_warning(monkeypatch):
    """A Triton kernel that fails to compile / launch on a GPU switches Triton off for the process,
    with a warning, and the op computes in plain PyTorch; FASTMED_TRITON=0 switches it off."""
    from fastmed.ops import norm_act as NA

    monkeypatch.setattr(NA, "_TRITON", [object()])

    def boom(*args):
        raise RuntimeError("PTX not supported")

    with pytest.warns(RuntimeWarning, match="plain PyTorch"):
        assert NA._run_triton(boom, 1, 2) is False
    assert NA._TRITON == [None] and NA._triton() is None
    assert NA._run_triton(lambda *a: None, 1) is True
    monkeypatch.setattr(NA, "_TRITON", [])
    monkeypatch.setenv("FASTMED_TRITON", "0")
    assert NA._triton() is None


# ---- PReLU (MONAI UNet's activation): one weight for all channels, or one per channel -------------


@pytest.mark.parametrize("npw", [1, 4])
@pytest.mark.parametrize("fmt", [None, torch.channels_last_3d])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prelu_equals_eager_with_gradients(npw, fmt, dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn((2, 4, 6, 7, 5), generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = (torch.rand(4, generator=g) + 0.5).to(dtype), torch.randn(4, generator=g).to(dtype)
    pw = (torch.rand(npw, generator=g) - 0.3).to(dtype)  # negative slopes too
    dy = torch.randn(x.shape, generator=g).to(dtype)
    ins = [t.clone().requires_grad_(True) for t in (x, w, b, pw)]
    ref_ins = [t.clone().requires_grad_(True) for t in (x, w, b, pw)]
    y = NA.norm_act(ins[0], ins[1], ins[2], 1e-5, "prelu", prelu=ins[3])
    ref = F.prelu(F.instance_norm(ref_ins[0], weight=ref_ins[1], bias=ref_ins[2], eps=1e-5), ref_ins[3])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, ref, **tol)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)
    y.backward(dy)
    ref.backward(dy)
    for name, a, r in zip(("x", "weight", "bias", "prelu"), ins, ref_ins):
        assert a.grad.shape == r.grad.shape, name
        torch.testing.assert_close(a.grad, r.grad, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10, msg=name)
    # in place, and the float64 reference
    xc = x.clone()
    NA.norm_act_(xc, w, b, 1e-5, "prelu", prelu=pw)
    assert torch.equal(xc, y.detach())
    torch.testing.assert_close(NA.norm_act_reference(x.double(), w.double(), b.double(), 1e-5, "prelu",
                                                     prelu=pw.double()), ref.detach().double(), **tol)


def test_prelu_gradcheck_opcheck_compile():
    x = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for pw in (torch.tensor([0.25], dtype=torch.float64, requires_grad=True),
               torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64, requires_grad=True)):
        assert torch.autograd.gradcheck(lambda x, w, b, p: NA.norm_act(x, w, b, 1e-5, "prelu", prelu=p), (x, w, b, pw))
        torch.library.opcheck(NA.norm_act_fwd, (x, w, b, 1e-5, 0.01, 3, pw))
    xf, pf = x.detach().float(), torch.tensor([0.25])
    f = torch.compile(lambda x: NA.norm_act(x * 2, act="prelu", prelu=pf) + 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(f(xf), NA.norm_act(xf * 2, act="prelu", prelu=pf) + 1)


@pytest.mark.parametrize("kind", ["float64", "strided"])
def test_prelu_weight_of_another_dtype_or_layout(kind):
    """Found by review: a PReLU weight the kernels take converted (another dtype, a strided view) was
    a temporary freed before the backward / in-place kernels ran (read after free: wrong values)."""
    torch.manual_seed(11)
    x = torch.randn(2, 4, 5, 6)
    w, b, g = torch.rand(4) + 0.5, torch.randn(4), torch.randn(2, 4, 5, 6)
    base = torch.rand(8)
    p = base[:4].double() if kind == "float64" else base[::2]

    def grads(fn):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        fn(xx, ww, bb).backward(g)
        return xx.grad, ww.grad, bb.grad

    for fused, eager in (
            (lambda xx, ww, bb: NA.norm_act(xx, ww, bb, 1e-5, "prelu", 0.0, p),
             lambda xx, ww, bb: F.prelu(F.instance_norm(xx, weight=ww, bias=bb, eps=1e-5), p.float())),
            (lambda xx, ww, bb: NA.group_norm_act(xx, 2, ww, bb, 1e-5, "prelu", 0.0, p),
             lambda xx, ww, bb: F.prelu(F.group_norm(xx, 2, ww, bb, 1e-5), p.float()))):
        for u, v in zip(grads(fused), grads(eager)):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    y = NA.norm_act_(x.clone(), w, b, 1e-5, "prelu", 0.0, p)
    torch.testing.assert_close(y, F.prelu(F.instance_norm(x, weight=w, bias=b, eps=1e-5), p.float()),
                               rtol=1e-5, atol=1e-5)


def test_double_backward():
    """backward(create_graph=True) (a gradient penalty): the backward is then recomputed with PyTorch
    ops, so that it is itself differentiable (found by review: a raw torch.library error)."""
    torch.manual_seed(12)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for f in (lambda x, w, b: NA.norm_act(x, w, b, 1e-5, "leaky_relu", 0.1),
              lambda x, w, b: NA.norm_act(x, w, b, 1e-5, "prelu", 0.0, p),
              lambda x, w, b: NA.group_norm_act(x, 2, w, b, 1e-5, "relu"),
              lambda x, w, b: NA.batch_norm_act(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, "leaky_relu", 0.1),
              lambda x, w, b: NA.batch_norm_act(x, rm + 0.1, rv * 2, w, b, False, 0.1, 1e-5, "leaky_relu", 0.1)):
        assert torch.autograd.gradgradcheck(f, (x, w, b))
    # a gradient penalty through ConvNormAct equals the eager layers'
    from fastmed.nn import ConvNormAct

    c = ConvNormAct(2, 4, 3, spatial_dims=3).double()
    eager = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.InstanceNorm3d(4),
                                torch.nn.LeakyReLU(0.01)).double()
    eager[0].load_state_dict(c.conv.state_dict())
    xs = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64)
    got = []
    for net in (c, eager):
        xx = xs.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xx).pow(2).sum(), xx, create_graph=True)
        g.pow(2).sum().backward()
        got.append((xx.grad, net[0].weight.grad if net is eager else c.conv.weight.grad))
    for u, v in zip(*got):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)


def test_unclear_arguments_name_themselves():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="momentum"):
        NA.batch_norm_act(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), training=True, momentum=None)
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(NA.group_norm_act(x, np.int64(2)), NA.group_norm_act(x, 2))


def test_inplace_variants_refuse_a_recorded_tensor():
    a = torch.randn(2, 4, 6, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        NA.norm_act_(a * 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        NA.batch_norm_act(a * 1.0, torch.zeros(4), torch.ones(4), inplace=True)
    with torch.no_grad():  # no graph: fine
        y = NA.norm_act_(a * 1.0)
    torch.testing.assert_close(y, F.leaky_relu(F.instance_norm(a.detach(), eps=1e-5), 0.01), rtol=1e-5, atol=1e-5)


def test_prelu_bad_inputs_name_the_argument():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="prelu"):
        NA.norm_act(x, act="prelu")  # no weights
    with pytest.raises(ValueError, match="prelu"):
        NA.norm_act(x, act="prelu", prelu=torch.ones(2))
    with pytest.raises(ValueError, match="prelu"):
        NA.norm_act(x, act="prelu", prelu=torch.ones(1, 3))
    with pytest.raises(ValueError, match="prelu"):
        NA.norm_act(x, act="leaky_relu", prelu=torch.ones(3))
    with pytest.raises(ValueError, match="prelu"):
        NA.norm_act(x, act="prelu", prelu=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="prelu"):
        NA.norm_act_(x, act="prelu", prelu=torch.ones(5))
    from fastmed.ops.conv_norm_act import conv_norm_act
    with pytest.raises(ValueError, match="prelu"):
        conv_norm_act(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), act="prelu")


# ---- group norm and batch norm through the same kernels (statistics shared by several planes) -----


def _bn_gn_case(seed, shape, fmt, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    w, b = (torch.rand(C, generator=g) + 0.5).to(dtype), torch.randn(C, generator=g).to(dtype)
    pw = (torch.rand(C, generator=g) - 0.3).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, pw, dy


def _act_eager(z, act, pw):
    return {"leaky_relu": lambda: F.leaky_relu(z, 0.02), "relu": lambda: F.relu(z), "none": lambda: z,
            "prelu": lambda: F.prelu(z, pw)}[act]()


def _compare(fn, ref, ins, dy, dtype):
    a = [t.clone().requires_grad_(True) for t in ins]
    r = [t.clone().requires_grad_(True) for t in ins]
    y, yr = fn(*a), ref(*r)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, yr, **tol)
    ga = torch.autograd.grad(y, a, dy, allow_unused=True)
    gr = torch.autograd.grad(yr, r, dy, allow_unused=True)
    for k, (u, v) in enumerate(zip(ga, gr)):
        if v is None:
            continue
        torch.testing.assert_close(u, v, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * max(1.0, v.abs().max().item()),
                                   msg=f"gradient {k}")
    return y


@pytest.mark.parametrize("shape, groups", [((2, 6, 5, 7, 4), 3), ((3, 4, 9, 8), 1), ((1, 8, 3, 4, 5), 8)])
@pytest.mark.parametrize("fmt", [None, "cl"])
@pytest.mark.parametrize("act", ["leaky_relu", "prelu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_act_equals_eager(shape, groups, fmt, act, dtype):
    f = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if fmt else None
    x, w, b, pw, dy = _bn_gn_case(11, shape, f, dtype)
    y = _compare(lambda x, w, b, pw: NA.group_norm_act(x, groups, w, b, 1e-5, act, 0.02, pw if act == "prelu" else None),
                 lambda x, w, b, pw: _act_eager(F.group_norm(x, groups, w, b, 1e-5), act, pw), (x, w, b, pw), dy, dtype)
    if f is not None:
        assert y.is_contiguous(memory_format=f)
    ref = NA._reference_fwd(x, w, b, 1e-5, 0.02, NA.ACTS[act], pw, 1, groups)[0]
    torch.testing.assert_close(y.detach(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 6, 5, 7, 4), (3, 4, 9, 8), (1, 3, 2, 3, 4)])
@pytest.mark.parametrize("fmt", [None, "cl"])
@pytest.mark.parametrize("act", ["relu", "prelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_act_equals_eager_train_and_eval(shape, fmt, act, dtype):
    f = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if fmt else None
    x, w, b, pw, dy = _bn_gn_case(12, shape, f, dtype)
    C = shape[1]
    r0 = (torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5)
    stats = {k: (r0[0].clone(), r0[1].clone()) for k in ("fm", "ref")}
    for training, momentum in ((True, 0.1), (True, 0.3), (False, 0.1)):
        (rm, rv), (rm2, rv2) = stats["fm"], stats["ref"]
        _compare(lambda x, w, b, pw: NA.batch_norm_act(x, rm, rv, w, b, training, momentum, 1e-5, act, 0.02,
                                                       pw if act == "prelu" else None),
                 lambda x, w, b, pw: _act_eager(F.batch_norm(x, rm2, rv2, w, b, training, momentum, 1e-5), act, pw),
                 (x, w, b, pw), dy, dtype)
        # running statistics updated as F.batch_norm updates them (the comparison ran each once)
        torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-6)
    # in place (inference), and without running statistics (batch statistics)
    y = NA.batch_norm_act(x, rm, rv, w, b, False, act="relu")
    xc = x.clone()
    assert NA.batch_norm_act(xc, rm, rv, w, b, False, act="relu", inplace=True) is xc and torch.equal(xc, y)
    torch.testing.assert_close(NA.batch_norm_act(x, None, None, w, b, True, act="none"),
                               F.batch_norm(x, None, None, w, b, True), rtol=2e-5, atol=2e-5)


def test_group_and_batch_norm_gradcheck_opcheck_and_reference_backward():
    x = torch.randn(2, 4, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: NA.group_norm_act(x, 2, w, b, act="relu"), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: NA.batch_norm_act(x, None, None, w, b, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: NA.batch_norm_act(x, rm, rv, w, b, False), (x, w, b))
    for kind, groups, r in ((1, 2, (None, None)), (2, 1, (None, None)), (3, 1, (rm, rv))):
        torch.library.opcheck(NA.norm_act_fwd, (x, w, b, 1e-5, 0.01, 2, None, kind, groups, *r))
        # the plain-PyTorch backward (other devices) equals the kernel's
        y, mean, rstd = NA.norm_act_fwd(x.detach(), w, b, 1e-5, 0.01, 2, None, kind, groups, *r)
        dy = torch.randn_like(y)
        k = NA.norm_act_bwd(dy, x.detach(), w, b, mean, rstd, 0.01, 2, None, kind, groups)
        ref = NA._reference_bwd(dy, x.detach(), w, b, mean, rstd, 0.01, 2, None, kind, groups)
        for u, v in zip(k, ref):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    xc = x.detach().clone()
    torch.library.opcheck(torch.ops.fastmed.norm_act_.default, (xc, w.detach(), b.detach(), 1e-5, 0.01, 2, None, 3, 1,
                                                               rm, rv, None, None))


def test_group_and_batch_norm_bad_inputs_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="num_groups"):
        NA.group_norm_act(x, 3)
    with pytest.raises(ValueError, match="num_groups"):
        NA.group_norm_act(x, 0)
    with pytest.raises(ValueError, match="running_mean"):
        NA.batch_norm_act(x, None, None, training=False)
    with pytest.raises(ValueError, match="running_var"):
        NA.batch_norm_act(x, torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="x: batch norm in training needs more than 1"):
        NA.batch_norm_act(torch.randn(1, 4, 1, 1), None, None, training=True)
    with pytest.raises(ValueError, match="weight"):
        NA.batch_norm_act(x, torch.zeros(4), torch.ones(4), torch.ones(3))


@pytest.mark.parametrize("kind", ["instance", "group", "batch"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("cl", [False, True])
def test_nan_propagates_through_the_activation_as_in_eager(kind, act, cl):
    """A NaN in the norm's input makes its plane's (group's, channel's) statistics NaN: eager's
    ReLU then returns NaN there, and so does the fused kernel (its ReLU mapped NaN to 0, hiding a
    diverged network). Planes without the NaN are unchanged."""
    x = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    x[0, 1, 1, 2, 0] = float("nan")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    f = F.relu if act == "relu" else (lambda t: F.leaky_relu(t, 0.01))
    if kind == "instance":
        got = NA.norm_act(x, act=act, slope=0.01)
        want = f(F.instance_norm(x))
    elif kind == "group":
        got = NA.group_norm_act(x, 3, act=act, slope=0.01)
        want = f(F.group_norm(x, 3))
    else:
        got = NA.batch_norm_act(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), training=True,
                                act=act, slope=0.01)
        want = f(F.batch_norm(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), training=True))
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    torch.testing.assert_close(got[~want.isnan()], want[~want.isnan()], rtol=1e-12, atol=1e-12)
    # the backward: eager's ReLU passes the gradient at a NaN output, LeakyReLU applies its slope
    w = torch.rand(3, dtype=x.dtype, requires_grad=True)
    b = torch.rand(3, dtype=x.dtype, requires_grad=True)
    if kind == "instance":
        gw = torch.autograd.grad(NA.norm_act(x, w, b, act=act, slope=0.01).sum(), [b])[0]
        ew = torch.autograd.grad(f(F.instance_norm(x, weight=w, bias=b)).sum(), [b])[0]
        torch.testing.assert_close(gw, ew, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("shape", [(4, 6, 1, 1), (3, 6, 1), (1, 6, 1, 1)])
def test_batch_and_group_norm_of_one_voxel_planes(shape):
    """A (N, C, 1, 1) bottleneck or classifier head: batch norm (over the batch) and group norm
    (over a group's channels) are defined there, as in eager PyTorch; only instance norm refuses."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    if shape[0] == 1:  # one value per group in all: F.group_norm raises too
        with pytest.raises(ValueError, match="x: group norm needs more than 1 value per group"):
            NA.group_norm_act(x, 6)
        with pytest.raises(ValueError):
            F.group_norm(x, 6)
    groups = (1, 2, 3) if shape[0] == 1 else (1, 2, 3, 6)  # with more items F.group_norm takes 6: the bias
    for G in groups:
        a, b = NA.group_norm_act(x, G, act="leaky_relu"), F.leaky_relu(F.group_norm(x, G), 0.01)
        (ga,), (gb,) = torch.autograd.grad((a * a).sum(), x), torch.autograd.grad((b * b).sum(), x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    for train in (True, False):
        if train and shape[0] == 1:
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                NA.batch_norm_act(x, rm.clone(), rv.clone(), training=True, act="relu")
            continue
        r1, v1, r2, v2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        a = NA.batch_norm_act(x, r1, v1, training=train, act="relu")
        b = F.relu(F.batch_norm(x, r2, v2, training=train))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="instance norm needs more than 1"):
        NA.norm_act(x)


def _norm64(kind, x, w, b, rm, rv, train):
    if kind == "instance":
        return F.instance_norm(x, weight=w, bias=b)
    if kind == "group":
        return F.group_norm(x, 2, w, b)
    return F.batch_norm(x, rm, rv, w, b, training=train)


@pytest.mark.parametrize("kind", ["instance", "group", "batch", "batch_eval"])
@pytest.mark.parametrize("cl", [False, True])
def test_planes_far_from_zero_keep_float32_precision(kind, cl):
    """A plane (group, channel) whose mean is far from 0 against its spread: x * a + (b - mean * a),
    PyTorch CPU's arithmetic, loses |mean| * rstd * 2^-24 there (eager float32: 7e-4 off at mean 100,
    spread 0.01; 0.003 on a plane constant at 1000). The fused kernels subtract the mean first on
    such planes: forward and gradients as float64's on the same float32 input, to float32 rounding.
    A constant plane comes out of instance norm as the bias (to the slope's rounding)."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 6, 5, 7)
    x = 100 + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, 1] = 1000 + 1e-4 * torch.randn(shape[0], *shape[2:], generator=g, dtype=torch.float64)
    if kind != "batch":
        x[1, 3] = 1000.0  # a constant plane (a constant channel would make batch norm's eps the spread)
    x = x.float()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.rand(4, generator=g) + 0.5
    b = torch.randn(4, generator=g)
    train = kind != "batch_eval"
    # eval: running statistics of the data's own scale (a mean of 100.000123, a variance of 1e-4)
    rm = x.double().mean((0, 2, 3, 4)).float() if not train else torch.zeros(4)
    rv = x.double().var((0, 2, 3, 4)).float().clamp_min(1e-8) if not train else torch.ones(4)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last_3d if cl else
                                                     torch.contiguous_format)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    if kind == "instance":
        y = NA.norm_act(xs, ws, bs, act="leaky_relu", slope=0.01)
    elif kind == "group":
        y = NA.group_norm_act(xs, 2, ws, bs, act="leaky_relu", slope=0.01)
    else:
        y = NA.batch_norm_act(xs, rm.clone(), rv.clone(), ws, bs, training=train, act="leaky_relu", slope=0.01)
    # the float64 reference on contiguous data: PyTorch's own channels-last group norm is off by 2e-4
    # in float64 at mean 7000, spread 0.01
    x64, w64, b64 = (t.double().contiguous().requires_grad_(True) for t in (x, w, b))
    y64 = F.leaky_relu(_norm64(kind.split("_")[0], x64, w64, b64, rm.double(), rv.double(), train), 0.01)
    assert (y.double() - y64).abs().max().item() < 2e-6
    if kind == "instance":
        want = F.leaky_relu(b[3], 0.01).item()
        assert (y[1, 3] - want).abs().max().item() <= 1.2e-7 * abs(want)
    gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dy)
    ex, ew, eb = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    for got, want in ((gx, ex), (gw, ew), (gb, eb)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_batch_norm_eval_input_gradient_at_infinite_inputs():
    """Batch norm with running statistics: dx = dz * w * rstd, finite at an infinite x as in eager
    (the kernel's xhat term, multiplied by its zero coefficient, made it NaN)."""
    for cl in (False, True):
        x = torch.randn(2, 3, 4, 4, 3, dtype=torch.float64)
        x[0, 1, 1, 1, 1], x[1, 2, 0, 0, 0] = float("inf"), -float("inf")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        w = torch.rand(3, dtype=torch.float64) + 0.5
        for dt in (torch.float32, torch.float64):
            xa, xb = x.to(dt).requires_grad_(True), x.to(dt).requires_grad_(True)
            for act in ("none", "leaky_relu"):
                f = (lambda t: t) if act == "none" else (lambda t: F.leaky_relu(t, 0.01))
                ya = NA.batch_norm_act(xa, rm.to(dt), rv.to(dt), w.to(dt), None, training=False, act=act, slope=0.01)
                yb = f(F.batch_norm(xb, rm.to(dt), rv.to(dt), w.to(dt), None, training=False))
                dy = torch.ones_like(ya)
                (ga,), (gb,) = torch.autograd.grad(ya, xa, dy), torch.autograd.grad(yb, xb, dy)
                assert ga.isfinite().all()
                torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 4, 0), (0, 4, 3, 3)])
def test_batch_norm_of_an_empty_input_as_eager(shape):
    """An empty batch (or empty spatial dims) in training: eager returns an empty output and leaves
    the running statistics alone; fastmed raised (IndexError for N = 0, a refusal for S = 0)."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for train in (True, False):
        rm, rv = torch.arange(4.0, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)
        y = NA.batch_norm_act(x, rm, rv, training=train, act="relu")
        e = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), training=train))
        assert y.shape == e.shape == shape
        assert torch.equal(rm, torch.arange(4.0, dtype=torch.float64)) and torch.equal(rv, torch.full((4,), 2.0,
                                                                                                       dtype=torch.float64))
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.shape == shape
