"""CUDA kernels against the CPU kernels and the float64 reference (run by benches/gpu/run.sh)."""
import pytest
import torch

import fastmed
from fastmed import losses as FL
from fastmed.ops import dice_ce as D

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or fastmed._ext.cuda is None,
                       reason="needs a CUDA GPU and a fastmed build with CUDA kernels"),
]


@pytest.mark.parametrize("act,ce", [(2, 1), (2, 0), (1, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("label_map", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "squared", "soft", "weights+mask+ignore"])
def test_cuda_matches_cpu(act, ce, label_map, dtype, variant):
    g = torch.Generator().manual_seed(0)
    B, C, sp = 2, 5, (13, 17, 11)
    x = (torch.randn((B, C) + sp, generator=g) * 3).to(dtype)
    lab = torch.randint(0, C, (B, 1) + sp, generator=g)
    mask, w, ignore = None, None, None
    squared, soft = variant == "squared", variant == "soft"
    if variant == "weights+mask+ignore":
        w = torch.rand(C, generator=g) + 0.5
        mask = (torch.rand((B, 1) + sp, generator=g) > 0.3).float()
        if label_map:
            ignore = 255
            lab[:, :, 0] = 255
    target = lab if label_map else torch.nn.functional.one_hot(lab[:, 0].clamp(max=C - 1), C).movedim(-1, 1).to(dtype)
    args = (mask, w, act, ce, True, label_map, squared, soft, ignore)
    res = {}
    for dev in ("cpu", "cuda"):
        xx = x.to(dev).requires_grad_(True)
        a = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in args]
        s, c = D.dice_ce_fwd(xx, target.to(dev), *a)
        gs = torch.linspace(-1, 1, s.numel(), dtype=torch.float64).view_as(s).to(dev)
        gc = torch.tensor([[0.3, 0.01, 0.0, 0.0]] * B, dtype=torch.float64, device=dev)
        (gx,) = torch.autograd.grad((s * gs).sum() + (c * gc).sum(), xx)
        res[dev] = (s.cpu(), c.cpu(), gx.cpu().double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)
    gtol = dict(rtol=1e-2, atol=1e-3) if dtype in (torch.float16, torch.bfloat16) else tol
    torch.testing.assert_close(res["cuda"][0], res["cpu"][0], **tol)
    torch.testing.assert_close(res["cuda"][1], res["cpu"][1], **tol)
    torch.testing.assert_close(res["cuda"][2], res["cpu"][2], **gtol)


def test_cuda_loss_vs_monai_and_deterministic():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 14, 64, 64, 48, generator=g).cuda()
    y = torch.randint(0, 14, (2, 1, 64, 64, 48), generator=g).cuda()
    kw = dict(to_onehot_y=True, softmax=True, include_background=False)
    outs = []
    for _ in range(2):
        xx = x.clone().requires_grad_(True)
        v = FL.DiceCELoss(**kw)(xx, y)
        (gx,) = torch.autograd.grad(v, xx)
        outs.append((v, gx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    xm = x.clone().requires_grad_(True)
    ref = monai_losses.DiceCELoss(**kw)(xm, y)
    (gm,) = torch.autograd.grad(ref, xm)
    torch.testing.assert_close(outs[0][0], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], gm, rtol=1e-4, atol=1e-4 * gm.abs().max().item())


def test_cuda_bad_label_raises():
    x = torch.randn(1, 3, 8, 8, 8, device="cuda")
    y = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long, device="cuda")
    y[0, 0, 1, 1, 1] = 7
    with pytest.raises(ValueError, match="target: labels must lie in"):
        FL.DiceCELoss(to_onehot_y=True, softmax=True)(x, y)


def test_cuda_large_index_117_classes():
    """117 classes on a volume whose logits pass 2^31 elements would need 64-bit indexing; a smaller
    volume with the same class count checks the many-class path."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 117, 40, 40, 40, generator=g).cuda()
    y = torch.randint(0, 117, (1, 1, 40, 40, 40), generator=g).cuda()
    a = FL.DiceCELoss(to_onehot_y=True, softmax=True)(x, y)
    b = FL.DiceCELoss(to_onehot_y=True, softmax=True)(x.cpu(), y.cpu())
    torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
