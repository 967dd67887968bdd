"""Triton implicit-GEMM backward of ``fastmed::conv_norm_act`` (convolution -> instance norm ->
activation) on GPUs, with the norm + activation backward fused into the convolution's gradients.

Given the output gradient ``dz`` and what the forward kept (the raw convolution output ``y``, the
statistics), the backward is (1) per plane the sums ``sum g`` and ``sum g xhat`` with
``g = act'(z) dz`` (norm_act's statistics kernel, one read of dz and y), then (2) the gradient of
y, ``dy = rstd w (g - mean(g) - xhat mean(g xhat))``, and the convolution's input and weight
gradients from it. Eager PyTorch writes ``dy`` whole and reads it twice (cuDNN's data and weight
gradients). Here ``dy`` is never stored: both GEMMs compute it while they load it (their
*prologue*), from ``dz`` and ``y`` and seven numbers per (sample, channel):

    z = (y - sh) a + beta   (the forward's coefficients and roundings: act'(z) is the forward's)
    dy = K0 g + K1 (y - mean) + K2,   K0 = rstd w, K1 = -K0 rstd mean(g xhat), K2 = -K0 mean(g) + ...

in float32, rounded to the convolution's dtype before the product (as eager's dy is); ``mean`` is
the mean rounded to float32, and K2 takes the rounding's share (K1 (mean_f32 - mean)), so dy stays
exact on a plane whose mean is far from 0 against its spread.

- **data gradient** ``dx = conv_transpose(dy, weight)``: an implicit GEMM with one row per input
  voxel, one column per input channel and K = (tap, output channel); the output voxel a tap reads,
  ``(i + pad - k dil) / stride``, exists when the division is exact and in range. The rows of a
  program are input voxels of one residue class modulo the stride, for which the division is exact
  for the same taps: the others are skipped whole (a stride-2 3D layer does not do 8x the
  products it needs).
- **weight gradient** ``dW[co, (tap, ci)] = sum over samples and output voxels of dy x``: one
  program per block of output channels x block of columns (a tap's channel block; or, for fewer
  than 16 input channels, several taps' channels flattened as the forward does), the reduction
  split over the voxels into ``splits`` parts that write float32 partial sums, added in a fixed
  order afterwards (no atomics: the same input gives the same bits). With ``prologue`` (the chain
  of fastmed.optimize: x is the previous layer's raw output) x is read as ``act((x - sh') a' + beta')``,
  so the previous normalised activation is not stored in the backward either.
- **epilogue of the data gradient in a chain** (``stats``): when x is the previous layer's raw
  output y1, dx is the gradient of that layer's norm + activation output, and the previous layer's
  backward needs per plane ``sum g1`` and ``sum g1 xhat1`` over it (g1 = act1'(z1) dx). The data
  gradient computes them from its stored tile (one more read: y1 at the same positions) and writes
  per-tile partial sums, added in a fixed order by norm_act_triton.finish_sums: the previous layer
  skips its statistics pass over dx and y1 (the backward's counterpart of the forward's statistics
  epilogue).
- The convolution bias's gradient is ``sum dy`` per channel, which instance norm makes exactly 0
  (adding a constant to a plane changes nothing after the norm): returned as zeros.

Checked under ``TRITON_INTERPRET=1`` in CI (tests/test_conv_norm_act_triton.py) and compiled for
sm_90 without register spills (tests/test_triton_sm90.py); not yet run on a GPU (its speed against
cuDNN is unknown), used only with ``FASTMED_TRITON_CONV=1`` like the forward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .conv_triton import SMALL_CIN, _block_n, _prologue, _span, block_m, stats_dtype
from .norm_act_triton import _dact, _xhat_terms

WS_MAX = 1 << 24  # float32 elements of weight-gradient partial sums at most (64 MiB)


@triton.jit
def _dy_tile(dz_ptr, y_ptr, off, ok, cf_ptr, pc, cm, NC, pslope, ACT: tl.constexpr):
    """dy at the loaded positions (float32, 0 where not ok): the norm + activation backward's
    elementwise pass; ``pc``: the planes' index n * Cout + co, broadcast like ``off``."""
    a = tl.load(cf_ptr + pc, mask=cm, other=0.0)
    beta = tl.load(cf_ptr + NC + pc, mask=cm, other=0.0)
    mu = tl.load(cf_ptr + 2 * NC + pc, mask=cm, other=0.0)
    sh = tl.load(cf_ptr + 6 * NC + pc, mask=cm, other=0.0)
    k0 = tl.load(cf_ptr + 3 * NC + pc, mask=cm, other=0.0)
    k1 = tl.load(cf_ptr + 4 * NC + pc, mask=cm, other=0.0)
    k2 = tl.load(cf_ptr + 5 * NC + pc, mask=cm, other=0.0)
    yv = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(dz_ptr + off, mask=ok, other=0.0).to(tl.float32)
    z = (yv - sh) * a + beta
    if ACT == 1:  # as torch's ReLU backward: a NaN passes the gradient
        d = tl.where(z <= 0, 0.0, d)
    elif ACT == 2:
        d = tl.where(z > 0, d, d * pslope)
    return tl.where(ok, k0 * d + k1 * (yv - mu) + k2, 0.0)


@triton.jit
def _dgrad_tap(acc, zb, yb, w_ptr, cf_ptr, pslope, n, tap, c0, kd_, kh_, kw_, id_, ih, iw, mm, offs_n, nm,
               Cin, Cout, Do, Ho, Wo, NC, szc, szd, szh, szw, std, sth, stw, pd, ph, pw, dd, dh, dw,
               ACT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """acc + the product of one tap's channel block: dy at the output voxels the tap reads (exact
    divisions here) times the tap's weights."""
    od = (id_ + pd - kd_ * dd) // std
    oh = (ih + ph - kh_ * dh) // sth
    ow = (iw + pw - kw_ * dw) // stw
    ok = mm & (od >= 0) & (oh >= 0) & (ow >= 0) & (od < Do) & (oh < Ho) & (ow < Wo)
    co = c0 + tl.arange(0, BLOCK_K)
    cm = co < Cout
    off = (od * szd + oh * szh + ow * szw)[:, None] + co[None, :].to(IDX) * szc
    a = _dy_tile(zb, yb, off, ok[:, None] & cm[None, :], cf_ptr, n * Cout + co[None, :], cm[None, :], NC, pslope, ACT)
    b = tl.load(w_ptr + (tap * Cout + co)[:, None] * Cin + offs_n[None, :], mask=cm[:, None] & nm[None, :], other=0.0)
    a = a.to(w_ptr.dtype.element_ty)  # dy rounded to the convolution's dtype, as eager's
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _dgrad_kernel(dz_ptr, y_ptr, w_ptr, dx_ptr, cf_ptr, pslope,
                  x_ptr, sa_ptr, sb_ptr, ssh_ptr, smean_ptr, srstd_ptr, sprm_ptr, ps0_ptr, ps1_ptr,
                  Cin, D, H, W, Cout, Do, Ho, Wo, Dc, Hc, Wc, NBM, NC, NT,
                  szn, szc, szd, szh, szw, sxn, sxc, sxd, sxh, sxw,
                  KD, KH, KW, std, sth, stw, pd, ph, pw, dd, dh, dw,
                  ACT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STRIDED: tl.constexpr,
                  STATS: tl.constexpr = 0, SACC: tl.constexpr = tl.float64):
    # rows: the input voxels of one residue class (i mod stride per axis) of sample n; for all of
    # them a tap reads an output voxel or none, the same for the whole class, so a stride-2 layer
    # skips the taps that add nothing (stride 1: one class, every tap)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    cls = pid_m // NBM
    rw = cls % stw
    rh = (cls // stw) % sth
    rd = cls // (stw * sth)
    offs_m = (pid_m - cls * NBM).to(IDX) * BLOCK_M + tl.arange(0, BLOCK_M).to(IDX)
    jw = offs_m % Wc
    t = offs_m // Wc
    jh = t % Hc
    jd = t // Hc
    id_ = rd + jd * std
    ih = rh + jh * sth
    iw = rw + jw * stw
    mm = (jd < Dc) & (id_ < D) & (ih < H) & (iw < W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    nm = offs_n < Cin
    zb = dz_ptr + n * szn
    yb = y_ptr + n * szn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ncb = tl.cdiv(Cout, BLOCK_K)
    for it in range(0, KD * KH * KW * ncb):
        tap = it // ncb
        c0 = (it - tap * ncb) * BLOCK_K
        kw_ = tap % KW
        kh_ = (tap // KW) % KH
        kd_ = tap // (KW * KH)
        if STRIDED:
            # (i + pad - k dil) divisible by the stride for this class: == 0 of a remainder means
            # the same in every integer convention, negative operands included
            if ((((rd + pd - kd_ * dd) % std) == 0) & (((rh + ph - kh_ * dh) % sth) == 0)
                    & (((rw + pw - kw_ * dw) % stw) == 0)):
                acc = _dgrad_tap(acc, zb, yb, w_ptr, cf_ptr, pslope, n, tap, c0, kd_, kh_, kw_, id_, ih, iw, mm,
                                 offs_n, nm, Cin, Cout, Do, Ho, Wo, NC, szc, szd, szh, szw, std, sth, stw, pd, ph,
                                 pw, dd, dh, dw, ACT, PREC, UPCAST, IDX, BLOCK_K)
        else:  # stride 1: every tap, no branch in the loop (its loads pipeline as the forward's)
            acc = _dgrad_tap(acc, zb, yb, w_ptr, cf_ptr, pslope, n, tap, c0, kd_, kh_, kw_, id_, ih, iw, mm,
                             offs_n, nm, Cin, Cout, Do, Ho, Wo, NC, szc, szd, szh, szw, std, sth, stw, pd, ph,
                             pw, dd, dh, dw, ACT, PREC, UPCAST, IDX, BLOCK_K)
    xoff = n * sxn + (id_ * sxd + ih * sxh + iw * sxw)[:, None] + offs_n[None, :].to(IDX) * sxc
    ok = mm[:, None] & nm[None, :]
    dv = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + xoff, dv, mask=ok)
    if STATS > 0:
        # the previous layer's backward sums over exactly the values stored (dx is the gradient of
        # its activation output; x, its raw convolution output, has dx's strides): per (sample,
        # input channel) this tile's sum g and sum g xhat, g = act'(z) dx, z = (x - sh) a + beta (the
        # forward's coefficients), accumulated as norm_act's statistics kernel does (SACC: float64
        # for float32, float32 for half types); added over the tiles in a fixed order afterwards
        pc = n * Cin + offs_n
        a = tl.load(sa_ptr + pc, mask=nm, other=0.0)[None, :]
        beta = tl.load(sb_ptr + pc, mask=nm, other=0.0)[None, :]
        sh = tl.load(ssh_ptr + pc, mask=nm, other=0.0)[None, :]
        mean, rstd, xc = _xhat_terms(smean_ptr, srstd_ptr, pc, nm, SACC)
        v = tl.load(x_ptr + xoff, mask=ok, other=0.0)
        z = (v.to(a.dtype) - sh) * a + beta
        g = _dact(z, dv.to(SACC), tl.load(sprm_ptr + 1), STATS - 1)
        g = tl.where(ok, g, 0.0)
        gx = g * ((v.to(SACC) - mean[None, :]) * rstd[None, :] + xc[None, :])
        po = (n * NT + pid_m) * Cin + offs_n
        tl.store(ps0_ptr + po, tl.sum(g, 0), mask=nm)
        tl.store(ps1_ptr + po, tl.sum(gx, 0), mask=nm)


@triton.jit
def _wgrad_kernel(dz_ptr, y_ptr, x_ptr, cf_ptr, pa_ptr, pb_ptr, pm_ptr, ws_ptr, pslope, xslope,
                  Cin, D, H, W, Cout, Do, Ho, Wo, Mo, NC, NMB, TOT, PER, JT,
                  szn, szc, szd, szh, szw, sxn, sxc, sxd, sxh, sxw,
                  KD, KH, KW, std, sth, stw, pd, ph, pw, dd, dh, dw,
                  ACT: tl.constexpr, PRO: tl.constexpr, FLAT: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr, IDX: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    co = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels: the rows
    cm = co < Cout
    # the columns j = tap * Cin + ci
    if FLAT:
        js = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
        jm = js < JT
        ci = js % Cin
        tap = js // Cin
    else:
        ncb = tl.cdiv(Cin, BLOCK_N)
        tap = pid_j // ncb
        ci = (pid_j - tap * ncb) * BLOCK_N + tl.arange(0, BLOCK_N)
        jm = ci < Cin
        js = tap * Cin + ci
    kw_ = tap % KW
    kh_ = (tap // KW) % KH
    kd_ = tap // (KW * KH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b0 = s * PER
    b1 = tl.minimum(b0 + PER, TOT)
    for blk in range(b0, b1):  # blocks of BLOCK_K output voxels of one sample
        n = (blk // NMB).to(tl.int64)
        m = (blk % NMB).to(IDX) * BLOCK_K + tl.arange(0, BLOCK_K).to(IDX)
        mk = m < Mo
        ow = m % Wo
        t = m // Wo
        oh = t % Ho
        od = t // Ho
        off = (od * szd + oh * szh + ow * szw)[:, None] + co[None, :].to(IDX) * szc
        g = _dy_tile(dz_ptr + n * szn, y_ptr + n * szn, off, mk[:, None] & cm[None, :], cf_ptr,
                     n * Cout + co[None, :], cm[None, :], NC, pslope, ACT)  # [BLOCK_K, BLOCK_M]
        d0 = od * std - pd
        h0 = oh * sth - ph
        w0 = ow * stw - pw
        if FLAT:
            di = d0[:, None] + (kd_ * dd)[None, :]
            hi = h0[:, None] + (kh_ * dh)[None, :]
            wi = w0[:, None] + (kw_ * dw)[None, :]
            ok = (mk[:, None] & jm[None, :] & (di >= 0) & (di < D) & (hi >= 0) & (hi < H)
                  & (wi >= 0) & (wi < W))
            xoff = di * sxd + hi * sxh + wi * sxw + ci[None, :].to(IDX) * sxc
        else:
            di = d0 + kd_ * dd
            hi = h0 + kh_ * dh
            wi = w0 + kw_ * dw
            okv = mk & (di >= 0) & (di < D) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            ok = okv[:, None] & jm[None, :]
            xoff = (di * sxd + hi * sxh + wi * sxw)[:, None] + ci[None, :].to(IDX) * sxc
        xv = tl.load(x_ptr + n * sxn + xoff, mask=ok, other=0.0)
        if PRO > 0:
            xv = _prologue(xv, ok, pa_ptr, pb_ptr, pm_ptr, xslope, n, ci[None, :], jm[None, :], Cin, PRO)
        g = g.to(x_ptr.dtype.element_ty)
        if UPCAST:
            xv, g = xv.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(tl.trans(g), xv, acc, input_precision=PREC)
    po = (s.to(tl.int64) * Cout + co)[:, None] * JT + js[None, :]
    tl.store(ws_ptr + po, acc, mask=cm[:, None] & jm[None, :])


# ------------------------------------------------------------------------------------------------
# launchers

_MAX_N = 65535  # the grid's third axis (samples)


def coefficients(a, beta, sh, mean, rstd, c0, c1, c2):
    """The prologue's (7, N * Cout) float32 table from the forward's elementwise coefficients
    (a, beta, sh: float32, norm_act_triton._coefs's) and the backward sums' (c0, c1, c2) =
    (rstd w, mean(g), mean(g xhat)) (float64, as norm_act_triton's _bwd_sums returns them): rows a,
    beta, mean, K0, K1, K2, sh."""
    k1 = -c0 * c2 * rstd
    # K1 (y - mean) = K1 (y - mean_f32) + K1 (mean_f32 - mean): the second term goes into K2, so the
    # mean's rounding to float32 costs nothing on a plane whose mean is far from 0 against its spread
    k2 = -c0 * c1 + k1 * (mean.float().double() - mean)
    return torch.stack([a.float(), beta.float(), mean.float(), c0.float(), k1.float(), k2.float(),
                        sh.float()]).contiguous()


def _as3d(*ts):
    return [t.unsqueeze(2) for t in ts]


def _common(x, weight, stride, padding, dilation):
    if x.ndim == 4:
        stride, padding, dilation = (1,) + tuple(stride), (0,) + tuple(padding), (1,) + tuple(dilation)
    prec_tf32 = torch.backends.cudnn.allow_tf32
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    prec = "tf32" if (x.dtype == torch.float32 and prec_tf32 and not upcast) else "ieee"
    return tuple(stride), tuple(padding), tuple(dilation), prec, upcast


def _idx(*ts, pad: int = 0):
    big = max(_span(t) for t in ts) + pad >= 2 ** 31 - 2 ** 20
    from . import conv_triton

    return tl.int64 if (big or conv_triton.FORCE_INT64) else tl.int32


def _same_layout(a, b) -> bool:
    """a and b have one shape and address their elements alike (strides of size-1 dims aside: a
    1-channel tensor is contiguous and channels last at once, with either's strides)."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def conv_dgrad(dz, y, weight, cf, act: int, slope: float, dx, stride, padding, dilation, stats=None):
    """dx = the input gradient of y = conv(x, weight) for dy = the prologue's (never stored), into
    ``dx`` (x's shape, any strides). ``dz`` and ``y`` share one layout; ``cf``: coefficients().

    ``stats`` = (x, a, beta, sh, mean, rstd, prm, act): x is the previous layer's raw convolution
    output (dx is then the gradient of its norm + activation's output) with its elementwise
    coefficients (a, beta, sh: float32, N * Cin), statistics (mean, rstd: float64) and scalars
    (norm_act_triton._scalars: the slope at [1]); the epilogue then also produces that layer's
    backward sums, returned as (ps0, ps1): (N, tiles, Cin) per-tile sums of g and g xhat (see the
    kernel), the input of norm_act_triton.finish_sums. None (nothing produced) without ``stats``,
    or when x is not laid out as dx."""
    stride, padding, dilation, prec, upcast = _common(dx, weight, stride, padding, dilation)
    if stats is not None and _same_layout(stats[0], dx):
        x1, sa, sb, ssh, smean, srstd, sprm, sact = stats
        assert sa.dtype == sb.dtype == ssh.dtype == torch.float32 and 0 <= int(sact) <= 2
        assert smean.dtype == srstd.dtype == torch.float64
    else:
        stats = None
    if dx.ndim == 4:
        dz, y, dx, weight = _as3d(dz, y, dx, weight)
        if stats is not None:
            x1 = x1.unsqueeze(2)
    N, Cin, D, H, W = dx.shape
    Cout, KD, KH, KW = weight.shape[0], *weight.shape[2:]
    Do, Ho, Wo = y.shape[2:]
    M = D * H * W
    if N == 0 or Cin == 0 or M == 0:
        return None
    if Cout == 0 or y.numel() == 0:
        dx.zero_()
        return None
    assert _same_layout(dz, y)
    w3 = weight.permute(2, 3, 4, 0, 1).contiguous()  # (KD, KH, KW, Cout, Cin): rows (tap, co)
    # per residue class of the input voxels (see the kernel): ceil(D / stride) x ... voxels
    Dc, Hc, Wc = (triton.cdiv(v, s) for v, s in zip((D, H, W), stride))
    Mc = Dc * Hc * Wc
    classes = stride[0] * stride[1] * stride[2]
    bm = block_m(Mc)
    nbm = triton.cdiv(Mc, bm)
    nt = classes * nbm
    bn = _block_n(Cin)
    if stats is not None and stats_dtype(dx.dtype) == torch.float64:
        bn = min(bn, 32)  # the epilogue's float64 tiles: at 64 channels they spilled (sm_90, no activation)
    bk = min(max(triton.next_power_of_2(Cout), 16), 32)  # 8 warps, K steps of 32: no spills (as conv_fwd)
    idx = _idx(dz, dx, pad=max(padding) * max(abs(v) for v in dx.stride()[1:]))
    sz, sx = y.stride(), dx.stride()
    out = None
    if stats is not None:
        sacc = stats_dtype(dx.dtype)
        out = (torch.empty((N, nt, Cin), dtype=sacc, device=dx.device), torch.empty((N, nt, Cin), dtype=sacc,
                                                                                  device=dx.device))
    for n0 in range(0, N, _MAX_N):
        n1 = min(n0 + _MAX_N, N)
        if stats is None:
            st = (dx, cf, cf, cf, cf, cf, cf, cf, cf)  # unused (STATS = 0)
        else:
            p0, p1 = n0 * Cin, n1 * Cin
            st = (x1[n0:n1], sa[p0:p1], sb[p0:p1], ssh[p0:p1], smean[p0:p1], srstd[p0:p1], sprm, out[0][n0:n1],
                  out[1][n0:n1])
        _dgrad_kernel[(nt, triton.cdiv(Cin, bn), n1 - n0)](
            dz[n0:n1], y[n0:n1], w3, dx[n0:n1], cf[:, n0 * Cout:n1 * Cout].contiguous(), float(slope), *st,
            Cin, D, H, W, Cout, Do, Ho, Wo, Dc, Hc, Wc, nbm, (n1 - n0) * Cout, nt,
            sz[0], sz[1], sz[2], sz[3], sz[4], sx[0], sx[1], sx[2], sx[3], sx[4],
            KD, KH, KW, *stride, *padding, *dilation,
            ACT=int(act), PREC=prec, UPCAST=upcast, IDX=idx, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            STRIDED=classes > 1, STATS=0 if stats is None else int(sact) + 1,
            SACC=tl.float64 if stats is None or out[0].dtype == torch.float64 else tl.float32,
            num_warps=8, num_stages=3, enable_fp_fusion=False)
    return out


def splits(tot: int, programs: int, cout: int, jt: int, sms: int) -> int:
    """How many parts the weight gradient's reduction is split into: enough programs for about
    four per multiprocessor, each part at least 4 voxel blocks, the partial sums at most WS_MAX."""
    want = max(1, triton.cdiv(4 * sms, max(programs, 1)))
    return int(max(1, min(want, tot // 4 or 1, WS_MAX // max(cout * jt, 1))))


def conv_wgrad(dz, y, x, weight, cf, act: int, slope: float, stride, padding, dilation, sms: int = 132,
               prologue=None):
    """The weight gradient (float32, weight's shape, channels-last memory) of y = conv(x, weight)
    for dy = the prologue's. ``prologue`` = (a, beta, sh, act, slope) as conv_triton.conv_fwd's: x is
    the previous layer's raw output and its normalised activation is what the convolution read."""
    stride, padding, dilation, prec, upcast = _common(x, weight, stride, padding, dilation)
    two = x.ndim == 4
    if two:
        dz, y, x, weight = _as3d(dz, y, x, weight)
    N, Cin, D, H, W = x.shape
    Cout, KD, KH, KW = weight.shape[0], *weight.shape[2:]
    Do, Ho, Wo = y.shape[2:]
    taps = KD * KH * KW
    Mo = Do * Ho * Wo
    jt = taps * Cin
    ws_shape = (Cout, KD, KH, KW, Cin)
    if N == 0 or Mo == 0 or Cout == 0 or Cin == 0:
        dw = torch.zeros(ws_shape, dtype=torch.float32, device=x.device)
    else:
        assert _same_layout(dz, y)
        flat = Cin < SMALL_CIN
        bmc = min(max(triton.next_power_of_2(Cout), 16), 64)
        bn = 16 if flat else min(max(triton.next_power_of_2(Cin), 16), 64)
        bk = 32 if Mo >= 32 else 16
        ncol = triton.cdiv(jt, bn) if flat else taps * triton.cdiv(Cin, bn)
        nmb = triton.cdiv(Mo, bk)
        tot = N * nmb
        programs = ncol * triton.cdiv(Cout, bmc)
        S = splits(tot, programs, Cout, jt, sms)
        per = triton.cdiv(tot, S)
        S = triton.cdiv(tot, per)
        ws = torch.empty((S, Cout, jt), dtype=torch.float32, device=x.device)
        pro, pa, pb, pm, xslope = 0, cf, cf, cf, 0.0
        if prologue is not None:
            pa, pb, pm, pact, xslope = prologue  # pm: the shift
            assert pa.dtype == pb.dtype == pm.dtype == torch.float32 and 0 <= pact <= 2
            assert pa.numel() == pb.numel() == pm.numel() == N * Cin
            pro, xslope = int(pact) + 1, float(xslope)
        idx = _idx(dz, x, pad=max(padding) * max(abs(v) for v in x.stride()[1:]))
        assert N <= 2 ** 31 // max(nmb, 1)
        sz, sx = y.stride(), x.stride()
        _wgrad_kernel[(ncol, triton.cdiv(Cout, bmc), S)](
            dz, y, x, cf, pa, pb, pm, ws, float(slope), xslope,
            Cin, D, H, W, Cout, Do, Ho, Wo, Mo, N * Cout, nmb, tot, per, jt,
            sz[0], sz[1], sz[2], sz[3], sz[4], sx[0], sx[1], sx[2], sx[3], sx[4],
            KD, KH, KW, *stride, *padding, *dilation,
            ACT=int(act), PRO=pro, FLAT=flat, PREC=prec, UPCAST=upcast, IDX=idx,
            BLOCK_M=bmc, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3, enable_fp_fusion=False)
        dw = ws.sum(0).view(ws_shape)  # the parts in a fixed order
    dw = dw.permute(0, 4, 1, 2, 3)  # (Cout, Cin, KD, KH, KW), channels last in memory
    return dw[:, :, 0] if two else dw
