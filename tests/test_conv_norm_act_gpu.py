"""fastmed::conv_norm_act on CUDA with FASTMED_TRITON_CONV=force: the Triton implicit-GEMM convolution
(statistics in its epilogue) + norm_act's merge and elementwise kernels, against the float64
reference and the eager layers, with gradients; ConvNormAct under bf16 autocast; optimize(DynUNet)
(skipped without a GPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmed
from fastmed.nn import ConvNormAct
from fastmed.ops import conv_norm_act as CN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def triton_conv(monkeypatch):
    """FASTMED_TRITON_CONV=1; the Triton convolution must really run (its fallback warning is an
    error) and its calls are counted."""
    import warnings

    from fastmed.kernels import conv_bwd_triton as KB
    from fastmed.kernels import conv_triton as KC

    monkeypatch.setenv("FASTMED_TRITON_CONV", "force")  # every layer, also those cuDNN would get
    calls = {"n": 0, "bwd": 0, "epilogue_sums": 0}
    orig, orig_w, orig_d = KC.conv_fwd, KB.conv_wgrad, KB.conv_dgrad

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    def counted_w(*a, **k):
        calls["bwd"] += 1
        return orig_w(*a, **k)

    def counted_d(*a, **k):
        out = orig_d(*a, **k)
        calls["epilogue_sums"] += out is not None  # a chain's first backward sums in its epilogue
        return out

    monkeypatch.setattr(KC, "conv_fwd", counted)
    monkeypatch.setattr(KB, "conv_wgrad", counted_w)
    monkeypatch.setattr(KB, "conv_dgrad", counted_d)
    old_tf32 = torch.backends.cudnn.allow_tf32
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastmed: the Triton")
        yield calls
    torch.backends.cudnn.allow_tf32 = old_tf32
    assert CN._triton_conv() is not None


def _rel(a, b):
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-30)).item()


def _grads_alike(got, ref, tol) -> None:
    """Gradients compared by _rel, except a convolution bias's before an instance norm: exactly 0 on
    the fused backward (the norm removes it), rounding noise in eager's, which must be negligible
    against the largest gradient."""
    big = max(r.abs().max().item() for r in ref)
    for i, (a, r) in enumerate(zip(got, ref)):
        if torch.count_nonzero(a) == 0:
            assert r.abs().max().item() <= tol * big, i
        else:
            assert _rel(a, r) < tol, i


CASES = [((2, 32, 24, 20, 18), 32, 3, 1, 1), ((1, 1, 33, 30, 17), 16, 3, 1, 1), ((2, 48, 17, 16, 15), 64, 3, 2, 1),
         ((1, 8, 40, 36), 24, 3, 1, 1), ((1, 320, 6, 5, 4), 320, 3, 1, 1)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_against_float64_and_gradients_against_eager(case, dtype, triton_conv):
    torch.backends.cudnn.allow_tf32 = False
    shape, cout, k, st, pd = case
    nd = len(shape) - 2
    fmt = torch.channels_last_3d if nd == 3 else torch.channels_last
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn((cout, shape[1]) + (k,) * nd, device="cuda", generator=g) / (shape[1] * k ** nd) ** 0.5).to(dtype)
    b = torch.randn(cout, device="cuda", generator=g).to(dtype)
    nw, nb = torch.rand(cout, device="cuda", generator=g) + 0.5, torch.randn(cout, device="cuda", generator=g)
    ins = [t.clone().requires_grad_(True) for t in (x, w, b, nw, nb)]
    z = CN.conv_norm_act(*ins, st, pd, 1, 1e-5, "leaky_relu", 0.01)
    assert triton_conv["n"] == 1 and z.is_contiguous(memory_format=fmt)
    ref = CN.conv_norm_act_reference(x, w, b, nw, nb, st, pd, 1, 1e-5, "leaky_relu", 0.01)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert _rel(z, ref) < tol
    # gradients against the eager layers in the same dtype (backward: norm_act_bwd + cuDNN)
    conv = F.conv3d if nd == 3 else F.conv2d
    refs = [t.clone().requires_grad_(True) for t in (x, w, b, nw, nb)]
    r = F.leaky_relu(F.instance_norm(conv(refs[0], refs[1], refs[2], st, pd).float(), weight=refs[3], bias=refs[4]),
                     0.01)
    dz = torch.randn(z.shape, device="cuda", generator=g)
    z.float().mul(dz).sum().backward()
    assert triton_conv["bwd"] == 1  # the fused backward (conv_bwd_triton)
    assert torch.count_nonzero(ins[2].grad) == 0  # the convolution bias: instance norm makes it 0
    r.mul(dz).sum().backward()
    _grads_alike([t.grad for t in ins], [t.grad for t in refs], tol * 20)
    # deterministic
    z2 = CN.conv_norm_act(x, w, b, nw, nb, st, pd, 1, 1e-5, "leaky_relu", 0.01)
    assert torch.equal(z.detach(), z2)


def test_routing_with_the_plain_switch(triton_conv, monkeypatch):
    """FASTMED_TRITON_CONV=1 sends layers the kernel is not suited to (full float32, 24 input
    channels, too few programs) to cuDNN; the others to Triton."""
    monkeypatch.setenv("FASTMED_TRITON_CONV", "1")
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(2, 32, 32, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(32, 32, 3, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.05
    CN.conv_norm_act(x, w, padding=1)
    assert triton_conv["n"] == 1
    CN.conv_norm_act(x[:, :24].contiguous(memory_format=torch.channels_last_3d), w[:, :24], padding=1)
    CN.conv_norm_act(x[:, :, :4, :4, :4], w, padding=1)
    torch.backends.cudnn.allow_tf32 = False
    CN.conv_norm_act(x.float(), w.float(), padding=1)
    assert triton_conv["n"] == 1


def test_tf32_follows_cudnn_flag(triton_conv):
    x = torch.randn(1, 32, 16, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(32, 32, 3, 3, 3, device="cuda") * 0.05
    ref = CN.conv_norm_act_reference(x, w, padding=1)
    torch.backends.cudnn.allow_tf32 = True
    assert _rel(CN.conv_norm_act(x, w, padding=1), ref) < 5e-3
    torch.backends.cudnn.allow_tf32 = False
    assert _rel(CN.conv_norm_act(x, w, padding=1), ref) < 1e-5


def test_conv_norm_act_module_bf16_autocast(triton_conv):
    torch.manual_seed(1)
    blk = ConvNormAct(16, 32, 3, norm_kwargs={"affine": True}).cuda().to(memory_format=torch.channels_last_3d)
    twin = nn.Sequential(copy.deepcopy(blk.conv), copy.deepcopy(blk.norm), copy.deepcopy(blk.act))
    x = torch.randn(2, 16, 24, 24, 24, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = blk(x)
        r = twin(x)
    assert triton_conv["n"] == 1 and y.dtype == torch.bfloat16
    assert _rel(y.float(), r.float()) < 3e-2


def _train_step(net, x, autocast):
    """(output, [dx] + parameter gradients) of one forward + backward of a squared-mean loss."""
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = net(xx)
    out.float().square().mean().backward()
    return out.detach().float(), [xx.grad] + [p.grad for p in net.parameters()]


def _count_prologues(monkeypatch) -> dict:
    """{"prologue": n}: how many Triton convolutions ran with a prologue (a chained norm + act)."""
    from fastmed.kernels import conv_triton as KC

    seen = {"prologue": 0}
    counted = KC.conv_fwd

    def spy(*a, **k):
        seen["prologue"] += k.get("prologue") is not None
        return counted(*a, **k)

    monkeypatch.setattr(KC, "conv_fwd", spy)
    return seen


def _trained_alike(m, autocast):
    """optimize(m, channels_last=True) and m channels last: one training step each on a
    channels-last batch, outputs and gradients compared. Returns (optimized, eager, x, tolerance)."""
    o = fastmed.optimize(m, channels_last=True)
    ref = copy.deepcopy(m).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 24, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    (y0, g0), (y1, g1) = [_train_step(net, x, autocast) for net in (ref, o)]
    tol = 3e-2 if autocast else 1e-4
    assert _rel(y1, y0) < tol
    _grads_alike(g1, g0, tol * 10)
    return o, ref, x, tol


@pytest.mark.parametrize("autocast", [False, True])
def test_optimized_dynunet_uses_it(autocast, triton_conv):
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m = monai_nets.DynUNet(3, 1, 3, kernel_size=[3] * 4, strides=[1, 2, 2, 2], upsample_kernel_size=[2] * 3,
                           norm_name=("instance", {"affine": True})).cuda().train()
    o, ref, x, tol = _trained_alike(m, autocast)
    assert triton_conv["n"] >= 8 and triton_conv["bwd"] >= 8 and triton_conv["epilogue_sums"] >= 4
    n = triton_conv["n"]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        assert _rel(o.eval()(x).float(), ref.eval()(x).float()) < tol  # conv_norm_act_infer: in place
    assert triton_conv["n"] > n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue_chain_in_dynunet_inference(dtype, triton_conv, monkeypatch):
    """Inference through optimize(DynUNet): each basic block's first norm + activation run in its
    second convolution's prologue (conv_norm_act2_infer), bit for bit the unchained result."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    from fastmed import nn as fnn

    torch.manual_seed(1)
    m = monai_nets.DynUNet(3, 1, 3, kernel_size=[3] * 3, strides=[1, 2, 2], upsample_kernel_size=[2] * 2,
                           norm_name=("instance", {"affine": True})).cuda().to(dtype).eval()
    o = fastmed.optimize(m, channels_last=True)
    x = torch.randn(2, 1, 32, 32, 24, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    seen = _count_prologues(monkeypatch)
    with torch.no_grad():
        chained = o(x)
        assert seen["prologue"] >= 4  # input block, down block, bottleneck, up blocks
        monkeypatch.setattr(fnn, "_conv_pair", lambda layers, x: None)
        plain = o(x)
        ref = m(x)
    assert torch.equal(chained, plain)
    assert _rel(chained.float(), ref.float()) < (1e-4 if dtype == torch.float32 else 3e-2)
    torch.library.opcheck(torch.ops.fastmed.conv_norm_act2_infer.default,
                          (x, o.input_block.conv1.conv.weight.detach(), None, None, None, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01,
                           2, o.input_block.conv2.conv.weight.detach(), None, None, None, [2] * 3, [1] * 3, [1] * 3, 1e-5, 0.01,
                           1))


@pytest.mark.parametrize("autocast", [False, True])
def test_optimized_plainconvunet_uses_it(autocast, triton_conv, monkeypatch):
    """nnU-Net's PlainConvUNet on the Triton convolution: the stacks two layers at a time (prologue
    chain) in training and inference, the first layer's backward sums from the second's
    data-gradient epilogue in training; same results as eager cuDNN."""
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")

    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(2)
    common = dict(conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    m = dna.PlainConvUNet(1, 3, (16, 32, 64), nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 3, (2, 2), **common).cuda().train()
    o, ref, x, tol = _trained_alike(m, autocast)
    assert triton_conv["n"] >= 10 and triton_conv["bwd"] >= 10 and triton_conv["epilogue_sums"] >= 3
    seen = _count_prologues(monkeypatch)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        assert _rel(o.eval()(x).float(), ref.eval()(x).float()) < tol
    assert seen["prologue"] == 5  # 3 encoder + 2 decoder stacks of two layers
