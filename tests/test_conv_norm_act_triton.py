"""The Triton implicit-GEMM convolution of fastmed::conv_norm_act (the CUDA path with
FASTMED_TRITON_CONV=1) under TRITON_INTERPRET=1 on the CPU: the convolution against the float64
reference over strides, paddings, dilations, 2D / 3D, layouts, small and large channel counts and
every dtype; its epilogue statistics against the stored output; the whole forward (statistics ->
norm_act's merge and elementwise kernels) bit for bit against norm_act of the same convolution
output. In a subprocess: the interpreter must be on before triton loads."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
import torch.nn.functional as F
from fastmed.kernels import conv_triton as KC, norm_act_triton as KN
from fastmed.ops import conv_norm_act as CN, norm_act as NA

g = torch.Generator().manual_seed(0)
# x shape, Cout, kernel, stride, padding, dilation, channels last
CASES = [
    ((2, 3, 5, 6, 7), 5, 3, 1, 1, 1, True),        # small Cin: (tap, ci) flattened into K
    ((1, 20, 6, 5, 7), 17, 3, 2, 1, 1, True),      # per-tap K blocks, a partial one; stride 2
    ((1, 40, 4, 5, 6), 8, 3, 1, 1, 1, True),       # two K blocks per tap (float32: 32 wide)
    ((2, 18, 7, 6), 8, 3, 1, 2, 2, False),         # 2D, planar x, dilation 2
    ((1, 16, 9, 9, 9), 70, 3, 1, 1, 1, True),      # two output-channel blocks; M = 729: 6 tiles, last partial
    ((1, 4, 6, 7, 5), 6, (1, 3, 3), (1, 2, 1), (0, 1, 1), 1, False),
    ((2, 1, 12, 10), 8, 5, 2, 0, 1, True),         # 1 input channel (a network's first layer)
    ((1, 3, 3, 3, 3), 4, 3, 1, 0, 1, True),        # one output voxel per plane
]
worst = {}
for ci, (shape, cout, k, st, pd, dl, cl) in enumerate(CASES):
    nd = len(shape) - 2
    ks = (k,) * nd if isinstance(k, int) else k
    tr = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)
    st, pd, dl = tr(st), tr(pd), tr(dl)
    fmt = (torch.channels_last_3d if nd == 3 else torch.channels_last) if cl else torch.contiguous_format
    # float16 on the first cases only: it runs bfloat16's code with another element type, and the
    # interpreter is slow (CI's 20 minutes)
    for dt in (torch.float32, torch.float16, torch.bfloat16) if ci < 3 else (torch.float32, torch.bfloat16):
        x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=fmt)
        w = (torch.randn((cout, shape[1]) + ks, generator=g) / (shape[1] * 9) ** 0.5).to(dt)
        b = torch.randn(cout, generator=g).to(dt)
        conv = F.conv3d if nd == 3 else F.conv2d
        ref = conv(x.double(), w.double(), b.double(), st, pd, dl)
        y = torch.empty(ref.shape, dtype=dt).contiguous(memory_format=fmt)
        N, M = ref.shape[0], ref[0, 0].numel()
        bm = KC.block_m(M)
        nt = -(-M // bm)
        ps = torch.empty((N, nt, cout), dtype=KC.stats_dtype(dt))
        pm = torch.empty_like(ps)
        assert KC.supports(x, w, 1)
        KC.conv_fwd(x, w, b, st, pd, dl, y, ps, pm, tf32=False)
        key = str(dt)
        sc = ref.abs().max().item()
        worst[(key, "conv")] = max(worst.get((key, "conv"), 0), (y.double() - ref).abs().max().item() / sc)
        # the epilogue statistics: per tile, of exactly the stored values
        yr = y.double().flatten(2)
        for t in range(nt):
            seg = yr[:, :, t * bm:(t + 1) * bm]
            s = seg.sum(-1)
            m2 = ((seg - (s / seg.shape[-1])[..., None]) ** 2).sum(-1)
            e1 = (ps[:, t, :].double() - s).abs().max().item() / (seg.abs().sum(-1).max().item() + 1e-30)
            e2 = (pm[:, t, :].double() - m2).abs().max().item() / (m2.abs().max().item() + 1e-30)
            worst[(key, "stats")] = max(worst.get((key, "stats"), 0), e1, e2)
        y2 = torch.empty_like(y)
        KC.conv_fwd(x, w, b, st, pd, dl, y2, ps.clone(), pm.clone(), tf32=False)
        assert torch.equal(y, y2), "conv not deterministic"
        y3 = torch.empty_like(y)  # without statistics: the same y
        KC.conv_fwd(x, w, None, st, pd, dl, y3, tf32=False)
        y4 = torch.empty_like(y)
        KC.conv_fwd(x, w, torch.zeros_like(b), st, pd, dl, y4, tf32=False)
        assert torch.equal(y3, y4), "bias path"
        if M < 2:
            continue
        # the op's CUDA glue on the same tensors: statistics from the epilogue, then norm_act's kernels
        nw, nb = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
        for act, code in (("leaky_relu", 2), ("relu", 1), ("none", 0)):
            z, yy, mean, rstd = CN._triton_fwd(KC, KN, x, w, b, nw, nb, list(st), list(pd), list(dl), 1e-5, 0.01, code)
            assert torch.equal(yy, y)
            zi = CN._triton_fwd(KC, KN, x, w, b, nw, nb, list(st), list(pd), list(dl), 1e-5, 0.01, code, True)[0]
            assert torch.equal(zi, z) and zi.stride() == z.stride(), "in place"
            assert z.stride() == yy.stride() and yy.is_contiguous(memory_format=CN._out_format(x, w))
            # norm_act's own kernels on the same y (their own statistics pass, other chunks): for
            # float32 the same mean (float64 sums of float32 values are exact here), rstd to float64
            # rounding, z to float32 rounding (a coefficient may round the other way)
            za = torch.empty_like(y)
            ma, ra = torch.empty_like(mean), torch.empty_like(rstd)
            KN.norm_act_fwd(y, NA._affine_arg(nw, y), NA._affine_arg(nb, y), 1e-5, 0.01, code, za, ma, ra)
            zc, mc, rc = (NA.norm_act_fwd(y, nw, nb, 1e-5, 0.01, code) if dt == torch.float32 else (za, ma, ra))
            for other, mo, ro in ((za, ma, ra), (zc, mc, rc)):
                sc = other.double().abs().max().item()
                worst[(key, "z_vs_norm_act")] = max(worst.get((key, "z_vs_norm_act"), 0),
                                                    (z.double() - other.double()).abs().max().item() / sc)
                worst[(key, "mean_vs_norm_act")] = max(worst.get((key, "mean_vs_norm_act"), 0),
                                                       ((mean - mo).abs() * ro).max().item())
                worst[(key, "rstd_vs_norm_act")] = max(worst.get((key, "rstd_vs_norm_act"), 0),
                                                       ((rstd - ro).abs() / ro).max().item())
            zr = NA.norm_act_reference(ref, nw.double(), nb.double(), 1e-5, act, 0.01)
            worst[(key, "z")] = max(worst.get((key, "z"), 0), (z.double() - zr).abs().max().item() / zr.abs().max().item())
# many tiles per plane: merged in parallel groups before the per-plane finalising loop (forced here
# with a low threshold; 3 groups of 2 tiles, the last partial); and norm_act's own path likewise
x = torch.randn(2, 16, 9, 9, 9, generator=g).contiguous(memory_format=torch.channels_last_3d)
w = torch.randn(24, 16, 3, 3, 3, generator=g) * 0.1
nw, nb = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
for dt in (torch.float32, torch.bfloat16):
    args = (KC, KN, x.to(dt), w.to(dt), None, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
    z0, y0, m0, r0 = CN._triton_fwd(*args)
    KN.MERGE_ABOVE = 2
    z1, y1, m1, r1 = CN._triton_fwd(*args)
    zn = torch.empty_like(y0)
    mn, rn = torch.empty_like(m0), torch.empty_like(r0)
    KN.norm_act_fwd(y0[:, :, :, :, :], NA._affine_arg(nw, y0), NA._affine_arg(nb, y0), 1e-5, 0.01, 2, zn, mn, rn)
    KN.MERGE_ABOVE = 512
    assert torch.equal(y1, y0)
    torch.testing.assert_close(m1, m0, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(r1, r0, rtol=1e-12, atol=0)
    torch.testing.assert_close(z1.float(), z0.float(), rtol=2e-7 if dt == torch.float32 else 1e-2, atol=1e-6 if dt == torch.float32 else 1e-2)
    torch.testing.assert_close(rn, r0, rtol=1e-6, atol=0)
ym = torch.randn(1, 3, 30, 30, 30, generator=g)  # norm_act alone: 27000 voxels, 4 chunks, merged in 2 groups
ya, yb = torch.empty_like(ym), torch.empty_like(ym)
ma, ra, mb, rb = (torch.empty(3, dtype=torch.float64) for _ in range(4))
KN.norm_act_fwd(ym, None, None, 1e-5, 0.01, 2, ya, ma, ra)
dy = torch.randn(ym.shape, generator=g)
bw = [[torch.empty_like(ym), torch.empty(3, dtype=torch.float64), torch.empty(3, dtype=torch.float64)] for _ in range(2)]
KN.norm_act_bwd(dy, ym, None, None, ma, ra, 0.01, 2, *bw[0])
KN.MERGE_ABOVE = 2
KN.norm_act_fwd(ym, None, None, 1e-5, 0.01, 2, yb, mb, rb)
KN.norm_act_bwd(dy, ym, None, None, ma, ra, 0.01, 2, *bw[1])  # the chunk sums added in groups first
KN.MERGE_ABOVE = 512
for a, b in zip(*bw):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(mb, ma, rtol=1e-14, atol=1e-15)
torch.testing.assert_close(rb, ra, rtol=1e-13, atol=0)
torch.testing.assert_close(yb, ya, rtol=2e-7, atol=1e-6)
# float32 with TF32 allowed: the interpreter multiplies in float32, so only a smoke test here
x = torch.randn(1, 8, 5, 5, 5).contiguous(memory_format=torch.channels_last_3d)
w = torch.randn(4, 8, 3, 3, 3) * 0.1
y = torch.empty(1, 4, 5, 5, 5).contiguous(memory_format=torch.channels_last_3d)
KC.conv_fwd(x, w, None, (1, 1, 1), (1, 1, 1), (1, 1, 1), y, tf32=True)
torch.testing.assert_close(y, F.conv3d(x, w, None, 1, 1), rtol=1e-2, atol=1e-2)
# empty batch: nothing to do, and the op's glue returns empty outputs (no IndexError)
KC.conv_fwd(torch.randn(0, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3), None, (1,) * 3, (1,) * 3, (1,) * 3,
            torch.empty(0, 3, 4, 4, 4))
z, yy, mean, rstd = CN._triton_fwd(KC, KN, torch.randn(0, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3), None, None, None,
                                   [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
assert z.shape == (0, 3, 4, 4, 4) and mean.numel() == 0
# the 64-bit offset variant (used when a sample passes 2^31 elements) on a small case: the same bits
x = torch.randn(2, 20, 6, 5, 7, generator=g).contiguous(memory_format=torch.channels_last_3d)
w = torch.randn(8, 20, 3, 3, 3, generator=g) * 0.1
ya, yb = (torch.empty(2, 8, 6, 5, 7).contiguous(memory_format=torch.channels_last_3d) for _ in range(2))
KC.conv_fwd(x, w, None, (1,) * 3, (1,) * 3, (1,) * 3, ya, tf32=False)
KC.FORCE_INT64 = True
KC.conv_fwd(x, w, None, (1,) * 3, (1,) * 3, (1,) * 3, yb, tf32=False)
KC.FORCE_INT64 = False
assert torch.equal(ya, yb), "int64 offsets"
# a 1-channel channels-last input (its layouts coincide): the output is channels last, as PyTorch's
x1 = torch.randn(1, 1, 6, 7, 8, generator=g).contiguous(memory_format=torch.channels_last_3d)
w1 = torch.randn(16, 1, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last_3d)
z, yy, _, _ = CN._triton_fwd(KC, KN, x1, w1, None, None, None, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
assert yy.is_contiguous(memory_format=torch.channels_last_3d) and not yy.is_contiguous()
assert z.stride() == yy.stride()
for k, v in sorted(worst.items()):
    print(k, v)
tol = {"torch.float32": 2e-6, "torch.float16": 2e-3, "torch.bfloat16": 2e-2}
exact = {("torch.float32", "mean_vs_norm_act"): 0.0, ("torch.float32", "rstd_vs_norm_act"): 1e-14,
         ("torch.float32", "z_vs_norm_act"): 2.5e-7, ("torch.float32", "stats"): 1e-12}
bad = [(dt, k, v) for (dt, k), v in worst.items() if v > exact.get((dt, k), tol[dt])]
assert not bad, bad
print("ok")
"""


@pytest.mark.background(SCRIPT, env={"TRITON_INTERPRET": "1"}, timeout=900)
def test_triton_conv_under_the_interpreter(background):
    r = background
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


CHAIN_SCRIPT = r"""
import torch
from fastmed.kernels import conv_triton as KC, norm_act_triton as KN
from fastmed.ops import conv_norm_act as CN, norm_act as NA

CN._use_triton = lambda *a, **k: (KC, KN)  # CPU tensors under the interpreter stand for CUDA ones
torch.backends.cudnn.allow_tf32 = False
g = torch.Generator().manual_seed(5)
# (x shape, Cmid, Cout, stride of the second conv, channels last): the second convolution reads its
# input through the prologue in its flattened-K path (Cmid < 16) and in its per-tap path (Cmid >= 16)
CASES = [((2, 1, 7, 6, 5), 8, 6, 1, True), ((1, 3, 6, 7, 5), 16, 5, 2, True), ((1, 4, 9, 8), 20, 7, 1, False)]
n = 0
for shape, cmid, cout, st2, cl in CASES:
    nd = len(shape) - 2
    fmt = (torch.channels_last_3d if nd == 3 else torch.channels_last) if cl else torch.contiguous_format
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for act1, slope1 in ((2, 0.2), (1, 0.0), (0, 0.0)):
            x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=fmt)
            w1 = (torch.randn((cmid, shape[1]) + (3,) * nd, generator=g) / 3).to(dt)
            w2 = (torch.randn((cout, cmid) + (3,) * nd, generator=g) / 6).to(dt)
            b1, b2 = torch.randn(cmid, generator=g).to(dt), torch.randn(cout, generator=g).to(dt)
            if act1 == 2:  # a large convolution bias: planes far from 0 against their spread, which the
                b1 = b1 + 100  # norm's elementwise pass (and so the prologue) shifts by their mean
            # a large norm bias: act(beta) at the zero padding would be far from 0 (the mask must win)
            nw1, nb1 = torch.rand(cmid, generator=g) + 0.5, torch.randn(cmid, generator=g) + 2
            nw2, nb2 = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
            l1 = (w1, b1, nw1, nb1, [1] * nd, [1] * nd, [1] * nd, 1e-5, slope1, act1)
            l2 = (w2, b2, nw2, nb2, [st2] * nd, [1] * nd, [1] * nd, 1e-5, 0.01, 2)
            z1 = CN._triton_fwd(KC, KN, x, *l1[:7], *l1[7:])[0]
            ref = CN._triton_fwd(KC, KN, z1, *l2[:7], *l2[7:])[0]
            got = CN._try_chain(x, l1, l2)
            assert got is not None and got.stride() == ref.stride() and got.dtype == ref.dtype
            assert torch.equal(got, ref), (shape, dt, act1, (got.double() - ref.double()).abs().max())
            # training (conv_norm_act2_fwd): the same z2, and y1, y2 and statistics kept for the backward
            tr = CN._try_chain(x, l1, l2, train=True)
            z1_, y1, m1, r1 = CN._triton_fwd(KC, KN, x, *l1[:7], *l1[7:])
            assert torch.equal(tr[0], ref) and torch.equal(tr[1], y1) and torch.equal(tr[2], m1)
            assert torch.equal(tr[3], r1)
            # the backward's recompute of z1 (Triton's given-statistics pass) is z1's bits
            za = NA._triton_fwd(KN, tr[1], nw1, nb1, 0.0, slope1, act1, tr[2].clone(), tr[3].clone(), None, 3)
            assert za is not None and torch.equal(za, z1_), (shape, dt, act1)
            n += 1
print("chained cases", n)
# the training op end to end (on the Triton route: its backward by the Triton kernels, the first
# layer's backward sums from the second data gradient's epilogue): gradients as the CPU layers'
g = torch.Generator().manual_seed(6)
sums = []
orig_sums = KN._bwd_sums
KN._bwd_sums = lambda *a, **k: (sums.append(1), orig_sums(*a, **k))[1]
for shape, cmid, off in (((2, 3, 6, 5, 7), 8, 0), ((1, 16, 5, 6, 4), 16, 100)):
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last_3d)
    # off: the first convolution's bias far from 0 against its output's spread (shifted planes)
    ps = [torch.randn(cmid, shape[1], 3, 3, 3, generator=g) / 4, torch.randn(cmid, generator=g) + off,
          torch.rand(cmid, generator=g) + 0.5, torch.randn(cmid, generator=g),
          torch.randn(5, cmid, 3, 3, 3, generator=g) / 6, torch.randn(5, generator=g),
          torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)]
    grads = []
    for tri in (True, False):
        CN._use_triton = (lambda *a, **k: (KC, KN)) if tri else (lambda *a, **k: None)
        ins = [t.clone().requires_grad_(True) for t in [x] + ps]
        w1, b1, nw1, nb1, w2, b2, nw2, nb2 = ins[1:]
        z = CN.conv_norm_act2_fwd(ins[0], w1, b1, nw1, nb1, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2,
                                  w2, b2, nw2, nb2, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)[0]
        sums.clear()
        z.backward(torch.linspace(-1, 1, z.numel()).view(z.shape))
        assert len(sums) == (1 if tri else 0), sums  # the second layer's own pass only
        grads.append([z.detach()] + [t.grad for t in ins])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1.0), (shape, a.shape)
KN._bwd_sums = orig_sums
print("training chain ok")
"""


@pytest.mark.background(CHAIN_SCRIPT, env={"TRITON_INTERPRET": "1"}, timeout=900)
def test_triton_conv_prologue_under_the_interpreter(background):
    """Two conv -> norm -> act layers with the first norm + activation applied in the second
    convolution's prologue: bit for bit the result of the two layers run one after the other."""
    r = background
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


BWD_SCRIPT = r"""
import torch
import torch.nn.functional as F
from fastmed.kernels import conv_triton as KC, norm_act_triton as KN, conv_bwd_triton as KB
from fastmed.ops import conv_norm_act as CN, norm_act as NA

torch.backends.cudnn.allow_tf32 = False
g = torch.Generator().manual_seed(11)
# x shape, Cout, kernel, stride, padding, dilation, channels last, bias
CASES = [
    ((2, 3, 5, 6, 7), 5, 3, 1, 1, 1, True, True),       # Cin < 16: the weight gradient's flattened columns
    ((1, 20, 6, 5, 7), 17, 3, 2, 1, 1, True, True),     # per-tap columns, partial blocks; stride 2 (masked taps)
    ((2, 18, 7, 6), 8, 3, 1, 2, 2, False, False),       # 2D, planar, dilation 2, no bias
    ((1, 4, 6, 7, 5), 6, (1, 3, 3), (1, 2, 1), (0, 1, 1), 1, False, True),
    ((1, 1, 7, 6, 5), 16, 3, 1, 1, 1, True, True),      # 1 input channel (a network's first layer)
    ((1, 16, 5, 5, 4), 40, 3, 1, 1, 1, True, True),     # Cout 40: two K blocks of the data gradient (float32)
    ((1, 5, 8, 10), 6, 3, 3, 1, 2, True, True),         # 2D stride 3 with dilation 2: 9 residue classes
]
ACTS = (("leaky_relu", 2, 0.01), ("relu", 1, 0.0), ("none", 0, 0.0))
FLOOR = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
worst = {}
for ci, (shape, cout, k, st, pd, dl, cl, has_b) in enumerate(CASES):
    nd = len(shape) - 2
    ks = (k,) * nd if isinstance(k, int) else k
    tr = lambda v: [v] * nd if isinstance(v, int) else list(v)
    st, pd, dl = tr(st), tr(pd), tr(dl)
    fmt = (torch.channels_last_3d if nd == 3 else torch.channels_last) if cl else torch.contiguous_format
    # float16 on the first cases only (as the forward's: bfloat16's code, another element type)
    for dt in (torch.float32, torch.float16, torch.bfloat16) if ci < 3 else (torch.float32, torch.bfloat16):
        x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=fmt)
        w = (torch.randn((cout, shape[1]) + ks, generator=g) / (shape[1] * 9) ** 0.5).to(dt)
        b = torch.randn(cout, generator=g).to(dt) if has_b else None
        if ci == 0 and dt == torch.float32:  # planes far from 0 against their spread: the shifted pass,
            b = b + 1000  # and K2's share of the mean's float32 rounding (+50 was too little to need it)
        nw, nb = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
        for name, code, slope in ACTS if dt == torch.float32 else ACTS[:1]:  # (the interpreter is slow)
            z, y, mean, rstd = CN._triton_fwd(KC, KN, x, w, b, nw, nb, st, pd, dl, 1e-5, slope, code)
            dz = torch.randn(z.shape, generator=g).to(dt)  # planar, y maybe channels last
            conf = (st, pd, dl, slope, code)
            bs = [cout] if has_b else None
            got = CN._triton_bwd(KN, KB, dz, x, w, y, nw, nb, mean, rstd, conf, bs, (True, True, True))
            assert got[0].shape == x.shape and got[0].dtype == dt and got[1].shape == w.shape and got[1].dtype == dt
            assert got[0].stride() == x.stride(), "dx in x's layout"
            assert (got[2] is None) == (not has_b) and (got[2] is None or torch.count_nonzero(got[2]) == 0)
            # float64 reference of the same backward (from the stored y and statistics)
            dy64, dnw64, dnb64, _ = NA._reference_bwd(dz.double(), y.double(), nw, nb, mean, rstd, slope, code)
            dx64, dw64, _ = torch.ops.aten.convolution_backward(
                dy64, x.double(), w.double(), None, st, pd, dl, False, [0] * nd, 1, [True, True, False])
            # the unfused path in the same dtype: dy rounded to it, PyTorch's convolution backward
            dxe, dwe, _ = torch.ops.aten.convolution_backward(
                dy64.to(dt), x, w, None, st, pd, dl, False, [0] * nd, 1, [True, True, False])
            eager = (dxe, dwe, None, dnw64, dnb64)
            for i, ref in ((0, dx64), (1, dw64), (3, dnw64), (4, dnb64)):
                sc = max(ref.abs().max().item(), 1e-3)
                e = (got[i].double() - ref).abs().max().item() / sc
                ee = (eager[i].double() - ref).abs().max().item() / sc
                key = (str(dt), i)
                worst[key] = max(worst.get(key, 0), e)
                assert e <= max(3 * ee, FLOOR[dt]), (shape, dt, name, i, e, ee)
            # only what is needed: no data gradient, no weight gradient
            part = CN._triton_bwd(KN, KB, dz, x, w, y, nw, nb, mean, rstd, conf, bs, (False, True, False))
            assert part[0] is None and part[2] is None and torch.equal(part[1], got[1])
            part = CN._triton_bwd(KN, KB, dz, x, w, y, nw, nb, mean, rstd, conf, bs, (True, False, False))
            assert part[1] is None and torch.equal(part[0], got[0])
print(sorted(worst.items()))
# the weight gradient's reduction split in many parts (partials added in a fixed order): the same
# gradient to float32 rounding, and the same bits on a second run
x = torch.randn(2, 16, 6, 6, 6, generator=g).contiguous(memory_format=torch.channels_last_3d)
w = torch.randn(24, 16, 3, 3, 3, generator=g) * 0.1
nw, nb = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
z, y, mean, rstd = CN._triton_fwd(KC, KN, x, w, None, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
dz = torch.randn(z.shape, generator=g).contiguous(memory_format=torch.channels_last_3d)
a, beta, sh = KN._coefs(mean, rstd, nw, nb, 2, 24, y.dtype)
dnw, dnb = torch.empty(48, dtype=torch.float64), torch.empty(48, dtype=torch.float64)
c = KN._bwd_sums(dz, y, a, beta, sh, mean, rstd, nw, KN._scalars(0.0, 0.01, "cpu"), 2, None, dnw, dnb, None)
cf = KB.coefficients(a, beta, sh, mean, rstd, *c)
assert KB.splits(2 * 7, 27, 24, 27 * 16, 1000) > 1
one = KB.conv_wgrad(dz, y, x, w, cf, 2, 0.01, [1] * 3, [1] * 3, [1] * 3, sms=1)
many = KB.conv_wgrad(dz, y, x, w, cf, 2, 0.01, [1] * 3, [1] * 3, [1] * 3, sms=1000)
again = KB.conv_wgrad(dz, y, x, w, cf, 2, 0.01, [1] * 3, [1] * 3, [1] * 3, sms=1000)
torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
assert torch.equal(many, again)
# the 64-bit offset variants: the same bits
dxa, dxb = torch.empty_like(x), torch.empty_like(x)
KB.conv_dgrad(dz, y, w, cf, 2, 0.01, dxa, [1] * 3, [1] * 3, [1] * 3)
KC.FORCE_INT64 = True
KB.conv_dgrad(dz, y, w, cf, 2, 0.01, dxb, [1] * 3, [1] * 3, [1] * 3)
wb = KB.conv_wgrad(dz, y, x, w, cf, 2, 0.01, [1] * 3, [1] * 3, [1] * 3, sms=1)
KC.FORCE_INT64 = False
assert torch.equal(dxa, dxb) and torch.equal(wb, one)
# empty batch
e = CN._triton_bwd(KN, KB, torch.zeros(0, 3, 4, 4, 4), torch.zeros(0, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3),
                   torch.zeros(0, 3, 4, 4, 4), None, None, torch.zeros(0, dtype=torch.float64),
                   torch.zeros(0, dtype=torch.float64), ([1] * 3, [1] * 3, [1] * 3, 0.01, 2), None, (True, True, False))
assert e[0].shape == (0, 2, 4, 4, 4) and torch.count_nonzero(e[1]) == 0 and e[3].shape == (3,)
# a plane whose mean is far larger than its spread (a large convolution bias; y's float32 rounding
# is then 0.3% of the spread): the same gradients as the unfused float32 path to 1e-3 (both far
# from the float64 backward, which decides the activation's kink on other z values)
x = torch.randn(1, 4, 5, 5, 5, generator=g)
w = torch.randn(8, 4, 3, 3, 3, generator=g) * 0.01
b = torch.full((8,), 3000.0)
nw, nb = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
z, y, mean, rstd = CN._triton_fwd(KC, KN, x, w, b, nw, nb, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)
dz = torch.randn(z.shape, generator=g)
conf = ([1] * 3, [1] * 3, [1] * 3, 0.01, 2)
got = CN._triton_bwd(KN, KB, dz, x, w, y, nw, nb, mean, rstd, conf, [8], (True, True, False))
eager = CN._layer_bwd(dz, None, x, w, y, nw, nb, mean, rstd, conf, [8], (True, True, False))
for a, r in zip(got[:2], eager[:2]):
    assert (a - r).abs().max().item() <= 1e-3 * r.abs().max().item(), (a - r).abs().max()
# one output channel (its y is planar and channels last at once): the backward takes dz in either
# layout; the same gradients as the CPU path
for fmt in (torch.contiguous_format, torch.channels_last_3d):
    x = torch.randn(1, 1, 4, 4, 4, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(1, 1, 3, 3, 3, generator=g)
    dz = torch.randn(1, 1, 4, 4, 4, generator=g)
    grads = []
    for tri in (True, False):
        CN._use_triton = (lambda *a, **k: (KC, KN)) if tri else (lambda *a, **k: None)
        ins = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        CN.conv_norm_act_fwd(*ins, None, None, None, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)[0].backward(dz)
        grads.append([t.grad for t in ins])
    for a, r in zip(*grads):
        assert (a - r).abs().max().item() <= 1e-5 * r.abs().max().item(), fmt
# torch.compile traces the backward with fake tensors: the Triton backward steps aside (the traced
# graph records the unfused ops) instead of failing and switching itself off for the process
import warnings
CN._use_triton = lambda *a, **k: (KC, KN)
x = torch.randn(1, 4, 5, 5, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
w = torch.randn(8, 4, 3, 3, 3, generator=g) * 0.1
dz = torch.randn(1, 8, 5, 5, 5, generator=g)
fn = lambda x, w: CN.conv_norm_act_fwd(x, w, None, None, None, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)[0]
grads = []
for f in (torch.compile(fn, backend="aot_eager", fullgraph=True), fn):
    ins = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(*ins).backward(dz)
    grads.append([t.grad for t in ins])
assert CN._triton_conv_bwd() is not None and KN._SCALARS and all(type(t) is torch.Tensor for t in KN._SCALARS.values())
for a, r in zip(*grads):
    assert (a - r).abs().max().item() <= 1e-5 * r.abs().max().item()
# the backward follows the forward's route, whatever holds when it runs (FASTMED_TRITON_CONV may be
# set around the forward only)
calls = []
orig_w = KB.conv_wgrad
KB.conv_wgrad = lambda *a, **k: (calls.append(1), orig_w(*a, **k))[1]
for fwd_tri in (True, False):
    CN._use_triton = (lambda *a, **k: (KC, KN)) if fwd_tri else (lambda *a, **k: None)
    ins = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    z = fn(*ins)
    CN._use_triton = (lambda *a, **k: None) if fwd_tri else (lambda *a, **k: (KC, KN))
    z.backward(dz)
assert calls == [1], calls
KB.conv_wgrad = orig_w
# the op's autograd on this path (its forward and backward by the Triton kernels) against the CPU path
g = torch.Generator().manual_seed(12)
for shape, cout in (((2, 3, 6, 5, 7), 8), ((1, 16, 5, 6, 4), 16)):
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last_3d)
    ps = [torch.randn(cout, shape[1], 3, 3, 3, generator=g) / 4, torch.randn(cout, generator=g),
          torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)]
    grads = []
    for tri in (True, False):
        CN._use_triton = (lambda *a, **k: (KC, KN)) if tri else (lambda *a, **k: None)
        ins = [t.clone().requires_grad_(True) for t in [x] + ps]
        z = CN.conv_norm_act_fwd(*ins, [1] * 3, [1] * 3, [1] * 3, 1e-5, 0.01, 2)[0]
        z.backward(torch.linspace(-1, 1, z.numel()).view(z.shape))
        grads.append([z.detach()] + [t.grad for t in ins])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0), (shape, a.shape)
# a chain's second data gradient sums the first layer's backward sums in its epilogue (over the dz1
# it stores): the first layer's gradients from those partials equal the ones from its own pass (the
# same sums in another order: float64 accumulation for float32, float32 for half types); over
# residue classes (stride 2), 2D, planar, half types and each activation; sample slices of one
# sample and many tiles merged in groups give the same bits
g = torch.Generator().manual_seed(13)
sums = []
orig_sums = KN._bwd_sums
KN._bwd_sums = lambda *a, **k: (sums.append(1), orig_sums(*a, **k))[1]
CHAIN = [((2, 3, 6, 5, 7), 8, 1, True, torch.float32, 2, 0.2), ((1, 16, 5, 6, 4), 20, 2, True, torch.bfloat16, 1, 0.0),
         ((1, 4, 9, 8), 40, 1, False, torch.float32, 0, 0.0),  # 40 channels: two blocks of 32 (float32's cap)
         ((1, 2, 5, 6, 4), 1, 1, True, torch.float32, 2, 0.01),  # 1 channel: contiguous and channels last at once
         ((2, 4, 9, 8), 6, 2, True, torch.float16, 2, 0.01)]  # (the last: the checks after the loop use it)
for ci, (shape, cmid, st2, cl, dt, act1, slope1) in enumerate(CHAIN):
    nd = len(shape) - 2
    fmt = (torch.channels_last_3d if nd == 3 else torch.channels_last) if cl else torch.contiguous_format
    x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=fmt)
    w1 = (torch.randn((cmid, shape[1]) + (3,) * nd, generator=g) / 3).to(dt)
    # shifted planes (|mean| rstd > 8): float32's, and float16's, whose xhat adds the correction for
    # the mean's float32 rounding (xc; at +1000 leaving it out moves the sums by ~1e-5)
    b1 = (torch.randn(cmid, generator=g) + {0: 100, len(CHAIN) - 1: 1000}.get(ci, 0)).to(dt)
    nw1, nb1 = torch.rand(cmid, generator=g) + 0.5, torch.randn(cmid, generator=g)
    z1, y1, m1, r1 = CN._triton_fwd(KC, KN, x, w1, b1, nw1, nb1, [1] * nd, [1] * nd, [1] * nd, 1e-5, slope1, act1)
    w2 = (torch.randn((5, cmid) + (3,) * nd, generator=g) / 6).to(dt)
    nw2, nb2 = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    z2, y2, m2, r2 = CN._triton_fwd(KC, KN, z1, w2, None, nw2, nb2, [st2] * nd, [1] * nd, [1] * nd, 1e-5, 0.01, 2)
    dz2 = torch.randn(z2.shape, generator=g).to(dt)
    a1, be1, sh1 = KN._coefs(m1, r1, nw1, nb1, y1.shape[0], cmid, y1.dtype)
    pro = (a1.float(), be1.float(), sh1.float(), act1, slope1)
    conf2 = ([st2] * nd, [1] * nd, [1] * nd, 0.01, 2)
    sums.clear()
    out = CN._triton_bwd(KN, KB, dz2, y1, w2, y2, nw2, nb2, m2, r2, conf2, None, (True, True, False), prologue=pro,
                         prev_stats=(m1, r1))
    assert out[5] is not None and len(sums) == 1
    conf1 = ([1] * nd, [1] * nd, [1] * nd, slope1, act1)
    fused = CN._triton_bwd(KN, KB, out[0], x, w1, y1, nw1, nb1, m1, r1, conf1, [cmid], (True, True, True),
                           partials=out[5])
    assert len(sums) == 1, "the first layer's own statistics pass ran"
    plain = CN._triton_bwd(KN, KB, out[0], x, w1, y1, nw1, nb1, m1, r1, conf1, [cmid], (True, True, True))
    tol = 1e-12 if dt == torch.float32 else 2e-6
    for i in (0, 1, 3, 4):
        a, b = fused[i].double(), plain[i].double()
        e = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-3)
        assert e <= (tol if i >= 3 else max(tol, 1e-6 if dt == torch.float32 else 2e-2)), (ci, i, e)
    if ci == len(CHAIN) - 1:  # one sample per launch (the grid's sample axis), and the tiles' sums merged in groups
        KB._MAX_N = KN._MAX_N = 1
        one = CN._triton_bwd(KN, KB, dz2, y1, w2, y2, nw2, nb2, m2, r2, conf2, None, (True, True, False),
                             prologue=pro, prev_stats=(m1, r1))
        KB._MAX_N = KN._MAX_N = 65535
        assert all(torch.equal(u, v) for u, v in zip(one[5], out[5]))
        assert out[5][0].shape[1] > 2
        KN.MERGE_ABOVE = 2
        grouped = CN._triton_bwd(KN, KB, out[0], x, w1, y1, nw1, nb1, m1, r1, conf1, [cmid], (True, True, True),
                                 partials=out[5])
        KN.MERGE_ABOVE = 512
        for u, v in zip(grouped[3:5], fused[3:5]):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
# no partials when the previous layer's output does not have dx's strides (the caller's own pass then)
dxp = torch.empty(y1.shape, dtype=dt)
cf = KB.coefficients(*KN._coefs(m2, r2, nw2, nb2, 2, 5, dt), m2, r2, *(torch.zeros(10, dtype=torch.float64),) * 3)
st = (y1, *pro[:3], m1, r1, KN._scalars(0.0, slope1, "cpu"), act1)
dzc = torch.empty_like(y2).copy_(dz2)
assert KB.conv_dgrad(dzc, y2, w2, cf, 2, 0.01, dxp, *conf2[:3], stats=st) is None and y1.stride() != dxp.stride()
dxc = torch.empty_like(y1)
assert KB.conv_dgrad(dzc, y2, w2, cf, 2, 0.01, dxc, *conf2[:3], stats=st) is not None
torch.testing.assert_close(dxp, dxc, rtol=0, atol=0)
KN._bwd_sums = orig_sums
print("ok")
"""


@pytest.mark.background(BWD_SCRIPT, env={"TRITON_INTERPRET": "1"}, timeout=900)
def test_triton_conv_backward_under_the_interpreter(background):
    """The fused backward (norm + activation backward inside the convolution's data and weight
    gradients, dy never stored) against the float64 backward of the same stored y, no further from
    it than PyTorch's unfused backward in the same dtype (float32: to 1e-6), over the forward's
    cases; the split weight-gradient reduction; 64-bit offsets; the op's autograd on this path."""
    r = background
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
