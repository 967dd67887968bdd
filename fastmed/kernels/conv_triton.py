"""Triton implicit-GEMM convolution (2D / 3D) whose epilogue also produces the partial instance-norm
statistics of its output: the first half of ``fastmed::conv_norm_act`` on GPUs.

The convolution is a GEMM ``y[m, co] = sum_k A[m, k] * B[k, co]`` with m an output voxel of one sample,
k = (tap, ci) and A read straight from x (never materialised: "implicit"): each program owns
``BLOCK_M`` output voxels x ``BLOCK_N`` output channels of one sample and walks the kernel taps; per
tap it loads the input voxels that tap reads (zero outside the volume: the padding) in blocks of
``BLOCK_K`` input channels and multiplies them with the matching rows of the weight on the tensor
cores (``tl.dot``, float32 accumulation). x may have any strides; channels last (NDHWC / NHWC) makes
the channel blocks contiguous loads, which is the layout this kernel is for. Inputs with fewer than
16 channels (a network's first layer) flatten (tap, ci) into one K axis instead, so a 1-channel
input does not waste 15/16 of each product.

Epilogue: bias added, ``y`` rounded to its dtype and stored (channels last or contiguous, as the
caller's ``y`` is laid out), and, with ``STATS``, per (sample, channel) the tile's sum and its
squared deviations from the tile mean over exactly the values stored (the rounded ones; float64
for float32 y, float32 for half types, as norm_act accumulates), written to
``psum`` / ``pm2`` of shape (N, tiles, C). Those are the inputs of the statistics merge of
``norm_act_triton`` (tiles play its chunks: ``CHUNK = BLOCK_M``), so the instance norm needs no
pass of its own over y before its elementwise pass. No atomics: the merge adds tiles in order,
deterministic.

Prologue (``prologue=(a, beta, sh, act, slope)``): x is the previous layer's raw convolution output
and every loaded input element becomes ``act((x - sh[n, ci]) * a[n, ci] + beta[n, ci])`` (norm_act's
elementwise pass, same roundings) before the product, zero at the padding: the previous norm + activation without
their own write and read of the activation.

float16 / bfloat16 multiply on the tensor cores; float32 uses TF32 when PyTorch's
``torch.backends.cudnn.allow_tf32`` says cuDNN would (its default), else full float32 ("ieee").
Groups other than 1 and float64 are not taken here (the op uses cuDNN for them).

Checked under ``TRITON_INTERPRET=1`` in CI (tests/test_conv_norm_act_triton.py); not yet run on a
GPU, so its speed against cuDNN is unknown and the op only uses it when asked
(``FASTMED_TRITON_CONV=1``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SMALL_CIN = 16  # inputs with fewer channels flatten (tap, ci) into one K axis


@triton.jit
def _prologue(v, ok, pa_ptr, pb_ptr, pm_ptr, pslope, n, ci, cm, Cin, PRO: tl.constexpr):
    """The previous layer's norm + activation applied to the loaded input v (its raw convolution
    output): act((v - sh[n, ci]) * a[n, ci] + beta[n, ci]) in float32 without contraction (norm_act's
    elementwise pass exactly), rounded to v's dtype; 0 where ok is false (the convolution's zero padding)."""
    pa = tl.load(pa_ptr + n * Cin + ci, mask=cm, other=0.0)
    pb = tl.load(pb_ptr + n * Cin + ci, mask=cm, other=0.0)
    pm = tl.load(pm_ptr + n * Cin + ci, mask=cm, other=0.0)
    z = (v.to(tl.float32) - pm) * pa + pb
    if PRO == 2:
        z = tl.where(z <= 0, 0.0, z)  # NaN passes, as torch.relu
    elif PRO == 3:
        z = tl.where(z > 0, z, z * pslope)
    return tl.where(ok, z, 0.0).to(v.dtype)


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, psum_ptr, pm2_ptr, pa_ptr, pb_ptr, pm_ptr, pslope,
                     Cin, D, H, W, Cout, Ho, Wo, M, NT,
                     sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                     KD, KH, KW, std, sth, stw, pd, ph, pw, dd, dh, dw,
                     HAS_BIAS: tl.constexpr, STATS: tl.constexpr, FLAT: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr, SACC: tl.constexpr, IDX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRO: tl.constexpr = 0):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    # offsets inside one sample in IDX (int32 unless a sample passes 2^31 elements: fewer registers);
    # the sample's base offset in int64
    offs_m = pid_m.to(IDX) * BLOCK_M + tl.arange(0, BLOCK_M).to(IDX)
    mm = offs_m < M
    ow = offs_m % Wo
    t = offs_m // Wo
    oh = t % Ho
    od = t // Ho
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < Cout
    d0 = od * std - pd
    h0 = oh * sth - ph
    w0 = ow * stw - pw
    xb = x_ptr + n * sxn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT:
        # k = ((kd * KH + kh) * KW + kw) * Cin + ci, all of K in blocks of BLOCK_K
        K = KD * KH * KW * Cin
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < K
            ci = ks % Cin
            tap = ks // Cin
            kw_ = tap % KW
            kh_ = (tap // KW) % KH
            kd_ = tap // (KW * KH)
            di = d0[:, None] + (kd_ * dd)[None, :]
            hi = h0[:, None] + (kh_ * dh)[None, :]
            wi = w0[:, None] + (kw_ * dw)[None, :]
            ok = (mm[:, None] & km[None, :] & (di >= 0) & (di < D) & (hi >= 0) & (hi < H)
                  & (wi >= 0) & (wi < W))
            a = tl.load(xb + di * sxd + hi * sxh + wi * sxw + ci[None, :].to(IDX) * sxc, mask=ok, other=0.0)
            if PRO > 0:
                a = _prologue(a, ok, pa_ptr, pb_ptr, pm_ptr, pslope, n, ci[None, :], km[None, :], Cin, PRO)
            b = tl.load(w_ptr + ks[:, None] * Cout + offs_n[None, :], mask=km[:, None] & nm[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        # one loop over (tap, channel block) steps, so that the loads of the next step are issued
        # while the current product runs (nested loops over the taps would drain the pipeline per tap)
        ncb = tl.cdiv(Cin, BLOCK_K)
        for it in range(0, KD * KH * KW * ncb):
            tap = it // ncb
            c0 = (it - tap * ncb) * BLOCK_K
            kw_ = tap % KW
            kh_ = (tap // KW) % KH
            kd_ = tap // (KW * KH)
            di = d0 + kd_ * dd
            hi = h0 + kh_ * dh
            wi = w0 + kw_ * dw
            ok = mm & (di >= 0) & (di < D) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            ci = c0 + tl.arange(0, BLOCK_K)
            cm = ci < Cin
            a = tl.load(xb + (di * sxd + hi * sxh + wi * sxw)[:, None] + ci[None, :].to(IDX) * sxc,
                        mask=ok[:, None] & cm[None, :], other=0.0)
            if PRO > 0:
                a = _prologue(a, ok[:, None] & cm[None, :], pa_ptr, pb_ptr, pm_ptr, pslope, n, ci[None, :], cm[None, :],
                              Cin, PRO)
            b = tl.load(w_ptr + (tap * Cin + ci)[:, None] * Cout + offs_n[None, :], mask=cm[:, None] & nm[None, :],
                        other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nm, other=0.0)[None, :]
    yv = acc.to(y_ptr.dtype.element_ty)
    yoff = od * syd + oh * syh + ow * syw
    tl.store(y_ptr + n * syn + yoff[:, None] + offs_n[None, :].to(IDX) * syc, yv, mask=mm[:, None] & nm[None, :])
    if STATS:
        # the statistics of exactly what was stored (rounded to y's dtype), accumulated as norm_act's
        # (float64 for float32 y, float32 for float16 / bfloat16)
        v = tl.where(mm[:, None], yv.to(SACC), 0.0)
        cnt = tl.minimum(M - pid_m.to(IDX) * BLOCK_M, BLOCK_M).to(SACC)
        s = tl.sum(v, 0)
        dv = tl.where(mm[:, None], v - (s / cnt)[None, :], 0.0)
        po = (n * NT + pid_m) * Cout + offs_n  # int64 (n is)
        tl.store(psum_ptr + po, s, mask=nm)
        tl.store(pm2_ptr + po, tl.sum(dv * dv, 0), mask=nm)


# ------------------------------------------------------------------------------------------------
# launcher

_MAX_N = 65535  # the grid's third axis (samples)
FORCE_INT64 = False  # tests: the 64-bit offset variant on small tensors


def supports(x, weight, groups: int) -> bool:
    """What this kernel takes: 4D / 5D float16 / bfloat16 / float32 x, weight of x's dtype, groups 1."""
    return (x.ndim in (4, 5) and weight.ndim == x.ndim and groups == 1 and weight.numel() < 2 ** 31
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and weight.dtype == x.dtype)


def suited(x, weight, out_shape, tf32: bool, sms: int) -> bool:
    """Where this kernel is expected to be competitive (from its compiled code for sm_90; no GPU has
    timed it yet): not full-float32 products (they lower to FMAs, not tensor cores), input channels
    below 16 or a multiple of 16 (others load scalars and spill registers), and enough programs to
    fill the GPU's ``sms`` multiprocessors (deep layers on small volumes leave most of it idle).
    Elsewhere cuDNN runs."""
    if x.dtype == torch.float32 and not tf32:
        return False
    cin = x.shape[1]
    if cin >= SMALL_CIN and cin % 16:
        return False
    M = 1
    for v in out_shape[2:]:
        M *= v
    programs = triton.cdiv(M, block_m(M)) * triton.cdiv(out_shape[1], _block_n(out_shape[1])) * out_shape[0]
    return programs >= sms


def _block_n(cout: int) -> int:
    return min(max(triton.next_power_of_2(cout), 16), 64)


def _span(t) -> int:
    """One past the largest element offset inside one sample of t."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))


def out_shape(x, weight, stride, padding, dilation):
    sp = x.shape[2:]
    ks = weight.shape[2:]
    return (x.shape[0], weight.shape[0]) + tuple(
        (sp[i] + 2 * padding[i] - dilation[i] * (ks[i] - 1) - 1) // stride[i] + 1 for i in range(len(sp)))


def stats_dtype(dtype):
    """The partial statistics' dtype: float64 for float32 convolutions, float32 for half types."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def block_m(M: int) -> int:
    return 128 if M >= 128 else max(16, triton.next_power_of_2(M))


def conv_fwd(x, weight, bias, stride, padding, dilation, y, psum=None, pm2=None, tf32: bool = True,
             prologue=None) -> None:
    """y = conv(x, weight) + bias, computed into ``y`` (any strides; allocate it channels last);
    with ``psum`` / ``pm2`` ((N, cdiv(M, block_m(M)), Cout) of stats_dtype(x.dtype), M = output
    voxels per sample)
    also the per-tile statistics of y. stride / padding / dilation: one int per spatial dim.
    ``prologue`` = (a, beta, sh, act, slope): x is the previous layer's raw output and the convolution
    reads act((x - sh) * a + beta) instead (a, beta, sh: float32 (N * Cin,) per plane, norm_act's
    coefficients, norm_act_triton.finish_stats's;
    act 0 none, 1 ReLU, 2 LeakyReLU with ``slope``), so its normalised activation is never stored."""
    N, Cin = x.shape[0], x.shape[1]
    Cout = weight.shape[0]
    three = x.ndim == 5
    if not three:  # 2D as 3D with depth 1
        x, weight, y = x.unsqueeze(2), weight.unsqueeze(2), y.unsqueeze(2)
        stride, padding, dilation = (1,) + tuple(stride), (0,) + tuple(padding), (1,) + tuple(dilation)
    D, H, W = x.shape[2:]
    KD, KH, KW = weight.shape[2:]
    Do, Ho, Wo = y.shape[2:]
    M = Do * Ho * Wo
    if N == 0 or Cout == 0 or M == 0:
        return
    # the GEMM's B: (KD, KH, KW, Cin, Cout) rows, contiguous
    w2 = weight.permute(2, 3, 4, 1, 0).contiguous()
    b32 = bias.detach().float().contiguous() if bias is not None else w2
    flat = Cin < SMALL_CIN
    bm = block_m(M)
    bn = _block_n(Cout)
    # tiles of 128 x 64 on 8 warps (two warpgroups) with K steps of 32: the configuration whose sm_90
    # compile keeps every variant (dtypes, statistics, prologue) in registers; 4 warps or K steps of
    # 64 spilled up to 1.4 KB per thread to local memory (Triton 3.9, ptxas of CUDA 13). Not timed.
    bk = 16 if flat else min(max(triton.next_power_of_2(Cin), 16), 32)
    nt = triton.cdiv(M, bm)
    stats = psum is not None
    if stats:
        assert psum.shape == (N, nt, Cout) and pm2.shape == psum.shape
    prec = "tf32" if (x.dtype == torch.float32 and tf32) else "ieee"
    # Triton's interpreter multiplies bfloat16 operands as raw int16 bits (numpy has no bfloat16):
    # there they are widened first (exact; the products are exact in float32 as on tensor cores)
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if upcast:
        prec = "ieee"
    # int32 offsets inside a sample unless one (with the padding reach) could pass 2^31
    big = max(_span(x), _span(y), M) + max(padding) * max(abs(v) for v in x.stride()[1:]) >= 2 ** 31 - 2 ** 20
    idx = tl.int64 if (big or FORCE_INT64) else tl.int32
    sx, sy = x.stride(), y.stride()
    pro, pa, pb, pm, pslope = 0, w2, w2, w2, 0.0
    # no multiply-add contraction, with or without a prologue: the prologue's (x - sh) * a + beta is rounded
    # as norm_act's own pass rounds it, and the epilogue's statistics (sum of squared deviations) come
    # out the same bits in both variants, so a chained pair equals two single layers (the products
    # are tl.dot's, unaffected)
    extra = {"enable_fp_fusion": False}
    if prologue is not None:
        pa, pb, pm, act, pslope = prologue
        assert pa.dtype == pb.dtype == pm.dtype == torch.float32 and 0 <= act <= 2
        assert pa.numel() == pb.numel() == pm.numel() == N * Cin
        pro, pslope = int(act) + 1, float(pslope)
    for n0 in range(0, N, _MAX_N):
        n1 = min(n0 + _MAX_N, N)
        grid = (nt, triton.cdiv(Cout, bn), n1 - n0)
        _conv_fwd_kernel[grid](
            x[n0:n1], w2, b32, y[n0:n1], psum[n0:n1] if stats else w2, pm2[n0:n1] if stats else w2,
            pa[n0 * Cin:n1 * Cin] if pro else pa, pb[n0 * Cin:n1 * Cin] if pro else pb,
            pm[n0 * Cin:n1 * Cin] if pro else pm, pslope,
            Cin, D, H, W, Cout, Ho, Wo, M, nt,
            sx[0], sx[1], sx[2], sx[3], sx[4], sy[0], sy[1], sy[2], sy[3], sy[4],
            KD, KH, KW, stride[0], stride[1], stride[2], padding[0], padding[1], padding[2],
            dilation[0], dilation[1], dilation[2],
            HAS_BIAS=bias is not None, STATS=stats, FLAT=flat, PREC=prec, UPCAST=upcast,
            SACC=tl.float64 if x.dtype == torch.float32 else tl.float32, IDX=idx,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRO=pro, num_warps=8, num_stages=3, **extra)
