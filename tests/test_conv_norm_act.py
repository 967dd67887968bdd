"""fastmed::conv_norm_act_fwd (convolution -> instance norm -> activation as one op) on the CPU:
against the eager layers and the float64 reference, with every gradient; bad inputs; opcheck.
The Triton convolution it uses on GPUs is checked in test_conv_norm_act_triton.py (interpreter)."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from fastmed.ops import conv_norm_act as CN


def eager(x, w, b, nw, nb, stride, padding, dilation, eps, act, slope):
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    z = F.instance_norm(conv(x, w, b, stride, padding, dilation), weight=nw, bias=nb, eps=eps)
    return z if act == "none" else F.relu(z) if act == "relu" else F.leaky_relu(z, slope)


CASES = [  # x shape, Cout, kernel, stride, padding, dilation
    ((2, 3, 7, 8, 6), 5, 3, 1, 1, 1),
    ((1, 4, 9, 7, 8), 6, 3, 2, 1, 1),
    ((2, 2, 8, 9, 7), 3, (1, 3, 3), (1, 2, 1), (0, 1, 1), 1),
    ((1, 3, 9, 9, 9), 4, 3, 1, 2, 2),
    ((2, 5, 13, 11), 4, 3, 1, 1, 1),
    ((1, 1, 12, 10), 8, 5, 2, 0, 1),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act", ["leaky_relu", "relu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_gradients_equal_eager(case, act, dtype, channels_last):
    shape, cout, k, st, pd, dl = case
    nd = len(shape) - 2
    ks = (k,) * nd if isinstance(k, int) else k
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if nd == 3 else torch.channels_last)
    w = (torch.randn((cout, shape[1]) + ks, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    b = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype)
    nw = (torch.rand(cout, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    nb = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype)
    ins = [t.clone().requires_grad_(True) for t in (x, w, b, nw, nb)]
    refs = [t.clone().requires_grad_(True) for t in (x, w, b, nw, nb)]
    z = CN.conv_norm_act(*ins, st, pd, dl, 1e-5, act, 0.02)
    r = eager(*refs, st, pd, dl, 1e-5, act, 0.02)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, r, **tol)
    torch.testing.assert_close(z.double(), CN.conv_norm_act_reference(x, w, b, nw, nb, st, pd, dl, 1e-5, act, 0.02),
                               **tol)
    dz = torch.randn(z.shape, generator=g, dtype=torch.float64).to(dtype)
    z.backward(dz)
    r.backward(dz)
    gtol = dict(rtol=tol["rtol"] * 20, atol=tol["atol"] * 20)
    for name, a, e in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), ins, refs):
        torch.testing.assert_close(a.grad, e.grad, **gtol, msg=lambda m: f"{name}: {m}")


def test_without_biases_and_affine():
    x = torch.randn(2, 3, 6, 7, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    z = CN.conv_norm_act(x, w, None, None, None, 1, 1)
    r = eager(x, w, None, None, None, 1, 1, 1, 1e-5, "leaky_relu", 0.01)
    torch.testing.assert_close(z, r, rtol=2e-5, atol=2e-5)
    gz = torch.autograd.grad(z.sum() + (z * z).sum(), (x, w))
    gr = torch.autograd.grad(r.sum() + (r * r).sum(), (x, w))
    for a, e in zip(gz, gr):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    t = lambda *s: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w, b, nw, nb = t(1, 2, 4, 3, 4), t(3, 2, 3, 3, 3), t(3), t(3), t(3)
    assert torch.autograd.gradcheck(
        lambda *a: CN.conv_norm_act(*a, 1, 1, 1, 1e-5, "leaky_relu", 0.2), (x, w, b, nw, nb))


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 5, 6, 4, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    b, nw, nb = torch.randn(4, requires_grad=True), torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.library.opcheck(CN.conv_norm_act_fwd, (x, w, b, nw, nb, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1e-5, 0.01, 2))
    f = torch.compile(lambda x: CN.conv_norm_act(x * 2, w, b, nw, nb, 1, 1) + 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), CN.conv_norm_act(x * 2, w, b, nw, nb, 1, 1) + 1)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(1, 3, 5, 5, 5), torch.randn(4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="input channels"):
        CN.conv_norm_act(x, torch.randn(4, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        CN.conv_norm_act(x, w, stride=(1, 1))
    with pytest.raises(ValueError, match="padding"):
        CN.conv_norm_act(x, w, padding=-1)
    with pytest.raises(ValueError, match="bias"):
        CN.conv_norm_act(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="act"):
        CN.conv_norm_act(x, w, act="gelu")
    with pytest.raises(TypeError, match="x must be float32"):
        CN.conv_norm_act(x.half(), w.half())
    with pytest.raises(TypeError, match="weight"):
        CN.conv_norm_act(x, w.double())
    with pytest.raises(ValueError, match="4D or 5D"):
        CN.conv_norm_act(torch.randn(1, 3, 5), torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="eps"):
        CN.conv_norm_act(x, w, eps=0)


def test_triton_conv_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv("FASTMED_TRITON_CONV", raising=False)
    assert not CN.triton_conv_enabled()
    monkeypatch.setenv("FASTMED_TRITON_CONV", "1")
    assert CN.triton_conv_enabled()
    # on the CPU the switch changes nothing: PyTorch's convolution + the C++ norm
    x, w = torch.randn(1, 2, 5, 6, 7), torch.randn(3, 2, 3, 3, 3)
    torch.testing.assert_close(CN.conv_norm_act(x, w, padding=1), eager(x, w, None, None, None, 1, 1, 1, 1e-5,
                                                                        "leaky_relu", 0.01), rtol=2e-5, atol=2e-5)


def test_triton_conv_routing_for_a_cuda_device(monkeypatch):
    """The routing the CUDA path takes, without a GPU (meta tensors standing for CUDA ones): with
    FASTMED_TRITON_CONV=force the kernel modules load and are returned; unsupported dtypes and
    groups go to PyTorch's convolution."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTMED_TRITON_CONV", "force")
    cuda = torch.device("cuda")
    x, w = torch.empty(1, 16, 8, 8, 8, device="meta"), torch.empty(32, 16, 3, 3, 3, device="meta")
    use = CN._use_triton(x, w, [1] * 3, [1] * 3, [1] * 3, device=cuda)
    assert use is not None and use[0] is CN._triton_conv() and use[1] is not None
    assert use[0].__name__.endswith("conv_triton")
    assert CN._use_triton(x.double(), w.double(), [1] * 3, [1] * 3, [1] * 3, device=cuda) is None  # float64
    assert CN._use_triton(x, w[:, :8], [1] * 3, [1] * 3, [1] * 3, groups=2, device=cuda) is None
    assert CN._use_triton(x, w, [1] * 3, [1] * 3, [1] * 3, device=torch.device("cpu")) is None


def test_norm_parameters_and_output_size_are_checked():
    x, w = torch.randn(1, 3, 5, 5, 5), torch.randn(8, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="norm_weight"):
        CN.conv_norm_act(x, w, None, torch.ones(2), None, padding=1)
    with pytest.raises(ValueError, match="norm_bias"):
        CN.conv_norm_act(x, w, None, None, torch.zeros(8, dtype=torch.int64), padding=1)
    with pytest.raises(ValueError, match="norm_weight must be on"):
        CN.conv_norm_act(x, w, None, torch.ones(8, device="meta"), None, padding=1)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        CN.conv_norm_act(torch.randn(1, 3, 3, 3, 3), w)
    with pytest.raises(ValueError, match="empty"):
        CN.conv_norm_act(torch.randn(1, 3, 2, 5, 5), w)


def test_inference_op_equals_the_autograd_op():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 6, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(6, 4, 3, 3, 3, generator=g), torch.randn(6, generator=g)
    nw, nb = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    z = CN.conv_norm_act_fwd(x, w, b, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)[0]
    with torch.no_grad():
        zi = CN.conv_norm_act(x, w, b, nw, nb, 1, 1)
    assert torch.equal(zi, z) and zi.stride() == z.stride()
    torch.library.opcheck(CN.conv_norm_act_infer, (x, w, b, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_two_layer_inference_op(channels_last):
    """conv_norm_act2_infer (on CUDA with the Triton convolution the first norm + activation run in
    the second convolution's prologue; see test_conv_norm_act_triton.py) equals the two layers one
    after the other, and its fake function the real output's shape and layout (a strided second
    convolution, ReLU after the first)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 8, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w1, b1 = torch.randn(5, 3, 3, 3, 3, generator=g), torch.randn(5, generator=g)
    w2 = torch.randn(6, 5, 3, 3, 3, generator=g)
    nw, nb = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    l1 = (w1, b1, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.0, 1)
    l2 = (w2, None, None, None, [2] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
    z = CN.conv_norm_act2_infer(x, *l1, *l2)
    ref = CN.conv_norm_act_infer(CN.conv_norm_act_infer(x, *l1), *l2)
    assert torch.equal(z, ref) and z.stride() == ref.stride()
    r64 = CN.conv_norm_act_reference(CN.conv_norm_act_reference(x, w1, b1, nw, nb, 1, 1, act="relu"), w2, None, None,
                                     None, 2, 1)
    torch.testing.assert_close(z.double(), r64, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(CN.conv_norm_act2_infer, (x, *l1, *l2))


def _two_layers(g, cin, dtype=torch.float32):
    w1, b1 = torch.randn(5, cin, 3, 3, 3, generator=g, dtype=dtype) * 0.3, torch.randn(5, generator=g, dtype=dtype)
    w2, b2 = torch.randn(6, 5, 3, 3, 3, generator=g, dtype=dtype) * 0.3, torch.randn(6, generator=g, dtype=dtype)
    nw, nb = torch.rand(5, generator=g, dtype=dtype) + 0.5, torch.randn(5, generator=g, dtype=dtype)
    nw2, nb2 = torch.rand(6, generator=g, dtype=dtype) + 0.5, torch.randn(6, generator=g, dtype=dtype)
    return [w1, b1, nw, nb, w2, b2, nw2, nb2]


def _chain(x, w1, b1, nw, nb, w2, b2, nw2, nb2, act1=2, slope1=0.01):
    return CN.conv_norm_act2_fwd(x, w1, b1, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, slope1, act1,
                                 w2, b2, nw2, nb2, [2, 1, 2], [1] * 3, [1] * 3, 1e-5, 0.01, 2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin", [1, 3])
@pytest.mark.parametrize("act1", [(2, 0.01), (1, 0.0), (0, 0.0)])
def test_two_layer_training_op_equals_the_layers_with_gradients(channels_last, cin, act1):
    """conv_norm_act2_fwd keeps y1 and y2 for its backward, not the first normalised activation z1
    (recomputed bit for bit from y1): values and every gradient as the two conv_norm_act_fwd layers
    one after the other, and as float64 eager layers."""
    g = torch.Generator().manual_seed(20 + cin)
    x = torch.randn(2, cin, 9, 8, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ps = _two_layers(g, cin)
    a = [t.clone().requires_grad_(True) for t in [x] + ps]
    b = [t.clone().requires_grad_(True) for t in [x] + ps]
    r = [t.double().requires_grad_(True) for t in [x] + ps]
    out = _chain(*a, *act1)
    z = out[0]
    w1, b1, nw, nb, w2, b2, nw2, nb2 = b[1:]
    z1, y1 = CN.conv_norm_act_fwd(b[0], w1, b1, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, act1[1], act1[0])[:2]
    zb, y2 = CN.conv_norm_act_fwd(z1, w2, b2, nw2, nb2, [2, 1, 2], [1] * 3, [1] * 3, 1e-5, 0.01, 2)[:2]
    # (a 1-channel x: the single-layer op writes y1 channels last, the training pair keeps it planar,
    # so the norms sum in another order there)
    exact = cin > 1
    assert out[1].is_contiguous(memory_format=torch.channels_last_3d) == (channels_last and exact)
    for t, u in ((z, zb), (out[1], y1), (out[4], y2)):
        assert torch.equal(t, u) if exact else (t - u).abs().max().item() < 1e-5
    acts = {2: "leaky_relu", 1: "relu", 0: "none"}
    w1, b1, nw, nb, w2, b2, nw2, nb2 = r[1:]
    ref = eager(eager(r[0], w1, b1, nw, nb, 1, 1, 1, 1e-5, acts[act1[0]], act1[1]), w2, b2, nw2, nb2, (2, 1, 2), 1, 1,
                1e-5, "leaky_relu", 0.01)
    assert (z.double() - ref).abs().max().item() < 1e-5
    dz = torch.randn(z.shape, generator=g)
    z.backward(dz)
    zb.backward(dz)
    ref.backward(dz.double())
    names = ("x", "weight", "bias", "norm_weight", "norm_bias", "weight2", "bias2", "norm_weight2", "norm_bias2")
    for ta, tb, tr, name in zip(a, b, r, names):
        if exact:
            assert torch.equal(ta.grad, tb.grad), name  # the recomputed z1 is z1's bits
        scale = max(tr.grad.abs().max().item(), 1.0 if name.startswith("bias") else 0.0)  # conv biases: 0
        assert (ta.grad.double() - tr.grad).abs().max().item() <= 1e-4 * scale + 1e-6, name


def test_two_layer_training_op_gradcheck_gradgradcheck_and_opcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ps = [t.requires_grad_(True) for t in _two_layers(g, 2, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: _chain(*a)[0], (x, *ps))
    l2 = (ps[4], None, None, None, [1] * 3, [0] * 3, [1] * 3, 1e-5, 0.01, 2)
    args = (x.detach().float(), *(t.detach().float() for t in ps[:4]), [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.0, 1,
            *(t.detach().float() if isinstance(t, torch.Tensor) else t for t in l2))
    torch.library.opcheck(CN.conv_norm_act2_fwd, args)
    out = _chain(x, *ps)
    assert not any(out[i].requires_grad for i in (2, 3, 5, 6))
    # double backward (a gradient penalty) through a float64 recompute of both layers
    assert torch.autograd.gradgradcheck(lambda *a: _chain(*a)[0], (x, *ps))


def test_statistics_are_not_differentiable_and_double_backward_says_so():
    x = torch.randn(1, 2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    z, y, mean, rstd = CN.conv_norm_act_fwd(x, w, None, None, None, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad
    with pytest.raises(RuntimeError, match="conv_norm_act: double backward"):
        torch.autograd.grad(z.square().sum(), x, create_graph=True)


def test_only_plain_convolutions_are_taken_over():
    """A convolution whose module would do more than convolve (a Sequential subclass with its own
    forward, hooks of any kind) is never run by conv_norm_act."""
    from torch import nn

    from fastmed.nn import _plain_conv

    conv = nn.Conv3d(2, 4, 3, padding=1)
    assert _plain_conv(conv) is conv and _plain_conv(nn.Sequential(conv)) is conv

    class Scaled(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    assert _plain_conv(Scaled(conv)) is None
    for register in (conv.register_forward_hook, conv.register_forward_pre_hook, conv.register_full_backward_hook):
        h = register(lambda *a: None)
        assert _plain_conv(conv) is None
        h.remove()
    h = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert _plain_conv(conv) is None
    finally:
        h.remove()
    assert _plain_conv(conv) is conv
    assert _plain_conv(nn.Conv3d(2, 4, 3, padding="same")) is None
    assert _plain_conv(nn.Conv3d(2, 4, 3, padding=1, padding_mode="reflect")) is None
    assert _plain_conv(nn.Conv3d(2, 4, 3, padding=1, groups=2)) is None


# ------------------------------------------------------------------------------------------------
# training on the CPU: a convolution after a fused instance norm keeps the norm's input, not its own


def _chain_model(dtype=torch.float32, channels_last=False, groups=1, dims=3, norm="instance"):
    from fastmed.nn import ConvNormAct

    torch.manual_seed(0)
    kw = dict(spatial_dims=dims, norm=norm)
    nk = dict(num_groups=2) if norm == "group" else {}
    m = torch.nn.Sequential(
        ConvNormAct(3, 8, 3, norm_kwargs=dict(nk), **kw),
        ConvNormAct(8, 8, 3, stride=2, groups=groups, norm_kwargs=dict(affine=True, **nk), **kw),
        ConvNormAct(8, 6, (1, 3, 3)[-dims:], dilation=(1, 2, 1)[-dims:], act="prelu",
                    norm_kwargs=dict(affine=True, **nk), act_kwargs=dict(num_parameters=6, init=0.3), **kw),
        ConvNormAct(6, 4, 1, act=None, bias=False, norm_kwargs=dict(nk), **kw)).to(dtype)
    x = torch.randn((2, 3, 9, 10, 11)[:dims + 2], dtype=dtype)
    if channels_last:
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        x = x.to(memory_format=fmt)
        for p in m.parameters():
            if p.ndim == dims + 2:
                p.data = p.data.to(memory_format=fmt)
    return m, x.requires_grad_()


def _run(m, x, g, recompute: bool, monkeypatch):
    calls = []
    apply = CN._ConvOfNormAct.apply
    with monkeypatch.context() as mp:
        if recompute:
            mp.setattr(CN._ConvOfNormAct, "apply", lambda *a: (calls.append(1), apply(*a))[1])
        else:
            mp.setattr(CN, "_norm_source", lambda *a: None)
        out = m(x)
        grads = torch.autograd.grad(out, [x] + list(m.parameters()), g)
    return out, grads, len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dims, norm", [(3, "instance"), (2, "instance"), (3, "group"), (3, "batch"),
                                        (2, "batch")])
def test_convolution_after_a_fused_norm_recomputes_its_input_bit_for_bit(dtype, channels_last, groups, dims, norm,
                                                                         monkeypatch):
    m, x = _chain_model(dtype, channels_last, groups, dims, norm)
    g = torch.randn_like(m(x))
    out1, g1, calls = _run(m, x, g, True, monkeypatch)
    out0, g0, _ = _run(m, x, g, False, monkeypatch)
    assert calls == 3  # every convolution but the first takes a fused norm's output
    assert torch.equal(out1, out0)
    for a, b in zip(g1, g0):
        assert torch.equal(a, b)
    # and both are the eager layers' to rounding (float64 reference)
    ref = [p.detach().double().requires_grad_() for p in [x] + list(m.parameters())]
    h, params = ref[0], iter(ref[1:])
    for layer in m:
        w = next(params)
        b = next(params) if layer.conv.bias is not None else None
        conv = F.conv3d if dims == 3 else F.conv2d
        h = conv(h, w, b, layer.conv.stride, layer.conv.padding, layer.conv.dilation, layer.conv.groups)
        if hasattr(layer, "norm"):
            nw, nb = (next(params), next(params)) if layer.norm.affine else (None, None)
            if norm == "group":
                h = F.group_norm(h, layer.norm.num_groups, nw, nb, layer.norm.eps)
            elif norm == "batch":
                h = F.batch_norm(h, None, None, nw, nb, True, 0.0, layer.norm.eps)
            else:
                h = F.instance_norm(h, weight=nw, bias=nb, eps=layer.norm.eps)
        if isinstance(getattr(layer, "act", None), torch.nn.PReLU):
            h = F.prelu(h, next(params))
        elif hasattr(layer, "act"):
            h = F.leaky_relu(h, 0.01) if isinstance(layer.act, torch.nn.LeakyReLU) else F.relu(h)
    gr = torch.autograd.grad(h, ref, g.double())
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out1.double(), h, rtol=tol, atol=tol)
    for a, b in zip(g1, gr):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dims", [3, 2])
def test_convolution_after_a_fused_norm_does_not_keep_its_input(dims):
    """The fused norms' outputs are never among the tensors autograd keeps: each layer keeps one
    activation (the convolution's output), eager keeps two."""
    m, x = _chain_model(dims=dims)
    outs, saved = [], set()
    hooks = [layer.register_forward_hook(lambda mod, a, o: outs.append(o.untyped_storage().data_ptr()))
             for layer in list(m)[:-1]]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.add(t.untyped_storage().data_ptr()), t)[1],
                                                  lambda t: t):
        out = m(x)
    for h in hooks:
        h.remove()
    assert len(outs) == 3 and not saved & set(outs)
    out.sum().backward()  # and the backward still runs


def test_recompute_falls_back_where_it_cannot_hold(monkeypatch):
    from fastmed.nn import ConvNormAct

    torch.manual_seed(1)
    a, b = ConvNormAct(2, 4, 3), ConvNormAct(4, 4, 3)
    x = torch.randn(1, 2, 6, 7, 8, requires_grad=True)
    calls = []
    apply = CN._ConvOfNormAct.apply
    monkeypatch.setattr(CN._ConvOfNormAct, "apply", lambda *args: (calls.append(1), apply(*args))[1])

    def grads(fn):
        out = fn()
        return [out] + list(torch.autograd.grad(out.square().sum(), [x, a.conv.weight, b.conv.weight]))

    # the norm's output modified in place before the convolution: an ordinary convolution
    def modified():
        z = a(x)
        z.mul_(2)
        return b(z)

    got = grads(modified)
    assert calls == []
    with monkeypatch.context() as mp:
        mp.setattr(CN, "_norm_source", lambda *args: None)
        ref = grads(modified)
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    # the norm's input packed away by saved-tensor hooks (the original freed): an ordinary one
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        got = grads(lambda: b(a(x)))
    assert calls == []
    # two convolutions of one fused norm's output: both recompute it, gradients add up
    c = ConvNormAct(4, 4, 1)
    got = grads(lambda: b(a(x)) + c(a(x)))
    assert len(calls) == 2
    with monkeypatch.context() as mp:
        mp.setattr(CN, "_norm_source", lambda *args: None)
        ref = grads(lambda: b(a(x)) + c(a(x)))
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    # without autograd nothing is marked
    with torch.no_grad():
        z = a(x)
    assert CN._norm_source(z, b.conv.weight, b.conv.bias) is None
    # a marked output pickles as any tensor, and its mark goes with it
    z = a(x)
    assert CN._norm_source(z, b.conv.weight, b.conv.bias) is not None
    buf = io.BytesIO()
    torch.save(z, buf)
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue())), z)
    n = len(CN._SOURCES)
    del z
    assert len(CN._SOURCES) == n - 1
    # CPU autocast: the eager path
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b(a(x)).float().sum().backward()
    assert calls == []


def test_recompute_gradcheck_gradgradcheck_and_checkpoint():
    from fastmed.nn import ConvNormAct
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(2)
    a = ConvNormAct(2, 3, 3, norm_kwargs=dict(affine=True)).double()
    b = ConvNormAct(3, 2, 3, stride=2, act="relu").double()
    x = torch.randn(1, 2, 5, 5, 6, dtype=torch.float64, requires_grad=True)
    pw = torch.tensor([0.2, -0.3, 0.5], dtype=torch.float64, requires_grad=True)
    params = [x, a.conv.weight, a.norm.weight, a.norm.bias, b.conv.weight, b.conv.bias, pw]

    def f(x, w1, nw, nb, w2, b2, *pw):
        act = "prelu" if pw else "leaky_relu"
        z = CN.norm_act_keep_source(CN.conv_nd(x, w1, a.conv.bias, [1] * 3, [1] * 3, [1] * 3), nw, nb, 1e-5,
                                    act, 0.01, *pw)
        y = CN.conv_nd(z, w2, b2, [2] * 3, [1] * 3, [1] * 3)
        assert type(y.grad_fn).__name__ == "_ConvOfNormActBackward"
        return y

    for ps in (params[:-1], params):  # LeakyReLU, PReLU
        assert torch.autograd.gradcheck(f, ps)
        assert torch.autograd.gradgradcheck(f, ps)
    # non-reentrant checkpointing recomputes the forward (new marks); gradients unchanged
    out = b(a(x))
    g = torch.randn_like(out)
    ref = torch.autograd.grad(out, params[:-1], g)
    got = torch.autograd.grad(checkpoint(lambda t: b(a(t)), x, use_reentrant=False), params[:-1], g)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["group", "batch", "batch_eval"])
def test_recompute_after_group_and_batch_norms(norm, monkeypatch):
    """Group norm, batch norm in training (batch statistics) and in eval (running statistics, e.g.
    fine-tuning with frozen norms) route through the recompute too: bit-identical to the route off,
    double backward (create_graph) through eager's norm, gradcheck / gradgradcheck."""
    from fastmed.nn import ConvNormAct

    torch.manual_seed(4)
    nk = dict(num_groups=2) if norm == "group" else {}
    kind = "batch" if norm == "batch_eval" else norm
    a = ConvNormAct(2, 4, 3, norm=kind, norm_kwargs=nk).double()
    b = ConvNormAct(4, 2, 3, stride=2, norm=kind, norm_kwargs=nk, act="prelu").double()
    if norm == "batch_eval":
        with torch.no_grad():
            for bn in (a.norm, b.norm):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        a.eval(), b.eval()
    x = torch.randn(2, 2, 5, 6, 5, dtype=torch.float64, requires_grad=True)
    params = [x] + list(a.parameters()) + list(b.parameters())
    calls = []
    apply = CN._ConvOfNormAct.apply
    monkeypatch.setattr(CN._ConvOfNormAct, "apply", lambda *args: (calls.append(1), apply(*args))[1])

    def f(*ps):
        return b(a(ps[0]))

    out = f(*params)
    assert len(calls) == 1
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    with monkeypatch.context() as mp:
        mp.setattr(CN, "_norm_source", lambda *args: None)
        ref = torch.autograd.grad(f(*params), params, g)
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    # gradient penalty: the double backward recomputes the norm with eager's ops
    gx, = torch.autograd.grad(f(*params), x, g, create_graph=True)
    pen = torch.autograd.grad(gx.square().sum(), params[1:], allow_unused=True)
    with monkeypatch.context() as mp:
        mp.setattr(CN, "_norm_source", lambda *args: None)
        gx0, = torch.autograd.grad(f(*params), x, g, create_graph=True)
        pen0 = torch.autograd.grad(gx0.square().sum(), params[1:], allow_unused=True)
    for u, v in zip(pen, pen0):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    if norm == "batch":  # gradcheck reruns the forward, which updates the running statistics: no matter
        a.norm.track_running_stats = b.norm.track_running_stats = False
        a.norm.running_mean = a.norm.running_var = b.norm.running_mean = b.norm.running_var = None
    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(f, params)


def test_recompute_review_cases(monkeypatch, tmp_path):
    """Cases a review found: tracing (torch.jit.trace + save) in grad mode, compiled autograd, int
    stride / padding / dilation, the norm's parameters changed in place between the norm and the
    convolution, and a gradient penalty (create_graph) at eager's precision."""
    from fastmed.nn import ConvNormAct

    torch.manual_seed(3)
    m = torch.nn.Sequential(ConvNormAct(2, 4, 3, norm_kwargs=dict(affine=True)),
                            ConvNormAct(4, 4, 3, norm_kwargs=dict(affine=True)), ConvNormAct(4, 3, 3, act=None))
    for batch in (1, 2):  # the batch of one takes oneDNN directly when not tracing
        x = torch.randn(batch, 2, 6, 6, 6)
        traced = torch.jit.trace(m, x, check_trace=False)  # its check traces again without autograd
        torch.jit.save(traced, str(tmp_path / f"m{batch}.pt"))
        torch.testing.assert_close(torch.jit.load(str(tmp_path / f"m{batch}.pt"))(x), m(x))
    x = torch.randn(2, 2, 6, 6, 6)
    # int arguments of conv_nd on a marked input
    z = m[0](x)
    assert CN._norm_source(z, m[1].conv.weight, m[1].conv.bias) is not None
    y = CN.conv_nd(z, m[1].conv.weight, None, 1, 1, 1)
    assert type(y.grad_fn).__name__ == "_ConvOfNormActBackward"
    torch.testing.assert_close(y, F.conv3d(z, m[1].conv.weight, None, 1, 1))
    # the norm's weight changed in place after the norm, before the convolution: ordinary convolution
    z = m[0](x)
    with torch.no_grad():
        m[0].norm.weight.mul_(2.0)
    try:
        assert CN._norm_source(z, m[1].conv.weight, m[1].conv.bias) is None
        g = torch.autograd.grad(m[1].conv(z).square().sum(), m[1].conv.weight)[0]
        torch.testing.assert_close(g, torch.autograd.grad(F.conv3d(z, m[1].conv.weight, m[1].conv.bias, 1, 1)
                                                          .square().sum(), m[1].conv.weight)[0])
    finally:
        with torch.no_grad():
            m[0].norm.weight.div_(2.0)
    # a gradient penalty: the same as without the route, to float32 rounding
    def penalty():
        xx = x.clone().requires_grad_()
        gx, = torch.autograd.grad(m(xx).square().sum(), xx, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), list(m.parameters()))

    got = penalty()
    with monkeypatch.context() as mp:
        mp.setattr(CN, "_norm_source", lambda *a: None)
        ref = penalty()
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())
    # compiled autograd: the ordinary convolution (it cannot take the route's None gradients)
    calls = []
    apply = CN._ConvOfNormAct.apply
    monkeypatch.setattr(CN._ConvOfNormAct, "apply", lambda *a: (calls.append(1), apply(*a))[1])

    @torch.compile(backend="eager")
    def backward(loss):
        loss.backward()

    m.zero_grad()
    # the config's own patch (monkeypatch's undo would delete this config entry on newer pytest)
    with torch._dynamo.config.patch(compiled_autograd=True):
        backward(m(x).square().sum())
    torch._dynamo.reset()
    assert calls == [] and all(p.grad is not None for p in m.parameters())
