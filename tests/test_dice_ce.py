"""fastmed::dice_ce: the op against its float64 reference, MONAI's losses, gradcheck, opcheck."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastmed
from fastmed import losses as FL
from fastmed.ops import dice_ce as D

monai_losses = pytest.importorskip("monai.losses")

torch.manual_seed(0)


def _logits(B, C, spatial, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((B, C) + tuple(spatial), generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(B, C, spatial, dtype=torch.int64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (B, 1) + tuple(spatial), generator=g).to(dtype)


def _onehot(lab, C):
    return torch.nn.functional.one_hot(lab[:, 0].long(), C).movedim(-1, 1).float()


def _compare(fm_loss, mo_loss, x, y, rtol=1e-5, atol=1e-6, grad_atol=None):
    """Same value and same input gradient as MONAI, within float32 rounding."""
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = mo_loss(x1, y)
        b = fm_loss(x2, y)
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(b.float(), a.float(), rtol=rtol, atol=atol)
    (ga,) = torch.autograd.grad(a.sum(), x1)
    (gb,) = torch.autograd.grad(b.sum(), x2)
    scale = ga.abs().max().item() + 1e-30
    torch.testing.assert_close(gb.float(), ga.float(), rtol=1e-4, atol=grad_atol if grad_atol else 2e-5 * scale)
    assert ga.abs().max() > 0  # a gradient that is really there


# ------------------------------------------------------------------------------------------------
# the op against its float64 reference


def _op_args(act, ce, dice, label_map, squared, soft, ignore, C, weights, mask):
    return dict(act=act, ce=ce, dice=dice, label_map=label_map, squared=squared, soft=soft, ignore_index=ignore)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("ce", [0, 1, 2])
@pytest.mark.parametrize("label_map", [True, False])
@pytest.mark.parametrize("variant", ["plain", "squared", "soft", "weights+mask+ignore"])
def test_op_matches_reference(act, ce, label_map, variant):
    B, C, sp = 2, 4, (5, 6, 7)
    x = _logits(B, C, sp, torch.float64)
    lab = _labels(B, C, sp)
    squared, soft, ignore, w, mask = variant == "squared", variant == "soft", None, None, None
    if variant == "weights+mask+ignore":
        w = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float32)
        mask = (torch.rand((B, 1) + sp, generator=torch.Generator().manual_seed(3)) > 0.3).float()
        if label_map:
            ignore = 255
            lab[:, :, 0] = 255
    if label_map:
        target = lab
    else:
        g = torch.Generator().manual_seed(4)
        target = torch.softmax(torch.randn((B, C) + sp, generator=g, dtype=torch.float64), 1) if soft else _onehot(lab, C).double()
    args = (mask, w, act, ce, True, label_map, squared, soft, ignore)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    s1, c1 = D.dice_ce_fwd(x1, target, *args)
    s2, c2 = D.dice_ce_reference(x2, target, *args)
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c1, c2, rtol=1e-10, atol=1e-10)
    gs = torch.randn_like(s1)
    gc = torch.randn_like(c1)
    gc[:, 2:] = 0  # sum w_t and the count do not depend on the logits
    (g1,) = torch.autograd.grad((s1 * gs).sum() + (c1 * gc).sum(), x1)
    (g2,) = torch.autograd.grad((s2 * gs).sum() + (c2 * gc).sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ce", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_general_kernel(ce, dtype):
    x = _logits(2, 6, (9, 10, 11), dtype)
    lab = _labels(2, 6, (9, 10, 11), torch.uint8)
    lab[0, 0, 0] = 7
    w = torch.rand(6) + 0.5
    args = (lab, None, w, 2, ce, True, True, False, False, 7)
    outs = []
    for generic in (False, True):
        D.FORCE_GENERIC = generic
        try:
            xx = x.clone().requires_grad_(True)
            s, c = D.dice_ce_fwd(xx, *args)
            (g,) = torch.autograd.grad(s[..., :3].sum() * 0.3 + c[:, :2].sum() * 0.01, xx)
        finally:
            D.FORCE_GENERIC = False
        outs.append((s, c, g))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)


def test_gradcheck_float64():
    x = _logits(2, 3, (3, 4), torch.float64, scale=1.0).requires_grad_(True)
    lab = _labels(2, 3, (3, 4))
    w = torch.tensor([0.3, 1.0, 2.0])
    for act, ce, sq, soft in [(2, 1, False, False), (1, 0, True, False), (0, 2, False, True), (2, 1, True, True)]:
        target = lab if not soft else torch.softmax(_logits(2, 3, (3, 4), torch.float64, seed=5), 1)
        lm = not soft

        def f(x):
            s, c = D.dice_ce_fwd(x, target, None, w, act, ce, True, lm, sq, soft, None)
            return s.sum(-1) * torch.arange(1.0, 4.0, dtype=torch.float64), c[:, :2]

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_loss_gradcheck_float64():
    x = _logits(2, 4, (3, 5), torch.float64, scale=1.0).requires_grad_(True)
    lab = _labels(2, 4, (3, 5))
    loss = FL.DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, label_smoothing=0.1,
                         weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: loss(x, lab), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("label_map", [True, False])
def test_opcheck(label_map):
    x = _logits(2, 3, (4, 5), torch.float32).requires_grad_(True)
    lab = _labels(2, 3, (4, 5))
    target = lab if label_map else _onehot(lab, 3)
    torch.library.opcheck(torch.ops.fastmed.dice_ce_fwd.default,
                          (x, target, None, None, 2, 1, True, label_map, False, False, None))
    gs = torch.randn(2, 3, 4, dtype=torch.float64)
    gc = torch.randn(2, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastmed.dice_ce_bwd.default,
                          (gs, gc, x.detach(), target, None, None, 2, 1, True, label_map, False, False, None))


def test_torch_compile():
    """Every loss traces as one graph (fullgraph=True): same value and gradient as eager."""
    x = _logits(2, 3, (6, 7, 5)).requires_grad_(True)
    y = _labels(2, 3, (6, 7, 5))
    for loss in (FL.DiceCELoss(to_onehot_y=True, softmax=True), FL.DiceLoss(to_onehot_y=True, softmax=True),
                 FL.GeneralizedDiceLoss(to_onehot_y=True, softmax=True), FL.NNUNetDiceCELoss()):
        torch._dynamo.reset()
        eager = loss(x, y)
        (g_eager,) = torch.autograd.grad(eager, x)
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, y)
        (g_comp,) = torch.autograd.grad(compiled, x)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(g_comp, g_eager)


def test_deterministic_bit_identical_across_threads():
    x = _logits(2, 5, (33, 35, 37)).requires_grad_(True)
    y = _labels(2, 5, (33, 35, 37))
    loss = FL.DiceCELoss(to_onehot_y=True, softmax=True)
    results = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 1, 2):
            torch.set_num_threads(nt)
            v = loss(x, y)
            (g,) = torch.autograd.grad(v, x)
            results.append((v, g))
    finally:
        torch.set_num_threads(old)
    for v, g in results[1:]:
        assert torch.equal(v, results[0][0])
        assert torch.equal(g, results[0][1])


# ------------------------------------------------------------------------------------------------
# against MONAI

BOOL_OPTS = ["include_background", "squared_pred", "jaccard", "batch"]


@pytest.mark.parametrize("act", ["softmax", "sigmoid", "none", "other_act"])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_dice_loss_vs_monai_label_map(act, flags):
    kw = dict(zip(BOOL_OPTS, flags))
    kw["to_onehot_y"] = True
    if act == "softmax":
        kw["softmax"] = True
    elif act == "sigmoid":
        kw["sigmoid"] = True
    elif act == "other_act":
        kw["other_act"] = torch.tanh
    x = _logits(2, 4, (6, 5, 7))
    if act == "none":
        x = torch.softmax(x, 1)
    y = _labels(2, 4, (6, 5, 7))
    for reduction in ("mean", "sum", "none"):
        _compare(FL.DiceLoss(reduction=reduction, **kw), monai_losses.DiceLoss(reduction=reduction, **kw), x, y)


@pytest.mark.parametrize("soft_label", [False, True])
@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("weight", [None, 2.0, [0.5, 1.0, 2.0]])
def test_dice_loss_vs_monai_dense(soft_label, squared_pred, weight):
    x = _logits(3, 3, (8, 9))
    y = torch.softmax(_logits(3, 3, (8, 9), seed=9), 1) if soft_label else _onehot(_labels(3, 3, (8, 9)), 3)
    kw = dict(softmax=True, soft_label=soft_label, squared_pred=squared_pred, weight=weight, smooth_nr=0.0, smooth_dr=1e-6)
    _compare(FL.DiceLoss(**kw), monai_losses.DiceLoss(**kw), x, y)
    kw["include_background"] = False
    if isinstance(weight, list):
        kw["weight"] = weight[1:]
    _compare(FL.DiceLoss(**kw), monai_losses.DiceLoss(**kw), x, y)


@pytest.mark.parametrize("ignore_index", [0, 2, 255, -1])
def test_dice_loss_ignore_index_vs_monai(ignore_index):
    x = _logits(2, 4, (7, 8, 3))
    y = _labels(2, 4, (7, 8, 3))
    if ignore_index not in (0, 2):
        y[:, :, :2] = ignore_index
    kw = dict(to_onehot_y=True, softmax=True, ignore_index=ignore_index)
    _compare(FL.DiceLoss(**kw), monai_losses.DiceLoss(**kw), x, y)
    # one-hot target: MONAI's mask of the ignored channel, or of all-zero voxels for a sentinel
    oh = _onehot(y.clamp(0, 3), 4)
    if ignore_index not in (0, 2):
        oh[:, :, :, :, :1] = 0
    kw = dict(softmax=True, ignore_index=ignore_index)
    _compare(FL.DiceLoss(**kw), monai_losses.DiceLoss(**kw), x, oh)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float64])
def test_dicece_label_dtypes(label_dtype, logit_dtype):
    x = _logits(2, 5, (9, 7, 6), logit_dtype)
    y = _labels(2, 5, (9, 7, 6), label_dtype)
    kw = dict(to_onehot_y=True, softmax=True)
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x, y)


@pytest.mark.parametrize("opts", [
    dict(),
    dict(include_background=False),
    dict(batch=True, squared_pred=True),
    dict(jaccard=True, lambda_dice=0.3, lambda_ce=1.7),
    dict(label_smoothing=0.1),
    dict(weight="w"),
    dict(weight="w", include_background=False, label_smoothing=0.2),
    dict(reduction="sum"),
    dict(sigmoid_dice=True),
])
@pytest.mark.parametrize("target_kind", ["labels", "onehot"])
def test_dicece_vs_monai(opts, target_kind):
    opts = dict(opts)
    C = 4
    if opts.get("weight") == "w":
        opts["weight"] = torch.tensor([0.2, 1.0, 3.0, 0.7])
    act = dict(sigmoid=True) if opts.pop("sigmoid_dice", False) else dict(softmax=True)
    x = _logits(2, C, (7, 6, 5))
    lab = _labels(2, C, (7, 6, 5))
    if target_kind == "labels":
        y, kw = lab, dict(to_onehot_y=True, **act, **opts)
    else:
        y, kw = _onehot(lab, C), dict(**act, **opts)
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x, y)


def test_dicece_other_act_vs_monai():
    x = _logits(2, 3, (6, 7))
    y = _labels(2, 3, (6, 7))
    kw = dict(to_onehot_y=True, other_act=lambda t: torch.softmax(t * 0.5, 1))
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x, y)


@pytest.mark.parametrize("pos_weight", [None, [2.5]])
def test_dicece_single_channel_bce_vs_monai(pos_weight):
    x = _logits(3, 1, (9, 8, 4))
    y = (torch.rand(3, 1, 9, 8, 4, generator=torch.Generator().manual_seed(2)) > 0.6).float()
    w = torch.tensor(pos_weight) if pos_weight else None
    kw = dict(sigmoid=True, weight=w)
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x, y)


@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_generalized_dice_vs_monai(w_type, batch, include_background):
    x = _logits(2, 4, (6, 7, 5))
    y = _labels(2, 4, (6, 7, 5))
    y[0][y[0] == 3] = 1  # an absent class: infinite weight, replaced by the max as in MONAI
    for reduction in ("mean", "sum", "none"):
        kw = dict(to_onehot_y=True, softmax=True, w_type=w_type, batch=batch, include_background=include_background,
                  reduction=reduction)
        _compare(FL.GeneralizedDiceLoss(**kw), monai_losses.GeneralizedDiceLoss(**kw), x, y)


def test_generalized_dice_soft_label_vs_monai():
    x = _logits(2, 3, (6, 7))
    y = torch.softmax(_logits(2, 3, (6, 7), seed=7), 1)
    kw = dict(sigmoid=True, soft_label=True)
    _compare(FL.GeneralizedDiceLoss(**kw), monai_losses.GeneralizedDiceLoss(**kw), x, y)


@pytest.mark.parametrize("C", [1, 2, 117, 200])
def test_class_counts(C):
    x = _logits(1, C, (9, 10, 3))
    y = _labels(1, C, (9, 10, 3)) if C > 1 else (torch.rand(1, 1, 9, 10, 3) > 0.5).float()
    kw = dict(to_onehot_y=C > 1, softmax=C > 1, sigmoid=C == 1)
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x, y)


def test_2d_and_odd_sizes_and_layouts():
    x = _logits(2, 5, (37, 45, 29))
    y = _labels(2, 5, (37, 45, 29))
    kw = dict(to_onehot_y=True, softmax=True)
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x, y)
    # channels-last 3D logits and a non-contiguous (sliced) label map
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    big = _labels(2, 5, (37, 45, 58))
    ys = big[..., ::2]
    assert not ys.is_contiguous()
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), xc, ys)
    # permuted logits
    xp = x.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), xp, y)
    # 2D
    x2, y2 = _logits(3, 4, (33, 31)), _labels(3, 4, (33, 31))
    _compare(FL.DiceCELoss(**kw), monai_losses.DiceCELoss(**kw), x2, y2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    """fp16/bf16 logits accumulate in fp32: compare with MONAI run on the same values in fp32."""
    x = _logits(2, 4, (10, 9, 8), dtype)
    y = _labels(2, 4, (10, 9, 8))
    kw = dict(to_onehot_y=True, softmax=True)
    xh = x.clone().requires_grad_(True)
    v = FL.DiceCELoss(**kw)(xh, y)
    assert v.dtype == torch.float32
    (g,) = torch.autograd.grad(v, xh)
    assert g.dtype == dtype
    xf = x.float().requires_grad_(True)
    ref = monai_losses.DiceCELoss(**kw)(xf, y)
    (gref,) = torch.autograd.grad(ref, xf)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
    # the gradient is rounded once to the logits' precision
    torch.testing.assert_close(g.float(), gref, rtol=1e-2, atol=1e-2 * gref.abs().max().item())


# ------------------------------------------------------------------------------------------------
# nnU-Net's loss, against a plain PyTorch transcription of its formula


def _nnunet_reference(x, y, batch_dice, do_bg, smooth, ignore_label):
    x = x.double()
    mask = None
    if ignore_label is not None:
        mask = (y != ignore_label).double()
        y = torch.where(y != ignore_label, y, torch.zeros_like(y))
    p = torch.softmax(x, 1)
    oh = _onehot(y, x.shape[1]).double()
    if not do_bg:
        p, oh = p[:, 1:], oh[:, 1:]
    axes = tuple(range(2, x.ndim))
    m = 1.0 if mask is None else mask
    inter = (p * oh * m).sum(axes)
    pred = (p * m).sum(axes)
    gt = (oh * m).sum(axes)
    if batch_dice:
        inter, pred, gt = inter.sum(0), pred.sum(0), gt.sum(0)
    dc = ((2 * inter + smooth) / torch.clip(gt + pred + smooth, 1e-8)).mean()
    ce = torch.nn.functional.cross_entropy(x, y[:, 0].long() if ignore_label is None else torch.where(mask[:, 0] > 0, y[:, 0], ignore_label).long(),
                                           ignore_index=ignore_label if ignore_label is not None else -100)
    return ce - dc


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("do_bg", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_nnunet_loss(batch_dice, do_bg, ignore_label):
    C = 3 if ignore_label is not None else 4
    x = _logits(2, C, (8, 7, 6), torch.float64)
    y = _labels(2, 4, (8, 7, 6))  # with ignore_label=3: label 3 is the ignore label
    if ignore_label is None:
        y = y.clamp(max=C - 1)
    loss = FL.NNUNetDiceCELoss(batch_dice=batch_dice, do_bg=do_bg, ignore_label=ignore_label)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    v = loss(x1, y)
    r = _nnunet_reference(x2, y, batch_dice, do_bg, 1e-5, ignore_label)
    torch.testing.assert_close(v, r, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(v, x1)
    (g2,) = torch.autograd.grad(r, x2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_nnunet_loss_all_ignored_gives_zero_ce():
    x = _logits(1, 3, (4, 4, 4)).requires_grad_(True)
    y = torch.full((1, 1, 4, 4, 4), 9)
    v = FL.NNUNetDiceCELoss(ignore_label=9)(x, y)
    assert torch.isfinite(v)
    (g,) = torch.autograd.grad(v, x)
    assert torch.all(g == 0)


# ------------------------------------------------------------------------------------------------
# bad inputs: a clear Python exception naming the argument, never a crash or a wrong number


def test_label_out_of_range():
    x = _logits(1, 3, (4, 4, 4))
    for bad in (3, -1, 200):
        y = _labels(1, 3, (4, 4, 4))
        y[0, 0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="target: labels must lie in"):
            FL.DiceCELoss(to_onehot_y=True, softmax=True)(x, y)
    y = _labels(1, 3, (4, 4, 4)).float()
    y[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target"):
        FL.DiceLoss(to_onehot_y=True, softmax=True)(x, y)


def test_bad_weight_and_ignore_index_name_the_argument():
    x = _logits(1, 3, (4, 4, 4))
    y = _labels(1, 3, (4, 4, 4))
    with pytest.raises(ValueError, match="weight"):  # MONAI fails with a bare TypeError here
        FL.DiceCELoss(include_background=False, weight=2.0)
    for bad in (1.5, 2 ** 63, True, "1"):
        with pytest.raises(TypeError, match="ignore_index"):
            FL.DiceCELoss(to_onehot_y=True, softmax=True, ignore_index=bad)
        with pytest.raises(TypeError, match="ignore_index"):
            FL.DiceLoss(to_onehot_y=True, softmax=True, ignore_index=bad)
        with pytest.raises(TypeError, match="ignore_label"):
            FL.NNUNetDiceCELoss(ignore_label=bad)
    np = pytest.importorskip("numpy")
    a = FL.DiceCELoss(to_onehot_y=True, softmax=True, ignore_index=np.int64(1))(x, y)
    b = FL.DiceCELoss(to_onehot_y=True, softmax=True, ignore_index=1)(x, y)
    assert torch.equal(a, b)


def test_ignore_index_is_not_out_of_range():
    x = _logits(1, 3, (4, 4, 4))
    y = _labels(1, 3, (4, 4, 4))
    y[0, 0, 0] = 255
    v = FL.DiceCELoss(to_onehot_y=True, softmax=True, ignore_index=255)(x, y)
    assert torch.isfinite(v)


@pytest.mark.parametrize("case,exc,match", [
    ("empty_batch", ValueError, "input: empty batch"),
    ("shape", ValueError, "target"),
    ("ndim", ValueError, "target"),
    ("int_logits", TypeError, "input"),
    ("not_tensor", TypeError, "target"),
    ("channels", ValueError, "target"),
    ("reduction", ValueError, "reduction"),
    ("onehot_multi_channel", ValueError, "target"),
])
def test_bad_inputs(case, exc, match):
    x = _logits(2, 3, (4, 5, 6))
    y = _labels(2, 3, (4, 5, 6))
    loss = FL.DiceCELoss(to_onehot_y=True, softmax=True)
    with pytest.raises(exc, match=match):
        if case == "empty_batch":
            loss(x[:0], y[:0])
        elif case == "shape":
            loss(x, y[..., :5])
        elif case == "ndim":
            loss(x, y[:, 0])
        elif case == "int_logits":
            loss(x.long(), y)
        elif case == "not_tensor":
            loss(x, y.numpy())
        elif case == "channels":
            loss(x, torch.zeros(2, 2, 4, 5, 6))
        elif case == "reduction":
            FL.DiceCELoss(reduction="none")
        elif case == "onehot_multi_channel":
            FL.DiceLoss(to_onehot_y=True, softmax=True)(x, _onehot(y, 3))


def test_shape_error_is_also_assertion_error():
    x = _logits(2, 3, (4, 5, 6))
    with pytest.raises(AssertionError):
        FL.DiceLoss(softmax=True)(x, _labels(2, 3, (4, 5, 6)))


def test_cuda_tensor_on_cpu_build_says_how_to_rebuild():
    if fastmed._ext.cuda is not None:
        pytest.skip("this build has CUDA kernels")
    info = fastmed.build_info()
    assert "cpu" in info["backends"] and "cuda" not in info["backends"]
    assert "FASTMED_CUDA=ON" in info["cuda_missing_reason"]
    with pytest.raises(fastmed._ext.MissingBackendError, match="FASTMED_CUDA=ON"):
        fastmed._ext.require(torch.device("cuda"), "dice_ce")


def test_nan_and_inf_logits_propagate_like_pytorch():
    x = _logits(2, 3, (4, 5, 6))
    y = _labels(2, 3, (4, 5, 6))
    x[1, 0, 0, 0, 0] = float("nan")
    kw = dict(to_onehot_y=True, softmax=True, reduction="none")
    a = FL.DiceLoss(**kw)(x, y)
    b = monai_losses.DiceLoss(**kw)(x, y)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.isnan(a[1]).all() and torch.isfinite(a[0]).all()
    x[1, 0, 0, 0, 0] = float("inf")
    assert torch.isnan(FL.DiceCELoss(to_onehot_y=True, softmax=True)(x, y))
    assert torch.isnan(monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)(x, y))


def test_build_info():
    info = fastmed.build_info()
    assert info["version"] == fastmed.__version__
    assert info["cpu"]["isa"] in ("baseline", "avx2", "avx512")
    assert info["cpu"]["openmp"]


def test_cpu_gradient_buffer_is_reused_only_when_released():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64, 64, 64)
    y = torch.randint(0, 5, (2, 1, 64, 64, 64))
    loss = FL.DiceCELoss(to_onehot_y=True, softmax=True)
    xr = x.clone().requires_grad_(True)
    loss(xr, y).backward()
    g1 = xr.grad
    ref = g1.clone()
    xr.grad = None
    loss(xr, y).backward()  # g1 is still alive: must get a fresh buffer
    g2 = xr.grad
    assert g2.data_ptr() != g1.data_ptr()
    torch.testing.assert_close(g1, ref, rtol=0, atol=0)
    torch.testing.assert_close(g2, ref, rtol=0, atol=0)
    view = g2[:, :1]
    del g1, g2
    xr.grad = None
    loss(xr, y).backward()  # a view of g2 is alive: still no reuse of g2's storage
    assert xr.grad.data_ptr() != view.data_ptr()
    torch.testing.assert_close(view, ref[:, :1], rtol=0, atol=0)
    D.release_cached_memory()


def test_ce_smooth_flag_only_drops_the_smoothing_sum():
    torch.manual_seed(4)
    x = torch.randn(2, 6, 9, 10, 11)
    y = torch.randint(0, 6, (2, 1, 9, 10, 11))
    w = torch.rand(6) + 0.5
    for weight in (None, w):
        args = (x, y, None, weight, D.ACT["softmax"], D.CE["softmax"], True, True, False, False, None)
        s1, c1 = D.dice_ce_fwd(*args, True)
        s0, c0 = D.dice_ce_fwd(*args, False)
        torch.testing.assert_close(s0, s1, rtol=0, atol=0)
        torch.testing.assert_close(c0[:, [0, 2, 3]], c1[:, [0, 2, 3]], rtol=0, atol=0)
        assert (c0[:, 1] == 0).all() and (c1[:, 1] != 0).all()
    for eps in (0.0, 0.1):
        a = FL.DiceCELoss(to_onehot_y=True, softmax=True, label_smoothing=eps)(x, y)
        monai = pytest.importorskip("monai")
        b = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, label_smoothing=eps)(x, y)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_very_negative_logits_at_ignored_voxels_give_finite_gradients():
    x = torch.full((1, 3, 4, 4, 4), -200.0)
    x[:, 1] = -150.0
    y = torch.randint(0, 3, (1, 1, 4, 4, 4))
    y[..., 0] = 255
    xr = x.clone().requires_grad_(True)
    FL.DiceCELoss(to_onehot_y=True, softmax=True, ignore_index=255)(xr, y).backward()
    assert torch.isfinite(xr.grad).all()
    xd = x.double().requires_grad_(True)
    FL.DiceCELoss(to_onehot_y=True, softmax=True, ignore_index=255)(xd, y).backward()
    torch.testing.assert_close(xr.grad.double(), xd.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda L: L.DiceCELoss(to_onehot_y=True, softmax=True, include_background=False),
    lambda L: L.DiceLoss(sigmoid=True, squared_pred=True, to_onehot_y=True),
    lambda L: L.GeneralizedDiceLoss(to_onehot_y=True, softmax=True),
])
def test_torch_func_grad_vmap_and_per_sample_gradients(make):
    """Under torch.func (grad, vmap, their nesting for per-sample gradients) the losses compute in
    plain PyTorch (float64, as the reference): values and gradients still MONAI's."""
    monai_losses = pytest.importorskip("monai.losses")
    ours, theirs = make(FL), make(monai_losses)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 6, 7, 5, generator=g)
    y = torch.randint(0, 4, (3, 1, 6, 7, 5), generator=g)
    gx = torch.func.grad(lambda x: ours(x, y))(x)
    xm = x.clone().requires_grad_(True)
    (gm,) = torch.autograd.grad(theirs(xm, y), xm)
    torch.testing.assert_close(gx, gm, rtol=1e-4, atol=1e-7)
    one = lambda xi, yi: ours(xi[None], yi[None])  # noqa: E731
    per = torch.func.vmap(one)(x, y)
    torch.testing.assert_close(per, torch.stack([theirs(x[i:i + 1], y[i:i + 1]) for i in range(3)]),
                               rtol=1e-5, atol=1e-6)
    per_grad = torch.func.vmap(torch.func.grad(one))(x, y)
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(theirs(xi, y[i:i + 1]), xi)
        torch.testing.assert_close(per_grad[i:i + 1], gi, rtol=1e-4, atol=1e-7)


def test_torch_func_nnunet_loss_matches_autograd():
    loss = FL.NNUNetDiceCELoss(ignore_label=3)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 6, 7, 5, generator=g)
    y = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)
    xa = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(loss(xa, y), xa)
    torch.testing.assert_close(torch.func.grad(lambda x: loss(x, y))(x), ga, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# cases a differential fuzz against MONAI 1.6.1 found (18th session)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_minus_inf_logit_of_another_class_gives_a_finite_loss(dtype, act):
    """A -inf logit (a class masked out) at a voxel labelled otherwise: PyTorch's cross-entropy, and
    so MONAI's DiceCELoss, stay finite; the unused all-class sum (label smoothing's) made it NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    x[0, 2, 0, 0] = -float("inf")
    y = torch.ones(1, 1, 4, 4, dtype=torch.long)
    for lam_dice, lam_ce in [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]:
        kw = dict(to_onehot_y=True, softmax=act == "softmax", sigmoid=act == "sigmoid", lambda_dice=lam_dice,
                  lambda_ce=lam_ce)
        xf = x.to(dtype).requires_grad_(True)
        a = FL.DiceCELoss(**kw)(xf, y)
        a.backward()
        b = monai_losses.DiceCELoss(**kw)(x.to(dtype).double(), y)
        assert torch.isfinite(a) and torch.isfinite(xf.grad).all()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_class_weight_that_requires_grad_is_refused_as_in_pytorch():
    """PyTorch's cross-entropy is not differentiable in its class weight (MONAI raises); fastmed used
    to return the Dice term's part of the gradient only."""
    x = torch.randn(2, 3, 6, 6)
    y = torch.randint(0, 3, (2, 1, 6, 6))
    w = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="weight"):
        FL.DiceCELoss(to_onehot_y=True, softmax=True, weight=w)(x, y)
    with pytest.raises(RuntimeError, match="weight"):
        FL.DiceCELoss(sigmoid=True, weight=torch.tensor([2.0], requires_grad=True))(x[:, :1], (y > 0).float())
    with torch.no_grad():  # no gradient asked for: computed
        v = FL.DiceCELoss(to_onehot_y=True, softmax=True, weight=w)(x, y)
        ref = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, weight=w.detach())(x, y)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight.*pos_weight"):  # one class: BCE's pos_weight, one value
        FL.DiceCELoss(sigmoid=True, weight=torch.tensor([1.0, 2.0, 3.0]))(x[:, :1], (y > 0).float())


def test_float64_loss_keeps_float64_class_weights_and_soft_ignore_masks():
    """Float64 logits with a class weight or a soft ignore mask that float32 cannot hold: the
    result is MONAI's to float64 rounding (the kernels read both in float32; these take the float64
    reference)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 5, 6, 4), generator=g)
    w = torch.tensor([0.1, 0.7, 1.3], dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = FL.DiceCELoss(to_onehot_y=True, softmax=True, weight=w)(xa, y)
    b = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, weight=w)(xb, y)
    a.backward(), b.backward()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-15)
    t = torch.softmax(torch.randn(2, 3, 5, 6, 4, generator=g, dtype=torch.float64), 1)  # soft target
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = FL.DiceLoss(softmax=True, ignore_index=1)(xa, t)
    b = monai_losses.DiceLoss(softmax=True, ignore_index=1)(xb, t)
    a.backward(), b.backward()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-15)
    # the CE term's mask is soft too: against the float64 formula
    a = FL.DiceCELoss(softmax=True, ignore_index=1, lambda_dice=0.0)(x, t)
    m = 1 - t[:, 1]
    ref = (-(t * torch.log_softmax(x, 1)).sum(1) * m).sum() / m.sum()
    torch.testing.assert_close(a, ref, rtol=1e-13, atol=0)


def test_dicece_state_dict_keys_are_monais():
    """The class weight sits where MONAI's DiceCELoss keeps it: a checkpoint of a module holding
    the loss loads across the swap both ways; fastmed 0.1's key ``weight`` still loads."""
    w = torch.tensor([1.0, 2.0, 3.0])
    mo = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, weight=w)
    fm = FL.DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.ones(3))
    assert list(fm.state_dict()) == list(mo.state_dict())
    fm.load_state_dict(mo.state_dict())
    assert torch.equal(fm.weight, w) and torch.equal(fm.binary_cross_entropy.pos_weight, w)
    mo2 = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.ones(3))
    mo2.load_state_dict(fm.state_dict())
    x, y = torch.randn(2, 3, 4, 5, 6), torch.randint(0, 3, (2, 1, 4, 5, 6))
    torch.testing.assert_close(fm(x, y), mo2(x, y), rtol=1e-5, atol=1e-6)
    old = {"weight": torch.tensor([3.0, 2.0, 1.0]), "dice.class_weight": torch.tensor([3.0, 2.0, 1.0])}
    fm.load_state_dict(old)
    assert torch.equal(fm.cross_entropy.weight, old["weight"])
    assert list(FL.DiceCELoss().state_dict()) == list(monai_losses.DiceCELoss().state_dict()) == []


def test_ignore_index_given_as_an_integral_float():
    """MONAI compares the target with ignore_index, so 1.0 works as 1; 1.5 is still refused."""
    x, y = _logits(2, 3, (5, 6, 4)), _labels(2, 3, (5, 6, 4))
    a = FL.DiceLoss(to_onehot_y=True, softmax=True, ignore_index=1.0)(x, y)
    b = FL.DiceLoss(to_onehot_y=True, softmax=True, ignore_index=1)(x, y)
    c = monai_losses.DiceLoss(to_onehot_y=True, softmax=True, ignore_index=1.0)(x, y)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="ignore_index"):
        FL.DiceLoss(ignore_index=1.5)


# ------------------------------------------------------------------------------------------------
# cases a differential fuzz against MONAI 1.6.1 found (23rd session)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_ignored_voxel_with_infinite_logits_adds_nothing(generic, dtype, weighted):
    """An ignored voxel contributes nothing to PyTorch's cross-entropy whatever its logits; with
    label smoothing the float32 fast path multiplied its infinite all-class sum by 0 (NaN)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 9, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 1, 9, 10), generator=g)
    y[0, 0, 1, 2] = y[1, 0, 3, 3] = y[1, 0, 8, 9] = 2  # ignored
    x[0, 3, 1, 2] = x[1, 0, 3, 3] = -float("inf")  # a class masked out at an ignored voxel
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    for ls in (0.0, 0.3):
        kw = dict(to_onehot_y=True, softmax=True, lambda_dice=0.0, ignore_index=2, label_smoothing=ls)
        D.FORCE_GENERIC = generic
        try:
            xf = x.to(dtype).clone().requires_grad_(True)
            a = FL.DiceCELoss(weight=None if w is None else w.to(dtype), **kw)(xf, y)
            a.backward()
        finally:
            D.FORCE_GENERIC = False
        xr = x.clone().requires_grad_(True)
        b = F.cross_entropy(xr, y[:, 0], weight=w, ignore_index=2, label_smoothing=ls)
        b.backward()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
        torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=tol, atol=tol)
        # the float64 reference (torch.func's fallback) agrees
        r = torch.func.grad(lambda t: FL.DiceCELoss(weight=w, **kw)(t, y))(x)
        torch.testing.assert_close(r, xr.grad, rtol=1e-12, atol=1e-12)
