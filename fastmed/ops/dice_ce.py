"""``fastmed::dice_ce_fwd`` / ``fastmed::dice_ce_bwd``: fused soft-Dice statistics + cross-entropy.

One pass over logits and labels gives, per (batch, class), the four sums every soft Dice variant
(MONAI's DiceLoss / GeneralizedDiceLoss, nnU-Net's soft Dice) is built from, and per batch item the
sums the cross-entropy is built from. The losses in :mod:`fastmed.losses` turn these small float64
tensors into the loss with plain PyTorch, so autograd hands the backward kernel only the gradient
with respect to the statistics, and the backward kernel writes the logits' gradient in one pass.

Definitions (q = act(logits), m = voxel mask, y = one-hot(label) or the dense target, w = weight):

* ``stats[b, c] = (sum q*m*y*m, sum (q*m)^k, sum (y*m)^k, sum |q*m - y*m|)`` over voxels, with
  k = 2 when ``squared`` else 1 (|.| when ``soft`` and k = 1); the last sum only when ``soft``.
* softmax CE, label map: ``ce[b] = (sum w_t (lse - x_t), sum_c w_c (lse - x_c), sum w_t, count)``
  over voxels whose label is not ``ignore_index``; dense target: ``(sum m sum_c w_c y_c (lse - x_c),
  sum m sum_c w_c (lse - x_c), sum m sum_c w_c y_c, sum m)``.
* BCE with logits (w = pos_weight): ``ce[b] = (sum m sum_c [w_c y_c softplus(-x_c) +
  (1 - y_c) softplus(x_c)], 0, 0, C * sum m)``.

NaN or Inf logits propagate into the statistics exactly as they would through PyTorch's softmax
and sums (a NaN anywhere in a batch item's logits makes that item's sums NaN).
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext

ACT = {"none": 0, "sigmoid": 1, "softmax": 2}
CE = {"none": 0, "softmax": 1, "bce": 2}
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64)
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# tests set this to check the specialised CPU fast path against the general kernel
FORCE_GENERIC = False

__all__ = ["dice_ce_fwd", "dice_ce_bwd", "dice_ce_reference", "release_cached_memory", "ACT", "CE"]


def _collapse(t: Tensor, nlead: int) -> Tuple[Tensor, list]:
    """Strides (in elements) of the leading ``nlead`` dims and of the spatial dims collapsed into one.

    Returns the tensor (made contiguous only when its spatial dims cannot be addressed with a single
    stride, e.g. a sliced view) and ``[stride_0, ..., stride_{nlead-1}, spatial_stride]``.
    """
    sizes, strides = list(t.shape), list(t.stride())
    spatial = [(n, s) for n, s in zip(sizes[nlead:], strides[nlead:]) if n != 1]
    ok = all(spatial[i][1] == spatial[i + 1][1] * spatial[i + 1][0] for i in range(len(spatial) - 1))
    if not ok:
        t = t.contiguous()
        return _collapse(t, nlead)
    inner = spatial[-1][1] if spatial else 1
    return t, strides[:nlead] + [inner]


def _spatial_size(x: Tensor) -> int:
    s = 1
    for n in x.shape[2:]:
        s *= n
    return s


def _params(logits, target, mask, ce_weight, act, ce, dice, label_map, squared, soft, ignore_index):
    """Fill a DiceCEParams for the kernels; returns (params, tensors to keep alive)."""
    mod = _ext.require(logits.device, "dice_ce")
    p = mod.DiceCEParams()
    B, C = logits.shape[0], logits.shape[1]
    p.B, p.C, p.S = B, C, _spatial_size(logits)
    logits, (p.x_sb, p.x_sc, p.x_ss) = _collapse(logits, 2)
    p.x, p.x_dtype = logits.data_ptr(), _ext.DTYPE_CODES[logits.dtype]
    if label_map:
        target, (p.t_sb, _, p.t_ss) = _collapse(target, 2)
        p.t_sc = 0
    else:
        target, (p.t_sb, p.t_sc, p.t_ss) = _collapse(target, 2)
    p.t, p.t_dtype, p.label_map = target.data_ptr(), _ext.DTYPE_CODES[target.dtype], int(label_map)
    if mask is not None:
        mask, (m_sb, _, p.m_ss) = _collapse(mask, 2)
        p.m_sb = m_sb if mask.shape[0] > 1 else 0
        p.mask = mask.data_ptr()
    if ce_weight is not None:
        p.ce_weight = ce_weight.data_ptr()
    p.act, p.ce, p.dice, p.squared, p.soft = act, ce, int(dice), int(squared), int(soft)
    p.has_ignore = int(ignore_index is not None)
    p.ignore_index = int(ignore_index) if ignore_index is not None else 0
    p.num_threads = _ext.num_threads()
    p.force_generic = int(FORCE_GENERIC)
    p.stream = _ext.stream_ptr(logits.device)
    return mod, p, (logits, target, mask, ce_weight)


def _label_error(target: Tensor, C: int, ignore_index: Optional[int]) -> ValueError:
    t = target.reshape(-1)
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t.long() < 0) | (t.long() >= C)
    else:
        bad = (t < 0) | (t >= C)
    if ignore_index is not None:
        bad &= t != ignore_index
    vals = torch.unique(t[bad])[:8].tolist()
    ign = f" other than ignore_index={ignore_index}" if ignore_index is not None else ""
    return ValueError(
        f"target: labels must lie in [0, {C}) (the number of classes in input){ign}; "
        f"found {int(bad.sum())} voxels with values such as {vals}"
    )


@torch.library.custom_op("fastmed::dice_ce_fwd", mutates_args=())
def dice_ce_fwd(
    logits: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    ce_weight: Optional[Tensor],
    act: int,
    ce: int,
    dice: bool,
    label_map: bool,
    squared: bool,
    soft: bool,
    ignore_index: Optional[int],
    ce_smooth: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Per-(batch, class) Dice statistics (B, C, 4) and per-batch CE sums (B, 4), float64.

    ``ce_smooth=False`` lets the kernel skip ``ce[:, 1]`` (the all-class sum only label smoothing
    uses); it is then 0.
    """
    B, C = logits.shape[0], logits.shape[1]
    mod, p, keep = _params(logits, target, mask, ce_weight, act, ce, dice, label_map, squared, soft, ignore_index)
    p.skip_ce_smooth = int(not ce_smooth)
    stats = torch.empty((B, C, 4), dtype=torch.float64, device=logits.device)
    ce_out = torch.empty((B, 4), dtype=torch.float64, device=logits.device)
    ws = torch.empty((int(mod.dice_ce_workspace_size(B, C, p.S)),), dtype=torch.float64, device=logits.device)
    bad = torch.zeros((1,), dtype=torch.int64, device=logits.device)
    p.stats, p.ce_out, p.workspace, p.bad = stats.data_ptr(), ce_out.data_ptr(), ws.data_ptr(), bad.data_ptr()
    mod.dice_ce_fwd(p)
    del keep
    if label_map and int(bad.item()) > 0:
        raise _label_error(target, C, ignore_index)
    return stats, ce_out


@dice_ce_fwd.register_fake
def _(logits, target, mask, ce_weight, act, ce, dice, label_map, squared, soft, ignore_index, ce_smooth=True):
    B, C = logits.shape[0], logits.shape[1]
    return logits.new_empty((B, C, 4), dtype=torch.float64), logits.new_empty((B, 4), dtype=torch.float64)


class _GradCache:
    """One reusable CPU buffer for the logits' gradient.

    A CPU tensor of ~100 MB comes from a fresh mmap, and faulting its pages in costs more than the
    whole backward kernel on a small machine. Training calls the backward once per step with the
    same shape, and by then the previous gradient is usually gone, so keep its storage and hand it
    out again when nothing else refers to it any more (the storage's use count says so). A gradient
    that is still alive anywhere (x.grad kept, a view, a numpy array) is never reused.
    Turn off with ``FASTMED_CPU_GRAD_CACHE=0`` or :func:`release_cached_memory`.
    """

    enabled = os.environ.get("FASTMED_CPU_GRAD_CACHE", "1") != "0" and hasattr(torch._C, "_storage_Use_Count")
    lock = threading.Lock()
    storage = None


def release_cached_memory() -> None:
    """Drop the CPU gradient buffer fastmed keeps between backward calls."""
    with _GradCache.lock:
        _GradCache.storage = None


def _grad_buffer(x: Tensor) -> Tensor:
    if x.device.type != "cpu" or not _GradCache.enabled or x.numel() * x.element_size() < (1 << 22):
        return torch.empty_like(x)
    like = torch.empty_like(x, device="meta")
    nbytes = x.numel() * x.element_size()
    with _GradCache.lock:
        st = _GradCache.storage
        if st is not None and st.nbytes() == nbytes and torch._C._storage_Use_Count(st._cdata) == 1:
            return torch.empty(0, dtype=x.dtype).set_(st, 0, like.shape, like.stride())
        out = torch.empty_like(x)
        if out.is_contiguous(memory_format=torch.contiguous_format) or out.is_contiguous(
            memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last
        ):
            _GradCache.storage = out.untyped_storage()
        return out


@torch.library.custom_op("fastmed::dice_ce_bwd", mutates_args=())
def dice_ce_bwd(
    grad_stats: Tensor,
    grad_ce: Tensor,
    logits: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    ce_weight: Optional[Tensor],
    act: int,
    ce: int,
    dice: bool,
    label_map: bool,
    squared: bool,
    soft: bool,
    ignore_index: Optional[int],
    ce_smooth: bool = True,
) -> Tensor:
    """Gradient of ``sum(grad_stats * stats) + sum(grad_ce * ce)`` with respect to the logits."""
    mod, p, keep = _params(logits, target, mask, ce_weight, act, ce, dice, label_map, squared, soft, ignore_index)
    x = keep[0]
    dx = _grad_buffer(x)
    _, (p.dx_sb, p.dx_sc, p.dx_ss) = _collapse(dx, 2)
    grad_stats = grad_stats.to(torch.float64).contiguous()
    grad_ce = grad_ce.to(torch.float64).contiguous()
    p.grad_stats, p.grad_ce, p.dx = grad_stats.data_ptr(), grad_ce.data_ptr(), dx.data_ptr()
    mod.dice_ce_bwd(p)
    del keep
    return dx


@dice_ce_bwd.register_fake
def _(grad_stats, grad_ce, logits, target, mask, ce_weight, act, ce, dice, label_map, squared, soft, ignore_index,
      ce_smooth=True):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, mask, ce_weight = inputs[:4]
    ctx.save_for_backward(logits, target, mask, ce_weight)
    ctx.flags = inputs[4:]


def _backward(ctx, grad_stats, grad_ce):
    logits, target, mask, ce_weight = ctx.saved_tensors
    if grad_stats is None:
        grad_stats = logits.new_zeros((logits.shape[0], logits.shape[1], 4), dtype=torch.float64)
    if grad_ce is None:
        grad_ce = logits.new_zeros((logits.shape[0], 4), dtype=torch.float64)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.fastmed.dice_ce_bwd(grad_stats, grad_ce, logits, target, mask, ce_weight, *ctx.flags)
    return (dx,) + (None,) * 11


dice_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# float64 reference: the test oracle, and the fallback where no kernel applies
def dice_ce_reference(
    logits: Tensor,
    target: Tensor,
    mask: Optional[Tensor] = None,
    ce_weight: Optional[Tensor] = None,
    act: int = ACT["softmax"],
    ce: int = CE["softmax"],
    dice: bool = True,
    label_map: bool = True,
    squared: bool = False,
    soft: bool = False,
    ignore_index: Optional[int] = None,
    ce_smooth: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Plain-PyTorch float64 version of :func:`dice_ce_fwd` (builds the one-hot tensor; differentiable)."""
    x = logits.to(torch.float64)
    B, C = x.shape[0], x.shape[1]
    red = tuple(range(2, x.ndim))
    m = torch.ones_like(x[:, :1]) if mask is None else mask.to(torch.float64).expand_as(x[:, :1])
    if label_map:
        lab = target.long() if not target.is_floating_point() else target.to(torch.float64).trunc().long()
        valid = (lab >= 0) & (lab < C)
        if ignore_index is not None:
            valid &= lab != ignore_index
        m = m * valid
        cls = torch.arange(C, device=x.device).view((1, C) + (1,) * (x.ndim - 2))
        y = (torch.where(valid, lab, -1) == cls).to(torch.float64)  # one-hot (no data-dependent size: vmap)
    else:
        y = target.to(torch.float64)
    w = torch.ones(C, dtype=torch.float64, device=x.device) if ce_weight is None else ce_weight.to(torch.float64)
    wv = w.view((1, C) + (1,) * (x.ndim - 2))
    stats = torch.zeros((B, C, 4), dtype=torch.float64, device=x.device)
    if dice:
        q = {0: x, 1: torch.sigmoid(x), 2: torch.softmax(x, 1)}[act]
        qm, ym = q * m, y * m
        k = 2 if squared else 1
        pv = qm.pow(2) if squared else (qm.abs() if soft else qm)
        gv = ym.pow(2) if squared else (ym.abs() if soft else ym)
        dv = (qm - ym).abs() if soft else torch.zeros_like(qm)
        del k
        stats = torch.stack([(qm * ym).sum(red), pv.sum(red), gv.sum(red), dv.sum(red)], -1)
    ce_out = torch.zeros((B, 4), dtype=torch.float64, device=x.device)
    if ce == CE["softmax"]:
        nlogp = -torch.log_softmax(x, 1)
        mm = m[:, 0]
        a = (wv * y * nlogp).sum(1)
        s = (wv * nlogp).sum(1)
        if label_map:  # an ignored voxel adds nothing, whatever its logits (0 * inf would be NaN)
            a, s = torch.where(valid[:, 0], a, 0.0), torch.where(valid[:, 0], s, 0.0)
        wt = (wv * y).sum(1)
        ce_out = torch.stack([(a * mm).flatten(1).sum(1), (s * mm).flatten(1).sum(1),
                              (wt * mm).flatten(1).sum(1), mm.flatten(1).sum(1)], -1)
    elif ce == CE["bce"]:
        sp = torch.nn.functional.softplus
        l = (wv * y * sp(-x) + (1 - y) * sp(x)) * m
        z = torch.zeros(B, dtype=torch.float64, device=x.device)
        ce_out = torch.stack([l.flatten(1).sum(1), z, z, (m.expand_as(x)).flatten(1).sum(1)], -1)
    return stats, ce_out
