"""Triton kernels for ``fastmed::norm_act`` (instance norm fused with ReLU / LeakyReLU / PReLU / none) on
GPUs: the same arithmetic as ``csrc/norm_act/norm_act_cpu.cpp``, spread over the whole GPU.

``x`` is seen as (N, C, S) with strides (sN, sC, sS): a contiguous (N, C, *spatial) tensor
(sS = 1) or a channels-last one (NDHWC / NHWC, sC = 1) is read as it is, never copied. Each program
takes a tile of ``BLOCK_S`` voxels x ``BLOCK_C`` channels of one sample (the layout's contiguous
axis is the tile's fast axis, so loads are coalesced either way); a contiguous plane of 96^3
voxels is split over 108 statistics programs instead of one.

- forward, 3 launches: (1) per (n, chunk of ``CHUNK`` voxels, c) the chunk's sum and its squared
  deviations from the chunk mean (exact two-pass inside the chunk; a chunk is at most 8192
  elements, so its second read should come from cache - not yet measured on a GPU); (2) per (n, c), in chunk order, the exact merge ``M2 = sum(M2_k + n_k (m_k - m)^2)``
  in float64 -> mean, rstd (stored in float64 for the backward) and the coefficients
  ``a = rstd * w``, ``beta = b - (mean - sh) * rstd * w`` rounded once to the elementwise type (x's
  own for float32 / float64 as the CPU kernel, float32 for float16 / bfloat16), sh = 0 or, on a
  plane whose mean is far from 0 against its spread, the mean rounded to that type (_shift_of);
  (3) elementwise ``y = act((x - sh) * a + beta)``. ``y`` may be ``x`` (in place).
- backward, 3 launches: (1) per chunk ``sum g`` and ``sum g * xhat`` with ``g = dy * act'(z)``
  (z recomputed as in the forward); (2) per (n, c) the chunk sums added in order (float64), kept per
  plane for dweight / dbias (the caller sums over n in order; finish_sums, which also takes the
  partial sums a chain's data-gradient epilogue produces instead of (1)); (3) elementwise
  ``dx = rstd w (g - mean(g) - xhat mean(g xhat))``. PReLU (act 3) also sums ``dy * z`` over
  ``z <= 0`` per chunk and plane, for its weight's gradient.
Partial sums go to buffers and are added in a fixed order (no atomics): the same input gives the
same bits. float32 / float64 accumulate in float64, float16 / bfloat16 in float32 (the merges are
float64 always).

Checked under ``TRITON_INTERPRET=1`` in CI (tests/test_norm_act_triton.py); not yet run on a GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TILE = 2048        # elements per tile (BLOCK_S * BLOCK_C)
CHUNK_MAX = 8192   # voxels per statistics program (at most); a multiple of every BLOCK_S
BLOCK_P = 128      # planes per finalising program
SHIFT_ABOVE = 8.0  # |mean| * rstd above which the elementwise pass subtracts the mean first (_shift_of)


@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z <= 0, 0.0, z)  # NaN passes, as torch.relu
    elif ACT >= 2:  # LeakyReLU (a scalar slope) or PReLU (a [1, BLOCK_C] row of slopes)
        z = tl.where(z > 0, z, z * slope.to(z.dtype))
    return z


@triton.jit
def _dact(z, dy, slope, ACT: tl.constexpr):
    if ACT == 1:  # as torch's ReLU backward, which tests the output: a NaN passes the gradient
        dy = tl.where(z <= 0, 0.0, dy)
    elif ACT >= 2:
        dy = tl.where(z > 0, dy, dy * slope.to(dy.dtype))
    return dy


@triton.jit
def _slope(prm_ptr, pw_ptr, pw_stride, cs, cm, ACT: tl.constexpr):
    """The negative slope: LeakyReLU's scalar, or PReLU's weights of channels cs as a [1, BLOCK_C]
    row (pw_stride 0: one weight for all channels)."""
    if ACT == 3:
        return tl.load(pw_ptr + cs * pw_stride, mask=cm, other=0.0)[None, :]
    else:
        return tl.load(prm_ptr + 1)


@triton.jit
def _xhat_terms(mean_ptr, rstd_ptr, pc, cm, ACC: tl.constexpr):
    """(mean, rstd, xc) in ACC for xhat = (x - mean) * rstd + xc: xc = (mean_ACC - mean) * rstd
    corrects for the mean's rounding to ACC (0 for float64; for half types' float32 it keeps xhat
    exact on a plane whose mean is far from 0 against its spread)."""
    m64 = tl.load(mean_ptr + pc, mask=cm, other=0.0)
    r64 = tl.load(rstd_ptr + pc, mask=cm, other=0.0)
    mean = m64.to(ACC)
    return mean, r64.to(ACC), ((mean.to(tl.float64) - m64) * r64).to(ACC)


@triton.jit
def _tile(n, cb, s0, C, S, sN, sC, sS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (in elements) and mask of the [BLOCK_S, BLOCK_C] tile at voxel s0, channel block cb."""
    ss = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    offs = n * sN + ss[:, None] * sS + cs[None, :] * sC
    mask = (ss < S)[:, None] & (cs < C)[None, :]
    return offs, mask, cs


@triton.jit
def _fwd_partial_kernel(x_ptr, psum_ptr, pm2_ptr, C, S, sN, sC, sS, NCH, CHUNK,
                        ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    s0 = k.to(tl.int64) * CHUNK
    s1 = tl.minimum(s0 + CHUNK, S)
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    for start in range(s0, s1, BLOCK_S):
        offs, m, cs = _tile(n, cb, start, C, s1, sN, sC, sS, BLOCK_S, BLOCK_C)
        acc += tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
    tot = tl.sum(acc, 0)
    mean = tot / (s1 - s0).to(ACC)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    for start in range(s0, s1, BLOCK_S):
        offs, m, cs = _tile(n, cb, start, C, s1, sN, sC, sS, BLOCK_S, BLOCK_C)
        d = tl.where(m, tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC) - mean[None, :], 0.0)
        acc2 += d * d
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    po = (n * NCH + k) * C + cs
    tl.store(psum_ptr + po, tot, mask=cs < C)
    tl.store(pm2_ptr + po, tl.sum(acc2, 0), mask=cs < C)


@triton.jit
def _fwd_finalize_kernel(psum_ptr, pm2_ptr, w_ptr, b_ptr, prm_ptr, mean_ptr, rstd_ptr, a_ptr, beta_ptr, sh_ptr,
                         NC, C, S, NCH, CHUNK, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         BLOCK_P: tl.constexpr, MOMENTS: tl.constexpr = False, SHIFT_ABOVE: tl.constexpr = 8.0):
    """Per plane: mean and rstd (float64) and the elementwise coefficients a, beta; with MOMENTS
    the plane's mean and squared deviations M2 instead (into mean_ptr, rstd_ptr), for group and
    batch norm, whose statistics merge several planes."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pm = p < NC
    n = p // C
    c = p % C
    tot = tl.zeros([BLOCK_P], dtype=tl.float64)
    for k in range(0, NCH):
        tot += tl.load(psum_ptr + (n * NCH + k) * C + c, mask=pm, other=0.0).to(tl.float64)
    mean = tot / S
    m2 = tl.zeros([BLOCK_P], dtype=tl.float64)
    left = tl.full([], 0, tl.int64) + S  # voxels from chunk k on (int64: k * CHUNK may pass 2^31)
    for k in range(0, NCH):
        po = (n * NCH + k) * C + c
        cnt = tl.minimum(left, CHUNK).to(tl.float64)
        left -= CHUNK
        d = tl.load(psum_ptr + po, mask=pm, other=0.0).to(tl.float64) / cnt - mean
        m2 += tl.load(pm2_ptr + po, mask=pm, other=0.0).to(tl.float64) + cnt * d * d
    tl.store(mean_ptr + p, mean, mask=pm)
    if MOMENTS:
        tl.store(rstd_ptr + p, m2, mask=pm)
    else:
        rstd = 1.0 / tl.sqrt(m2 / S + tl.load(prm_ptr))
        if HAS_W:
            w = tl.load(w_ptr + c, mask=pm, other=1.0).to(tl.float64)
        else:
            w = tl.full([BLOCK_P], 1.0, tl.float64)
        if HAS_B:
            b = tl.load(b_ptr + c, mask=pm, other=0.0).to(tl.float64)
        else:
            b = tl.zeros([BLOCK_P], dtype=tl.float64)
        tl.store(rstd_ptr + p, rstd, mask=pm)
        tl.store(a_ptr + p, (rstd * w).to(a_ptr.dtype.element_ty), mask=pm)
        # z = (x - sh) a + beta, beta = b - (mean - sh) a: the shift as _shift_of's
        sh = tl.where(tl.abs(mean) * rstd > SHIFT_ABOVE, mean.to(sh_ptr.dtype.element_ty), 0.0)
        tl.store(sh_ptr + p, sh, mask=pm)
        tl.store(beta_ptr + p, (b - (mean - sh.to(tl.float64)) * rstd * w).to(beta_ptr.dtype.element_ty), mask=pm)


@triton.jit
def _fwd_apply_kernel(x_ptr, y_ptr, a_ptr, beta_ptr, sh_ptr, prm_ptr, pw_ptr, pw_stride, C, S, sN, sC, sS,
                      ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    sb = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs, m, cs = _tile(n, cb, sb.to(tl.int64) * BLOCK_S, C, S, sN, sC, sS, BLOCK_S, BLOCK_C)
    a = tl.load(a_ptr + n * C + cs, mask=cs < C, other=0.0)
    beta = tl.load(beta_ptr + n * C + cs, mask=cs < C, other=0.0)
    sh = tl.load(sh_ptr + n * C + cs, mask=cs < C, other=0.0)
    v = tl.load(x_ptr + offs, mask=m, other=0.0)
    z = (v.to(a.dtype) - sh[None, :]) * a[None, :] + beta[None, :]
    slope = _slope(prm_ptr, pw_ptr, pw_stride, cs, cs < C, ACT)
    tl.store(y_ptr + offs, _act(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_partial_kernel(dy_ptr, x_ptr, a_ptr, beta_ptr, sh_ptr, mean_ptr, rstd_ptr, prm_ptr, pw_ptr, pw_stride, ps0_ptr,
                        ps1_ptr, ps2_ptr, C, S, sN, sC, sS, NCH, CHUNK, ACT: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    s0 = k.to(tl.int64) * CHUNK
    s1 = tl.minimum(s0 + CHUNK, S)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cm = cs < C
    a = tl.load(a_ptr + n * C + cs, mask=cm, other=0.0)
    beta = tl.load(beta_ptr + n * C + cs, mask=cm, other=0.0)
    sh = tl.load(sh_ptr + n * C + cs, mask=cm, other=0.0)
    mean, rstd, xc = _xhat_terms(mean_ptr, rstd_ptr, n * C + cs, cm, ACC)
    slope = _slope(prm_ptr, pw_ptr, pw_stride, cs, cm, ACT)
    sdz = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    sdzx = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    sdp = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    for start in range(s0, s1, BLOCK_S):
        offs, m, cs = _tile(n, cb, start, C, s1, sN, sC, sS, BLOCK_S, BLOCK_C)
        v = tl.load(x_ptr + offs, mask=m, other=0.0)
        z = (v.to(a.dtype) - sh[None, :]) * a[None, :] + beta[None, :]
        d = tl.load(dy_ptr + offs, mask=m, other=0.0).to(ACC)
        g = _dact(z, d, slope, ACT)
        g = tl.where(m, g, 0.0)
        sdz += g
        sdzx += g * ((v.to(ACC) - mean[None, :]) * rstd[None, :] + xc[None, :])
        if ACT == 3:  # PReLU's weight: dy * z where z <= 0
            sdp += tl.where(m & (z <= 0), d * z.to(ACC), 0.0)
    po = (n * NCH + k) * C + cs
    tl.store(ps0_ptr + po, tl.sum(sdz, 0), mask=cm)
    tl.store(ps1_ptr + po, tl.sum(sdzx, 0), mask=cm)
    if ACT == 3:
        tl.store(ps2_ptr + po, tl.sum(sdp, 0), mask=cm)


@triton.jit
def _bwd_finalize_kernel(ps0_ptr, ps1_ptr, ps2_ptr, w_ptr, rstd_ptr, db_ptr, dw_ptr, dp_ptr, c0_ptr, c1_ptr, c2_ptr,
                         NC, C, S, NCH, HAS_W: tl.constexpr, PRELU: tl.constexpr, BLOCK_P: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pm = p < NC
    n = p // C
    c = p % C
    s0 = tl.zeros([BLOCK_P], dtype=tl.float64)
    s1 = tl.zeros([BLOCK_P], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_P], dtype=tl.float64)
    for k in range(0, NCH):
        po = (n * NCH + k) * C + c
        s0 += tl.load(ps0_ptr + po, mask=pm, other=0.0).to(tl.float64)
        s1 += tl.load(ps1_ptr + po, mask=pm, other=0.0).to(tl.float64)
        if PRELU:
            s2 += tl.load(ps2_ptr + po, mask=pm, other=0.0).to(tl.float64)
    if PRELU:
        tl.store(dp_ptr + p, s2, mask=pm)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=pm, other=1.0).to(tl.float64)
    else:
        w = tl.full([BLOCK_P], 1.0, tl.float64)
    rstd = tl.load(rstd_ptr + p, mask=pm, other=0.0)
    tl.store(db_ptr + p, s0, mask=pm)
    tl.store(dw_ptr + p, s1, mask=pm)
    tl.store(c0_ptr + p, rstd * w, mask=pm)
    tl.store(c1_ptr + p, s0 / S, mask=pm)
    tl.store(c2_ptr + p, s1 / S, mask=pm)


@triton.jit
def _bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, a_ptr, beta_ptr, sh_ptr, mean_ptr, rstd_ptr, c0_ptr, c1_ptr, c2_ptr,
                      prm_ptr, pw_ptr, pw_stride, C, S, sN, sC, sS, ACT: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SETS: tl.constexpr = False,
                      FIXED: tl.constexpr = False):
    """dx = c0 (g - c1 - xhat c2) per plane (instance norm); with SETS (group / batch norm, whose
    means run over several planes) dx = c0 g - c1 - xhat c2."""
    sb = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs, m, cs = _tile(n, cb, sb.to(tl.int64) * BLOCK_S, C, S, sN, sC, sS, BLOCK_S, BLOCK_C)
    cm = cs < C
    pc = n * C + cs
    a = tl.load(a_ptr + pc, mask=cm, other=0.0)
    beta = tl.load(beta_ptr + pc, mask=cm, other=0.0)
    sh = tl.load(sh_ptr + pc, mask=cm, other=0.0)
    mean, rstd, xc = _xhat_terms(mean_ptr, rstd_ptr, pc, cm, ACC)
    c0 = tl.load(c0_ptr + pc, mask=cm, other=0.0).to(ACC)
    c1 = tl.load(c1_ptr + pc, mask=cm, other=0.0).to(ACC)
    c2 = tl.load(c2_ptr + pc, mask=cm, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=m, other=0.0)
    z = (v.to(a.dtype) - sh[None, :]) * a[None, :] + beta[None, :]
    g = _dact(z, tl.load(dy_ptr + offs, mask=m, other=0.0).to(ACC), _slope(prm_ptr, pw_ptr, pw_stride, cs, cm, ACT),
              ACT)
    xhat = (v.to(ACC) - mean[None, :]) * rstd[None, :] + xc[None, :]
    if FIXED:  # given statistics (batch norm in eval): no xhat term, so an infinite x gives no NaN
        dx = c0[None, :] * g
    elif SETS:
        dx = c0[None, :] * g - c1[None, :] - xhat * c2[None, :]
    else:
        dx = c0[None, :] * (g - c1[None, :] - xhat * c2[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# launchers

_SCALARS: dict = {}
# no contraction of (x - sh) * a + beta into an FMA: the same roundings as the C++ kernel
_NOFMA = {"enable_fp_fusion": False}


def _scalars(eps: float, slope: float, device):
    """eps and the slope in float64 (a Python float argument reaches a GPU kernel as float32), cached
    per device: a fresh host-to-device copy per call would synchronise and break CUDA graphs."""
    key = (float(eps), float(slope), str(device))
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 256:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor([eps, slope], dtype=torch.float64, device=device)
    return t


def _guard(device):
    """Launch on x's GPU (Triton launches on the current device)."""
    from .. import _ext

    return _ext.device_guard(device)


def _acc(dtype):
    return tl.float32 if dtype in (torch.float16, torch.bfloat16) else tl.float64


def _coef_dtype(dtype):
    """The elementwise pass's type: x's own for float32 / float64, float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _geometry(x):
    """(N, C, S, sN, sC, sS, BLOCK_S, BLOCK_C) of a contiguous or channels-last x."""
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if x.is_contiguous():
        sN, sC, sS = C * S, S, 1
        block_c = 1 if S >= TILE else min(triton.next_power_of_2(C), max(1, TILE // triton.next_power_of_2(S)))
    else:  # channels last: (N, *spatial, C) in memory
        sN, sC, sS = S * C, 1, C
        block_c = min(triton.next_power_of_2(C), 128)
    block_s = max(1, TILE // block_c)
    return N, C, S, sN, sC, sS, block_s, block_c


def is_supported_layout(x) -> bool:
    """The kernels read x as it is: contiguous or dense channels last (4D / 5D)."""
    if x.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _chunks(S: int, block_s: int, block_c: int = 1):
    """Voxels per statistics program: CHUNK_MAX elements (voxels x the tile's channels), a multiple
    of block_s, and at most ~64k chunks per plane (the finalising programs loop over them)."""
    chunk = max(block_s, min(max(CHUNK_MAX // block_c, triton.cdiv(S, 65536)), triton.next_power_of_2(S)))
    chunk = (chunk + block_s - 1) // block_s * block_s
    return chunk, triton.cdiv(S, chunk)


@triton.jit
def _group_slot(C, NCH, G, BLOCK_C: tl.constexpr):
    """This program's group k of G chunks [k0, k1) of sample n, channels cs (mask cm)."""
    k = tl.program_id(0)
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    k0 = k.to(tl.int64) * G
    return k, n, cs, cs < C, k0, tl.minimum(k0 + G, NCH)


def _grouped(kernel, a, b, N: int, C: int, nch: int, *extra):
    """Runs a group kernel over (N, nch, C) chunk buffers a, b: groups of G chunks, at most
    MERGE_ABOVE / 2 groups per plane; returns (its two (N, ng, C) float64 outputs, G)."""
    G = triton.next_power_of_2(triton.cdiv(nch, MERGE_ABOVE // 2))
    ng = triton.cdiv(nch, G)
    o0 = torch.empty((N, ng, C), dtype=torch.float64, device=a.device)
    o1 = torch.empty_like(o0)
    bc = min(triton.next_power_of_2(C), 128)
    kernel[(ng, triton.cdiv(C, bc), N)](a, b, o0, o1, C, *extra, nch, ng, G, BLOCK_C=bc, **_NOFMA)
    return o0, o1, G


@triton.jit
def _merge_chunks_kernel(psum_ptr, pm2_ptr, osum_ptr, om2_ptr, C, S, CHUNK, NCH, NG, G,
                         BLOCK_C: tl.constexpr):
    """Groups of G consecutive chunks -> one chunk of G * CHUNK voxels (sum, and squared deviations
    from the group mean: the exact merge, in float64, chunks in order). (N, NCH, C) -> (N, NG, C)."""
    k, n, cs, cm, k0, k1 = _group_slot(C, NCH, G, BLOCK_C)
    tot = tl.zeros([BLOCK_C], dtype=tl.float64)
    for j in range(k0, k1):
        tot += tl.load(psum_ptr + (n * NCH + j) * C + cs, mask=cm, other=0.0).to(tl.float64)
    v0 = k0 * CHUNK
    cnt_g = (tl.minimum(v0 + G * CHUNK, S) - v0).to(tl.float64)
    mean = tot / cnt_g
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for j in range(k0, k1):
        po = (n * NCH + j) * C + cs
        cnt = (tl.minimum(j * CHUNK + CHUNK, S) - j * CHUNK).to(tl.float64)
        d = tl.load(psum_ptr + po, mask=cm, other=0.0).to(tl.float64) / cnt - mean
        m2 += tl.load(pm2_ptr + po, mask=cm, other=0.0).to(tl.float64) + cnt * d * d
    oo = (n * NG + k) * C + cs
    tl.store(osum_ptr + oo, tot, mask=cm)
    tl.store(om2_ptr + oo, m2, mask=cm)


@triton.jit
def _sum_chunks_kernel(p0_ptr, p1_ptr, o0_ptr, o1_ptr, C, NCH, NG, G, BLOCK_C: tl.constexpr):
    """Groups of G consecutive chunks' two sums added in order (float64): (N, NCH, C) -> (N, NG, C)."""
    k, n, cs, cm, k0, k1 = _group_slot(C, NCH, G, BLOCK_C)
    s0 = tl.zeros([BLOCK_C], dtype=tl.float64)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for j in range(k0, k1):
        po = (n * NCH + j) * C + cs
        s0 += tl.load(p0_ptr + po, mask=cm, other=0.0).to(tl.float64)
        s1 += tl.load(p1_ptr + po, mask=cm, other=0.0).to(tl.float64)
    oo = (n * NG + k) * C + cs
    tl.store(o0_ptr + oo, s0, mask=cm)
    tl.store(o1_ptr + oo, s1, mask=cm)


MERGE_ABOVE = 512  # more chunks per plane than this: merged in parallel groups first


def _pw(prelu, prm):
    """(PReLU weights or a dummy pointer, their stride over channels: 0 for one shared weight)."""
    if prelu is None:
        return prm, 0
    return prelu, int(prelu.numel() > 1)


def _acc_t(dtype):
    return torch.float32 if _acc(dtype) == tl.float32 else torch.float64


def _partial_stats(x):
    """(psum, pm2, chunk): per (n, chunk of ``chunk`` voxels, c) the chunk's sum and its squared
    deviations from the chunk mean, (N, nch, C)."""
    N, C, S, sN, sC, sS, bs, bc = _geometry(x)
    chunk, nch = _chunks(S, bs, bc)
    psum = torch.empty((N, nch, C), dtype=_acc_t(x.dtype), device=x.device)
    pm2 = torch.empty_like(psum)
    _fwd_partial_kernel[(nch, triton.cdiv(C, bc), N)](x, psum, pm2, C, S, sN, sC, sS, nch, chunk,
                                                      ACC=_acc(x.dtype), BLOCK_S=bs, BLOCK_C=bc, **_NOFMA)
    return psum, pm2, chunk


def _merged(psum, pm2, chunk: int, S: int):
    """Many small chunks (a convolution's tiles: 16k per 128^3 plane) merged in groups by many
    programs first, so that the per-plane finalising loop stays short: (psum, pm2, chunk)."""
    N, nch, C = psum.shape
    if nch > MERGE_ABOVE:
        psum, pm2, G = _grouped(_merge_chunks_kernel, psum, pm2, N, C, nch, S, chunk)
        chunk *= G
    return psum, pm2, chunk


def _apply(x, y, a, beta, sh, prm, act: int, prelu) -> None:
    """y = act((x - sh) * a + beta), a / beta / sh per plane (N * C)."""
    N, C, S, sN, sC, sS, bs, bc = _geometry(x)
    _fwd_apply_kernel[(triton.cdiv(S, bs), triton.cdiv(C, bc), N)](x, y, a, beta, sh, prm, *_pw(prelu, prm), C, S,
                                                                  sN, sC, sS, ACT=int(act), BLOCK_S=bs, BLOCK_C=bc,
                                                                  **_NOFMA)


def _shift_of(mean, rstd, dtype):
    """The elementwise pass's shift per plane (z = (x - sh) a + beta): 0 (PyTorch CPU's arithmetic,
    x a + (b - mean a), which fused and eager networks then round alike) unless the plane's mean is
    far from 0 against its spread (|mean| rstd > SHIFT_ABOVE), where that loses |mean| rstd 2^-24 of
    the output: there the mean rounded to the elementwise type (x - sh is exact near the mean). The
    C++ kernel's rule (coef_of in norm_act_cpu.cpp) and _fwd_finalize_kernel's."""
    ct = _coef_dtype(dtype)
    return torch.where(mean.abs() * rstd > SHIFT_ABOVE, mean.to(ct), torch.zeros((), dtype=ct, device=mean.device))


def _coefs(mean, rstd, weight, bias, N: int, C: int, dtype):
    """The elementwise coefficients per plane: a = rstd w, beta = b - (mean - sh) rstd w and the
    shift sh (_shift_of; z = (x - sh) a + beta), computed in float64 and rounded once (as
    _fwd_finalize_kernel does)."""
    w64 = weight.double() if weight is not None else torch.ones(C, dtype=torch.float64, device=mean.device)
    b64 = bias.double() if bias is not None else torch.zeros(C, dtype=torch.float64, device=mean.device)
    w64, b64 = w64.repeat(N), b64.repeat(N)
    ct = _coef_dtype(dtype)
    sh = _shift_of(mean, rstd, dtype)
    return (rstd * w64).to(ct), (b64 - (mean - sh.double()) * rstd * w64).to(ct), sh


def _norm_act_fwd(x, weight, bias, eps: float, slope: float, act: int, y, mean, rstd, prelu=None) -> None:
    """x, y: (N, C, *spatial) of one dtype and one layout (contiguous or channels last; y may be x);
    weight / bias: (C,) or None (any float dtype); mean, rstd: float64 (N * C,), filled."""
    if x.numel() == 0:
        return
    psum, pm2, chunk = _partial_stats(x)
    _finish_fwd(x, psum, pm2, chunk, weight, bias, _scalars(eps, slope, x.device), act, y, mean, rstd, prelu)


def _finish_fwd(x, psum, pm2, chunk: int, weight, bias, prm, act: int, y, mean, rstd, prelu=None) -> None:
    """From per-chunk statistics (psum: sums, pm2: squared deviations from each chunk's mean, both
    (N, nch, C), chunks of ``chunk`` voxels in order, the last one partial): mean / rstd merged, then
    the elementwise pass x -> y."""
    a, beta, sh = _finalize(x, psum, pm2, chunk, weight, bias, prm, mean, rstd)
    _apply(x, y, a, beta, sh, prm, act, prelu)


def _finalize(x, psum, pm2, chunk: int, weight, bias, prm, mean, rstd):
    """mean / rstd (filled) and the elementwise coefficients (a, beta, sh) from per-chunk statistics."""
    N, C = x.shape[0], x.shape[1]
    S = x[0, 0].numel()
    psum, pm2, chunk = _merged(psum, pm2, chunk, S)
    a = torch.empty(N * C, dtype=_coef_dtype(x.dtype), device=x.device)
    beta, sh = torch.empty_like(a), torch.empty_like(a)
    _fwd_finalize_kernel[(triton.cdiv(N * C, BLOCK_P),)](
        psum, pm2, weight if weight is not None else psum, bias if bias is not None else psum, prm, mean, rstd,
        a, beta, sh, N * C, C, S, psum.shape[1], chunk, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_P=BLOCK_P, SHIFT_ABOVE=SHIFT_ABOVE, **_NOFMA)
    return a, beta, sh


def finish_stats(x, psum, pm2, chunk: int, weight, bias, eps: float, mean, rstd):
    """finish_fwd without its elementwise pass: mean / rstd filled, and returns norm_act's
    coefficients (a, beta, sh) per plane (N * C, float32 for float32 / half x), for a convolution
    that applies the norm + activation in its prologue (conv_triton.conv_fwd's ``prologue``)."""
    C = x.shape[1]
    a = torch.empty(x.shape[0] * C, dtype=_coef_dtype(x.dtype), device=x.device)
    beta, sh = torch.empty_like(a), torch.empty_like(a)
    if x.numel() == 0:
        return a, beta, sh
    with _guard(x.device):
        for n0, n1 in _slices(x.shape[0]):
            sl = slice(n0 * C, n1 * C)
            a[sl], beta[sl], sh[sl] = _finalize(x[n0:n1], psum[n0:n1], pm2[n0:n1], chunk, weight, bias,
                                                _scalars(eps, 0.0, x.device), mean[sl], rstd[sl])
    return a, beta, sh


def finish_fwd(x, psum, pm2, chunk: int, weight, bias, eps: float, slope: float, act: int, y, mean, rstd) -> None:
    """The statistics merge and elementwise pass of norm_act_fwd on statistics someone else computed
    (the convolution's epilogue, fastmed.kernels.conv_triton): psum / pm2 (N, nch, C) as
    _fwd_partial_kernel writes them, over chunks of ``chunk`` voxels. x, y as norm_act_fwd's."""
    if x.numel() == 0:
        return
    C = x.shape[1]
    with _guard(x.device):
        for n0, n1 in _slices(x.shape[0]):
            _finish_fwd(x[n0:n1], psum[n0:n1], pm2[n0:n1], chunk, weight, bias, _scalars(eps, slope, x.device), act,
                        y[n0:n1], mean[n0 * C:n1 * C], rstd[n0 * C:n1 * C])


def _bwd_sums(dy, x, a, beta, sh, mean, rstd, weight, prm, act: int, prelu, dw, db, dp):
    """Per plane: db = sum g, dw = sum g xhat (and dp = sum dy z over z <= 0 for PReLU), g = dy act'(z),
    chunk sums added in a fixed order; returns instance norm's (c0, c1, c2) for _bwd_apply."""
    N, C, S, sN, sC, sS, bs, bc = _geometry(x)
    dev = x.device
    chunk, nch = _chunks(S, bs, bc)
    ps0 = torch.empty((N, nch, C), dtype=_acc_t(x.dtype), device=dev)
    ps1 = torch.empty_like(ps0)
    prelu_on = int(act) == 3
    ps2 = torch.empty_like(ps0) if prelu_on else ps0
    _bwd_partial_kernel[(nch, triton.cdiv(C, bc), N)](dy, x, a, beta, sh, mean, rstd, prm, *_pw(prelu, prm), ps0, ps1,
                                                      ps2, C, S, sN, sC, sS, nch, chunk, ACT=int(act),
                                                      ACC=_acc(x.dtype),
                                                      BLOCK_S=bs, BLOCK_C=bc, **_NOFMA)
    return finish_sums(ps0, ps1, S, weight, rstd, dw, db, ps2 if prelu_on else None, dp)


def finish_sums(ps0, ps1, S: int, weight, rstd, dw, db, ps2=None, dp=None):
    """The backward sums' second step: (N, chunks, C) partial sums of g and g xhat (and of PReLU's
    dy z, ``ps2``) added per plane in chunk order, in float64, into db, dw (and dp), float64 (N * C,);
    returns instance norm's (c0, c1, c2) = (rstd w, mean g, mean g xhat) over S voxels per plane.
    The partials come from _bwd_partial_kernel or from a convolution's data-gradient epilogue
    (conv_bwd_triton.conv_dgrad with ``stats``)."""
    N, nch, C = ps0.shape
    dev = ps0.device
    prelu_on = ps2 is not None
    if nch > MERGE_ABOVE:  # many chunks: summed in parallel groups first (fixed order)
        n0 = nch
        ps0, ps1, _ = _grouped(_sum_chunks_kernel, ps0, ps1, N, C, n0)
        if prelu_on:
            ps2 = _grouped(_sum_chunks_kernel, ps2, ps2, N, C, n0)[0]
        nch = ps0.shape[1]
    c0, c1, c2 = (torch.empty(N * C, dtype=torch.float64, device=dev) for _ in range(3))
    _bwd_finalize_kernel[(triton.cdiv(N * C, BLOCK_P),)](
        ps0, ps1, ps2 if prelu_on else ps0, weight if weight is not None else ps0, rstd, db, dw,
        dp if prelu_on else db, c0, c1, c2, N * C, C, S, nch, HAS_W=weight is not None, PRELU=prelu_on,
        BLOCK_P=BLOCK_P, **_NOFMA)
    return c0, c1, c2


def _bwd_apply(dy, x, dx, a, beta, sh, mean, rstd, c0, c1, c2, prm, act: int, prelu, sets: bool = False,
               fixed: bool = False) -> None:
    N, C, S, sN, sC, sS, bs, bc = _geometry(x)
    _bwd_apply_kernel[(triton.cdiv(S, bs), triton.cdiv(C, bc), N)](
        dy, x, dx, a, beta, sh, mean, rstd, c0, c1, c2, prm, *_pw(prelu, prm), C, S, sN, sC, sS, ACT=int(act),
        ACC=_acc(x.dtype), BLOCK_S=bs, BLOCK_C=bc, SETS=sets, FIXED=fixed, **_NOFMA)


def _norm_act_bwd(dy, x, weight, bias, mean, rstd, slope: float, act: int, dx, dw, db, prelu=None, dp=None) -> None:
    """dy, x, dx: one dtype and one layout (contiguous or channels last); mean, rstd: the forward's;
    dw, db (and dp for PReLU): float64 (N * C,) per-plane sums, filled."""
    if x.numel() == 0:
        return
    N, C = x.shape[0], x.shape[1]
    prm = _scalars(0.0, slope, x.device)
    # the forward's coefficients again (the same roundings: z is recomputed exactly)
    a, beta, sh = _coefs(mean, rstd, weight, bias, N, C, x.dtype)
    c = _bwd_sums(dy, x, a, beta, sh, mean, rstd, weight, prm, act, prelu, dw, db, dp)
    _bwd_apply(dy, x, dx, a, beta, sh, mean, rstd, *c, prm, act, prelu)


# ------------------------------------------------------------------------------------------------
# group norm (kind 1), batch norm in training (kind 2) and with given statistics (kind 3): the same
# kernels; the statistics of a set of planes (a sample's group of channels, a channel over the
# batch) are merged from the planes' exact moments, and the backward's set means of w g and
# w g xhat from the planes' sums, in float64 on the N * C plane values.

def _set_view(t, N: int, C: int, kind: int, groups: int):
    """(N, C) plane values -> sets along the last dim: (C, N) for batch norm, (N, groups, C / groups)
    for group norm."""
    t = t.view(N, C)
    return t.t() if kind == 2 else t.view(N, groups, C // groups)


def _per_plane(t, N: int, C: int, kind: int, groups: int):
    """Per-set values (keepdim) of _set_view's shape back to N * C plane values."""
    if kind == 2:
        return t.t().expand(N, C).reshape(-1)
    return t.expand(N, groups, C // groups).reshape(-1)


def _plane_moments(x, pm, pq) -> None:
    """Each plane's mean (pm) and squared deviations from it (pq), float64 (N * C)."""
    N, C = x.shape[0], x.shape[1]
    psum, pm2, chunk = _merged(*_partial_stats(x), x[0, 0].numel())
    _fwd_finalize_kernel[(triton.cdiv(N * C, BLOCK_P),)](
        psum, pm2, psum, psum, psum, pm, pq, psum, psum, psum, N * C, C, x[0, 0].numel(), psum.shape[1], chunk,
        HAS_W=False, HAS_B=False, BLOCK_P=BLOCK_P, MOMENTS=True, **_NOFMA)


def _sets_fwd(x, weight, bias, eps: float, slope: float, act: int, kind: int, groups: int, y, mean, rstd,
              prelu=None) -> None:
    N, C = x.shape[0], x.shape[1]
    S = x[0, 0].numel()
    if kind != 3:  # kind 3: mean / rstd are given (the caller filled them)
        pm = torch.empty(N * C, dtype=torch.float64, device=x.device)
        pq = torch.empty_like(pm)
        for n0, n1 in _slices(N):
            _plane_moments(x[n0:n1], pm[n0 * C:n1 * C], pq[n0 * C:n1 * C])
        m, q = _set_view(pm, N, C, kind, groups), _set_view(pq, N, C, kind, groups)
        sm = m.mean(-1, keepdim=True)  # the planes of a set have the same count: the set's mean
        sq = q.sum(-1, keepdim=True) + S * (m - sm).square().sum(-1, keepdim=True)  # the exact merge
        mean.copy_(_per_plane(sm, N, C, kind, groups))
        rstd.copy_(_per_plane(1.0 / torch.sqrt(sq / (m.shape[-1] * S) + eps), N, C, kind, groups))
    a, beta, sh = _coefs(mean, rstd, weight, bias, N, C, x.dtype)
    prm = _scalars(eps, slope, x.device)
    for n0, n1 in _slices(N):
        sl = slice(n0 * C, n1 * C)
        _apply(x[n0:n1], y[n0:n1], a[sl], beta[sl], sh[sl], prm, act, prelu)


def _sets_bwd(dy, x, weight, bias, mean, rstd, slope: float, act: int, kind: int, groups: int, dx, dw, db,
              prelu=None, dp=None) -> None:
    """dx = rstd (w g - M1 - xhat M2), M1 / M2 the set means of w g and w g xhat (0 for kind 3)."""
    N, C = x.shape[0], x.shape[1]
    S = x[0, 0].numel()
    prm = _scalars(0.0, slope, x.device)
    a, beta, sh = _coefs(mean, rstd, weight, bias, N, C, x.dtype)
    for n0, n1 in _slices(N):
        sl = slice(n0 * C, n1 * C)
        _bwd_sums(dy[n0:n1], x[n0:n1], a[sl], beta[sl], sh[sl], mean[sl], rstd[sl], weight, prm, act, prelu, dw[sl],
                  db[sl], dp[sl] if dp is not None and dp.numel() else None)
    w = weight.double().repeat(N) if weight is not None else torch.ones(N * C, dtype=torch.float64, device=x.device)
    c0 = rstd * w
    if kind == 3:
        c1 = c2 = torch.zeros_like(c0)
    else:
        m1, m2 = _set_view(w * db, N, C, kind, groups), _set_view(w * dw, N, C, kind, groups)
        cnt = m1.shape[-1] * S
        c1 = rstd * _per_plane(m1.sum(-1, keepdim=True) / cnt, N, C, kind, groups)
        c2 = rstd * _per_plane(m2.sum(-1, keepdim=True) / cnt, N, C, kind, groups)
    for n0, n1 in _slices(N):
        sl = slice(n0 * C, n1 * C)
        _bwd_apply(dy[n0:n1], x[n0:n1], dx[n0:n1], a[sl], beta[sl], sh[sl], mean[sl], rstd[sl], c0[sl], c1[sl], c2[sl],
                   prm, act, prelu, sets=True, fixed=kind == 3)


# ------------------------------------------------------------------------------------------------
# entry points

_MAX_N = 65535  # the grid's third axis (samples)


def _slices(N: int):
    """Sample ranges of at most _MAX_N (the grid's third axis)."""
    return [(n0, min(n0 + _MAX_N, N)) for n0 in range(0, N, _MAX_N)]


def norm_act_fwd(x, weight, bias, eps: float, slope: float, act: int, y, mean, rstd, prelu=None, kind: int = 0,
                 groups: int = 1) -> None:
    """x, y: (N, C, *spatial) of one dtype and one layout (contiguous or channels last; y may be x);
    weight / bias: (C,) or None (any float dtype); mean, rstd: float64 (N * C,), filled (kind 3:
    given); prelu: act 3's weights (1 or C, contiguous); kind: 0 instance norm, 1 group norm
    (``groups``), 2 batch norm over the batch, 3 batch norm with the given mean / rstd."""
    if x.numel() == 0:
        return
    C = x.shape[1]
    with _guard(x.device):
        if kind != 0:
            _sets_fwd(x, weight, bias, eps, slope, act, kind, groups, y, mean, rstd, prelu)
            return
        for n0, n1 in _slices(x.shape[0]):
            _norm_act_fwd(x[n0:n1], weight, bias, eps, slope, act, y[n0:n1], mean[n0 * C:n1 * C], rstd[n0 * C:n1 * C],
                          prelu)


def norm_act_bwd(dy, x, weight, bias, mean, rstd, slope: float, act: int, dx, dw, db, prelu=None, dp=None,
                 kind: int = 0, groups: int = 1) -> None:
    """dy, x, dx: one dtype and one layout (contiguous or channels last); mean, rstd: the forward's;
    dw, db (and dp, act 3): float64 (N * C,) per-plane sums, filled; kind / groups: the forward's."""
    if x.numel() == 0:
        return
    C = x.shape[1]
    with _guard(x.device):
        if kind != 0:
            _sets_bwd(dy, x, weight, bias, mean, rstd, slope, act, kind, groups, dx, dw, db, prelu, dp)
            return
        for n0, n1 in _slices(x.shape[0]):
            sl = slice(n0 * C, n1 * C)
            _norm_act_bwd(dy[n0:n1], x[n0:n1], weight, bias, mean[sl], rstd[sl], slope, act, dx[n0:n1], dw[sl], db[sl],
                          prelu, dp[sl] if dp is not None and dp.numel() else None)
