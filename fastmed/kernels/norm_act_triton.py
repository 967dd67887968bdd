"""Triton kernels for ``fastmed::norm_act`` (instance norm fused with ReLU / LeakyReLU / none) on
GPUs: the same arithmetic as ``csrc/norm_act/norm_act_cpu.cpp``.

One program per (n, c) plane of a contiguous (N, C, *spatial) tensor; the plane is streamed in
blocks of ``BLOCK`` elements, each lane adding its elements in order and the lanes summed at the end
(a fixed order: the same input gives the same bits). float32 / float64 planes accumulate in float64,
float16 / bfloat16 in float32.

- forward: pass 1 the mean, pass 2 the squared deviations (exact two-pass variance), pass 3
  ``y = act(x * a + (b - mean * a))`` with ``a = rstd * w`` (PyTorch's arithmetic); mean and rstd
  are stored in float64 for the backward. ``y`` may be ``x`` (in place).
- backward: pass 1 ``sum g`` and ``sum g * xhat`` with ``g = dy * act'(z)`` (z recomputed as in
  the forward), stored per plane (float64: the caller sums over n in order); pass 2
  ``dx = rstd w (g - mean(g) - xhat mean(g xhat))``.

Checked under ``TRITON_INTERPRET=1`` in CI (tests/test_norm_act_triton.py); not yet run on a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope.to(z.dtype))
    return z


@triton.jit
def _dact(z, dy, slope, ACT: tl.constexpr):
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * slope.to(dy.dtype))
    return dy


@triton.jit
def _coefficients(w_ptr, b_ptr, c, mean, rstd, XT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  ACC: tl.constexpr):
    """(w, a, beta) of channel c: z = x * a + beta, the coefficients rounded once to the type of the
    elementwise pass: x's own type for float32 / float64 (as the CPU kernel), float32 for float16 /
    bfloat16."""
    if HAS_W:
        w = tl.load(w_ptr + c).to(ACC)
    else:
        w = 1.0
    if HAS_B:
        b = tl.load(b_ptr + c).to(ACC)
    else:
        b = 0.0
    if XT == tl.float16 or XT == tl.bfloat16:
        a = (rstd * w).to(tl.float32)
        beta = (b - mean * rstd * w).to(tl.float32)
    else:
        a = (rstd * w).to(XT)
        beta = (b - mean * rstd * w).to(XT)
    return w, a, beta


@triton.jit
def _norm_act_fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, prm_ptr, C, S,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    pl = tl.program_id(0).to(tl.int64)
    c = pl % C
    base = pl * S
    offs = tl.arange(0, BLOCK).to(tl.int64)
    eps = tl.load(prm_ptr)
    slope = tl.load(prm_ptr + 1)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, S, BLOCK):
        idx = start + offs
        acc += tl.load(x_ptr + base + idx, mask=idx < S, other=0.0).to(ACC)
    mean = tl.sum(acc, 0) / S
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, S, BLOCK):
        idx = start + offs
        m = idx < S
        d = tl.where(m, tl.load(x_ptr + base + idx, mask=m, other=0.0).to(ACC) - mean, 0.0)
        acc2 += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, 0) / S + eps.to(ACC))
    tl.store(mean_ptr + pl, mean.to(tl.float64))
    tl.store(rstd_ptr + pl, rstd.to(tl.float64))
    w, a, beta = _coefficients(w_ptr, b_ptr, c, mean, rstd, x_ptr.dtype.element_ty, HAS_W, HAS_B, ACC)
    for start in range(0, S, BLOCK):
        idx = start + offs
        m = idx < S
        v = tl.load(x_ptr + base + idx, mask=m, other=0.0)
        z = v.to(a.dtype) * a + beta
        tl.store(y_ptr + base + idx, _act(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_act_bwd_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, prm_ptr, C, S,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    pl = tl.program_id(0).to(tl.int64)
    c = pl % C
    base = pl * S
    offs = tl.arange(0, BLOCK).to(tl.int64)
    slope = tl.load(prm_ptr + 1)
    mean = tl.load(mean_ptr + pl).to(ACC)
    rstd = tl.load(rstd_ptr + pl).to(ACC)
    w, a, beta = _coefficients(w_ptr, b_ptr, c, mean, rstd, x_ptr.dtype.element_ty, HAS_W, HAS_B, ACC)
    sdz = tl.zeros([BLOCK], dtype=ACC)
    sdzx = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, S, BLOCK):
        idx = start + offs
        m = idx < S
        v = tl.load(x_ptr + base + idx, mask=m, other=0.0)
        z = v.to(a.dtype) * a + beta
        g = _dact(z, tl.load(dy_ptr + base + idx, mask=m, other=0.0).to(ACC), slope, ACT)
        g = tl.where(m, g, 0.0)
        sdz += g
        sdzx += g * ((v.to(ACC) - mean) * rstd)
    s0 = tl.sum(sdz, 0)
    s1 = tl.sum(sdzx, 0)
    tl.store(db_ptr + pl, s0.to(tl.float64))
    tl.store(dw_ptr + pl, s1.to(tl.float64))
    c0 = rstd * w
    c1 = s0 / S
    c2 = s1 / S
    for start in range(0, S, BLOCK):
        idx = start + offs
        m = idx < S
        v = tl.load(x_ptr + base + idx, mask=m, other=0.0)
        z = v.to(a.dtype) * a + beta
        g = _dact(z, tl.load(dy_ptr + base + idx, mask=m, other=0.0).to(ACC), slope, ACT)
        dx = c0 * (g - c1 - (v.to(ACC) - mean) * rstd * c2)
        tl.store(dx_ptr + base + idx, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _scalars(eps: float, slope: float, device):
    """eps and the slope in float64 (a Python float argument reaches a GPU kernel as float32)."""
    import torch

    return torch.tensor([eps, slope], dtype=torch.float64, device=device)


def _acc(dtype) -> "tl.dtype":
    import torch

    return tl.float32 if dtype in (torch.float16, torch.bfloat16) else tl.float64


def norm_act_fwd(x, weight, bias, eps: float, slope: float, act: int, y, mean, rstd) -> None:
    """x, y: contiguous (N, C, *spatial) of one dtype (y may be x); weight / bias: (C,) or None, in
    x's dtype; mean, rstd: float64 (N * C,)."""
    planes, S = x.shape[0] * x.shape[1], x[0, 0].numel()
    if planes == 0 or S == 0:
        return
    _norm_act_fwd_kernel[(planes,)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        _scalars(eps, slope, x.device), x.shape[1], S, HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=int(act), ACC=_acc(x.dtype), BLOCK=BLOCK)


def norm_act_bwd(dy, x, weight, bias, mean, rstd, slope: float, act: int, dx, dw, db) -> None:
    """dy, x, dx: contiguous, one dtype; dw, db: float64 (N * C,) per-plane sums."""
    planes, S = x.shape[0] * x.shape[1], x[0, 0].numel()
    if planes == 0 or S == 0:
        return
    _norm_act_bwd_kernel[(planes,)](
        dy, x, dx, weight if weight is not None else x, bias if bias is not None else x, mean, rstd, dw, db,
        _scalars(0.0, slope, x.device), x.shape[1], S, HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=int(act), ACC=_acc(x.dtype), BLOCK=BLOCK)
