"""fastmed.optimize and ConvNormAct on CUDA (cuDNN convolutions + the Triton norm_act kernels):
outputs and gradients equal the eager model's, float32 and bfloat16 autocast, contiguous and
channels last (skipped without a GPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmed
from fastmed.nn import ConvNormAct

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
monai_nets = pytest.importorskip("monai.networks.nets")


@pytest.fixture(autouse=True)
def triton_must_run():
    """The Triton kernels themselves must run: their fallback warning is an error here."""
    import warnings

    from fastmed.ops import norm_act as NA

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastmed: the Triton norm_act kernels failed")
        yield
    assert NA._triton() is not None


def _run(model, x, autocast):
    xx = x.clone().requires_grad_(True)
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(xx)
    w = torch.linspace(-1, 1, out.shape[1], device=x.device).view(1, -1, 1, 1, 1)
    (out.float() * w).sum().backward()
    return out.detach().float(), [xx.grad.float()] + [p.grad.float() for p in model.parameters() if p.grad is not None]


def _rel(a, b):
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


@pytest.fixture
def count_triton(monkeypatch):
    from fastmed.kernels import norm_act_triton as K

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = K.norm_act_fwd, K.norm_act_bwd

    def f(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def b(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(K, "norm_act_fwd", f)
    monkeypatch.setattr(K, "norm_act_bwd", b)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("res_block", [False, True])
def test_dynunet_on_cuda(channels_last, autocast, res_block, count_triton):
    torch.backends.cudnn.allow_tf32 = False  # both models' convolutions round alike
    torch.manual_seed(0)
    m = monai_nets.DynUNet(3, 1, 3, kernel_size=[3] * 4, strides=[1, 2, 2, 2], upsample_kernel_size=[2] * 3,
                           res_block=res_block, norm_name=("instance", {"affine": True})).cuda().train()
    o = fastmed.optimize(m, channels_last=channels_last)
    ref = copy.deepcopy(m).to(memory_format=torch.channels_last_3d) if channels_last else m
    x = torch.randn(2, 1, 32, 32, 24, device="cuda")
    y, g = _run(ref, x, autocast)
    yf, gf = _run(o, x, autocast)
    assert count_triton["fwd"] > 0 and count_triton["bwd"] > 0, "the fused CUDA path did not run"
    tol = 3e-2 if autocast else 1e-4
    assert _rel(yf, y) < tol
    assert all(_rel(a, b) < tol * 10 for a, b in zip(gf, g))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        assert _rel(o.eval()(x).float(), ref.eval()(x).float()) < tol  # in place on the conv outputs


def test_nnunet_plain_unet_on_cuda(count_triton):
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    torch.manual_seed(2)
    m = dna.PlainConvUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 3, (2, 2), conv_bias=True,
                          norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                          nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}).cuda()
    o = fastmed.optimize(m)
    x = torch.randn(2, 1, 32, 32, 24, device="cuda")
    y, g = _run(m, x, False)
    yf, gf = _run(o, x, False)
    assert count_triton["fwd"] >= 10
    assert _rel(yf, y) < 1e-4 and all(_rel(a, b) < 1e-3 for a, b in zip(gf, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_conv_norm_act_on_cuda(dtype, count_triton):
    torch.manual_seed(3)
    blk = ConvNormAct(4, 8, 3, norm_kwargs={"affine": True}).cuda().to(dtype)
    twin = nn.Sequential(copy.deepcopy(blk.conv), copy.deepcopy(blk.norm), copy.deepcopy(blk.act))
    x = torch.randn(2, 4, 20, 18, 16, device="cuda", dtype=dtype)
    y = blk(x)
    assert count_triton["fwd"] == 1
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert _rel(y.float(), twin(x).float()) < tol


@pytest.mark.parametrize("norm", [("batch", {}), ("group", {"num_groups": 4})])
def test_batch_and_group_norm_models_on_cuda(norm, count_triton):
    """DynUNet with batch norm and BasicUNet with group norm: fused on CUDA (Triton), outputs and
    gradients as the eager model's, running statistics updated alike."""
    torch.manual_seed(4)
    if norm[0] == "batch":
        m = monai_nets.DynUNet(3, 1, 3, kernel_size=[3] * 3, strides=[1, 2, 2], upsample_kernel_size=[2] * 2,
                               norm_name=norm).cuda().train()
    else:
        m = monai_nets.BasicUNet(3, 1, 3, features=(8, 8, 16, 16, 32, 8), norm=norm).cuda().train()
    ref = copy.deepcopy(m)
    o = fastmed.optimize(m)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    y, g = _run(ref, x, False)
    yf, gf = _run(o, x, False)
    assert count_triton["fwd"] > 0 and count_triton["bwd"] > 0, "the fused CUDA path did not run"
    assert _rel(yf, y) < 1e-4
    # float32 gradients through batch statistics are ill-conditioned here: eager itself is ~3e-3 away
    # from float64 in some (measured on the CPU), the fused path likewise
    top = max(b.norm().item() for b in g)
    assert all((a - b).norm().item() < 1e-2 * max(b.norm().item(), 1e-3 * top) for a, b in zip(gf, g))
    for (k, a), (_, b) in zip(o.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), k
