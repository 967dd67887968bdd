"""The Triton kernels of fastmed::norm_act (the CUDA path) run under TRITON_INTERPRET=1 on the CPU:
forward, in place and backward against the C++ kernel (float32 / float64) and the float64
reference (float16 / bfloat16). In a subprocess: the interpreter must be on before triton loads."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from fastmed.kernels import norm_act_triton as K
from fastmed.ops import norm_act as NA

g = torch.Generator().manual_seed(0)
worst = {}
# small planes (a tile spans channels), planes over several statistics chunks (> 8192 voxels), 2D,
# channels last (one and two channel blocks), and a plane with fewer voxels than a tile row
CASES = [((2, 3, 5, 7, 9), False), ((1, 2, 20, 21, 22), False), ((3, 1, 40, 33), False),
         ((2, 3, 5, 7, 9), True), ((1, 5, 20, 21, 22), True), ((2, 130, 3, 4, 5), True), ((2, 6, 37, 3), True)]
for shape, cl in CASES:
    fmt = (torch.channels_last_3d if len(shape) == 5 else torch.channels_last) if cl else torch.contiguous_format
    # float16 on the first cases only: bfloat16's code with another element type (CI's 20 minutes)
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16) if shape in [c for c, _ in CASES[:3]] \
            else (torch.float32, torch.float64, torch.bfloat16):
        for act, code in (("leaky_relu", 2), ("relu", 1), ("none", 0), ("prelu", 3)):
            for affine in (True, False):
                if shape[1] == 130 and (act not in ("leaky_relu", "prelu") or dt == torch.float64 or not affine):
                    continue  # the slow interpreter: few combinations are enough for this one
                x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dt)
                x = x.contiguous(memory_format=fmt)
                assert K.is_supported_layout(x)
                C, planes = shape[1], shape[0] * shape[1]
                w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dt) if affine else None
                b = torch.randn(C, generator=g, dtype=torch.float64).to(dt) if affine else None
                dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dt).contiguous(memory_format=fmt)
                # PReLU: one weight for all channels (MONAI's UNet) or one per channel, alternately
                pw = None
                if code == 3:
                    pw = (torch.rand(C if affine else 1, generator=g, dtype=torch.float64) - 0.3).to(NA._affine_arg(x, x).dtype)
                y = torch.empty_like(x)
                assert y.stride() == x.stride()
                mean = torch.empty(planes, dtype=torch.float64)
                rstd = torch.empty(planes, dtype=torch.float64)
                K.norm_act_fwd(x, w, b, 1e-5, 0.03, code, y, mean, rstd, pw)
                x2 = x.clone()
                K.norm_act_fwd(x2, w, b, 1e-5, 0.03, code, x2, mean.clone(), rstd.clone(), pw)
                assert torch.equal(x2, y), "in place differs"
                y2, mean2, rstd2 = torch.empty_like(x), torch.empty_like(mean), torch.empty_like(rstd)
                K.norm_act_fwd(x, w, b, 1e-5, 0.03, code, y2, mean2, rstd2, pw)
                assert torch.equal(y2, y) and torch.equal(mean2, mean) and torch.equal(rstd2, rstd), "not deterministic"
                dx = torch.empty_like(x)
                dw = torch.empty(planes, dtype=torch.float64)
                db = torch.empty(planes, dtype=torch.float64)
                dp = torch.empty(planes if code == 3 else 0, dtype=torch.float64)
                K.norm_act_bwd(dy, x, w, b, mean, rstd, 0.03, code, dx, dw, db, pw, dp)
                x64 = x.double()
                w64 = w.double() if affine else None
                b64 = b.double() if affine else None
                p64 = pw.double() if pw is not None else None
                ref = NA.norm_act_reference(x64, w64, b64, 1e-5, act, 0.03, p64)
                _, m64, r64 = NA._reference_fwd(x64, w64, b64, 1e-5, 0.03, code, p64)
                rdx, rdw, rdb, rdp = NA._reference_bwd(dy.double(), x64, w64, b64, m64.flatten(), r64.flatten(), 0.03,
                                                       code, p64)
                scale = ref.abs().max().item()
                errs = {"y": (y.double() - ref).abs().max().item() / scale,
                        "mean": (mean - m64.flatten()).abs().max().item(),
                        "dx": (dx.double() - rdx).abs().max().item() / rdx.abs().max().item(),
                        "dw": (dw.view(shape[0], C).sum(0) - rdw).abs().max().item() / (rdw.abs().max().item() + 1),
                        "db": (db.view(shape[0], C).sum(0) - rdb).abs().max().item() / (rdb.abs().max().item() + 1)}
                if code == 3:
                    kdp = NA._prelu_grad(dp, pw, shape[0], C, 3)
                    errs["dprelu"] = (kdp - rdp).abs().max().item() / (rdp.abs().max().item() + 1)
                if dt in (torch.float32, torch.float64):  # against the C++ kernel too
                    yc = NA.norm_act(x, w, b, 1e-5, act, 0.03, pw)
                    errs["y_vs_cpu"] = (y.double() - yc.double()).abs().max().item() / scale
                    if dt == torch.float32:
                        errs["y_bits_vs_cpu"] = float((y != yc).sum().item()) / y.numel()
                key = str(dt)
                for k, v in errs.items():
                    worst[(key, k)] = max(worst.get((key, k), 0.0), v)
# the op's glue around the kernels (layouts, dtypes of weight / bias, sums over n), as the CUDA path
# calls it, against the C++ kernel's op on the same CPU tensors
for cl, code, pw in ((False, 2, None), (True, 2, None), (False, 3, torch.tensor([0.2])),
                     (True, 3, torch.tensor([0.1, -0.2, 0.3, 0.25]))):
    x = torch.randn(2, 4, 6, 5, 7, generator=g, dtype=torch.float64).float()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    xs = x[:, :, ::1, :, 1:]  # neither layout: copied first
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    dy = torch.randn(2, 4, 6, 5, 7, generator=g)
    for xin, dyin in ((x, dy), (xs, dy[..., 1:])):
        mean, rstd = torch.empty(8, dtype=torch.float64), torch.empty(8, dtype=torch.float64)
        y = NA._triton_fwd(K, xin, w, b, 1e-5, 0.01, code, mean, rstd, pw)
        xr = xin if K.is_supported_layout(xin) else xin.contiguous()  # the C++ op takes these layouts
        yc, mc, rc = NA.norm_act_fwd(xr, w, b, 1e-5, 0.01, code, pw)
        assert torch.equal(y, yc) and y.stride() == yc.stride(), "glue fwd"
        dx, dw, db, dp = NA._triton_bwd(K, dyin, xin, w, b, mean, rstd, 0.01, code, pw)
        dxc, dwc, dbc, dpc = NA.norm_act_bwd(dyin, xr, w, b, mc, rc, 0.01, code, pw)
        assert dx.stride() == dxc.stride() and dp.shape == dpc.shape == (pw.shape if pw is not None else (0,))
        torch.testing.assert_close(dx, dxc, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dw, dwc, rtol=1e-6, atol=1e-6)  # float32 g * xhat: summed in another order
        torch.testing.assert_close(db, dbc, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dp, dpc, rtol=1e-6, atol=1e-6)
# empty tensors: nothing to do, no error (an error would switch Triton off for the process)
for shape in ((0, 3, 4, 4), (2, 0, 4, 4)):
    x = torch.randn(shape)
    mean, rstd = torch.empty(x.shape[0] * x.shape[1], dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    K.norm_act_fwd(x, None, None, 1e-5, 0.01, 2, torch.empty_like(x), mean, mean)
    K.norm_act_bwd(x, x, None, None, mean, mean, 0.01, 2, torch.empty_like(x), mean, mean)
# more samples than one grid axis takes: processed in slices
import fastmed.kernels.norm_act_triton as KM
KM._MAX_N = 2
x = torch.randn(5, 3, 4, 6)
y, mean, rstd = torch.empty_like(x), torch.empty(15, dtype=torch.float64), torch.empty(15, dtype=torch.float64)
K.norm_act_fwd(x, None, None, 1e-5, 0.01, 2, y, mean, rstd)
assert torch.equal(y, NA.norm_act(x)), "sliced over samples"
KM._MAX_N = 65535
# PReLU's sums when a plane's chunk sums are first added in groups (many chunks)
x = torch.randn(1, 3, 30, 30, 30, generator=g)
pw, dy = torch.tensor([0.2, -0.1, 0.3]), torch.randn(1, 3, 30, 30, 30, generator=g)
outs = []
for merge in (512, 2):
    K.MERGE_ABOVE = merge
    mean, rstd = torch.empty(3, dtype=torch.float64), torch.empty(3, dtype=torch.float64)
    y = torch.empty_like(x)
    K.norm_act_fwd(x, None, None, 1e-5, 0.01, 3, y, mean, rstd, pw)
    dx, dw, db, dp = torch.empty_like(x), *(torch.empty(3, dtype=torch.float64) for _ in range(3))
    K.norm_act_bwd(dy, x, None, None, mean, rstd, 0.01, 3, dx, dw, db, pw, dp)
    outs.append((y, dx, dw, db, dp))
K.MERGE_ABOVE = 512
for a, b in zip(*outs):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
# a NaN plane: ReLU keeps it NaN and its backward passes the gradient there (eager's rules), as the
# C++ kernel does
x = torch.randn(1, 2, 4, 5, 3, generator=g)
x[0, 0, 1, 1, 1] = float("nan")
dy = torch.randn(1, 2, 4, 5, 3, generator=g)
mean, rstd = torch.empty(2, dtype=torch.float64), torch.empty(2, dtype=torch.float64)
y = torch.empty_like(x)
K.norm_act_fwd(x, None, None, 1e-5, 0.0, 1, y, mean, rstd)
assert y[0, 0].isnan().all() and not y[0, 1].isnan().any(), "NaN through ReLU"
dx, dw, db = torch.empty_like(x), torch.empty(2, dtype=torch.float64), torch.empty(2, dtype=torch.float64)
K.norm_act_bwd(dy, x, None, None, mean, rstd, 0.0, 1, dx, dw, db)
dxc, dwc, dbc, _ = NA.norm_act_bwd(dy, x, None, None, mean, rstd, 0.0, 1, None)
torch.testing.assert_close(db, dbc, rtol=1e-6, atol=1e-6)
assert abs(db[0].item() - dy[0, 0].double().sum().item()) < 1e-5, "ReLU's gradient at NaN"
for (dt, k), v in sorted(worst.items()):
    print(dt, k, v)
tol = {"torch.float64": 1e-12, "torch.float32": 2e-6, "torch.float16": 2e-3, "torch.bfloat16": 2e-2}
bad = [(dt, k, v) for (dt, k), v in worst.items() if v > (1e-3 if k == "y_bits_vs_cpu" else tol[dt])]
assert not bad, bad
"""


@pytest.mark.background(SCRIPT, env={"TRITON_INTERPRET": "1"}, timeout=600)
def test_triton_norm_act_under_the_interpreter(background):
    r = background
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


SETS_SCRIPT = r"""
import torch
from fastmed.kernels import norm_act_triton as K
from fastmed.ops import norm_act as NA

g = torch.Generator().manual_seed(1)
worst = {}


def err(a, b, floor=1e-30):
    return ((a.double() - b.double()).abs().max() / (b.double().abs().max() + floor)).item()


# group norm (kind 1: groups of channels per sample, one group and one channel per group too),
# batch norm over the batch (2) and with given running statistics (3); planar and channels last;
# planes over several statistics chunks
CASES = [((2, 4, 5, 7, 9), False), ((3, 6, 20, 21, 22), False), ((2, 4, 5, 7, 9), True), ((2, 6, 37, 3), True)]
for shape, cl in CASES:
    fmt = (torch.channels_last_3d if len(shape) == 5 else torch.channels_last) if cl else torch.contiguous_format
    N, C = shape[:2]
    for kind, groups in ((1, 2), (1, 1), (1, C), (2, 1), (3, 1)):
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for code in (2, 3, 0):
                if shape[2] == 20 and (dt != torch.float32 or code == 0):
                    continue  # the slow interpreter
                x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dt).contiguous(memory_format=fmt)
                affine = code != 0
                pt = NA._affine_arg(x, x).dtype
                w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pt) if affine else None
                b = torch.randn(C, generator=g, dtype=torch.float64).to(pt) if affine else None
                pw = (torch.rand(C if groups > 1 else 1, generator=g, dtype=torch.float64) - 0.3).to(pt) \
                    if code == 3 else None
                rm = torch.randn(C, dtype=torch.float64, generator=g)
                rv = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
                dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dt).contiguous(memory_format=fmt)
                mean, rstd = torch.empty(N * C, dtype=torch.float64), torch.empty(N * C, dtype=torch.float64)
                if kind == 3:
                    NA._given_stats(x, rm, rv, 1e-5, mean, rstd)
                y = torch.empty_like(x)
                K.norm_act_fwd(x, w, b, 1e-5, 0.03, code, y, mean, rstd, pw, kind, groups)
                x2, m2, r2 = x.clone(), mean.clone(), rstd.clone()
                K.norm_act_fwd(x2, w, b, 1e-5, 0.03, code, x2, m2, r2, pw, kind, groups)
                assert torch.equal(x2, y) and torch.equal(m2, mean) and torch.equal(r2, rstd), "in place differs"
                dx = torch.empty_like(x)
                dw, db = torch.empty(N * C, dtype=torch.float64), torch.empty(N * C, dtype=torch.float64)
                dp = torch.empty(N * C if code == 3 else 0, dtype=torch.float64)
                K.norm_act_bwd(dy, x, w, b, mean, rstd, 0.03, code, dx, dw, db, pw, dp, kind, groups)
                dx2 = torch.empty_like(x)
                K.norm_act_bwd(dy, x, w, b, mean, rstd, 0.03, code, dx2, dw.clone(), db.clone(), pw, dp.clone(), kind,
                               groups)
                assert torch.equal(dx2, dx), "backward not deterministic"
                x64, d = x.double(), (lambda t: None if t is None else t.double())
                ry, rmn, rr = NA._reference_fwd(x64, d(w), d(b), 1e-5, 0.03, code, d(pw), kind, groups, rm, rv)
                rdx, rdw, rdb, rdp = NA._reference_bwd(dy.double(), x64, d(w), d(b), rmn.flatten(), rr.flatten(), 0.03,
                                                       code, d(pw), kind, groups)
                errs = {"y": err(y, ry), "mean": err(mean, rmn.flatten()), "rstd": err(rstd, rr.flatten()),
                        "dx": err(dx, rdx), "dw": err(dw.view(N, C).sum(0), rdw, 1.0),
                        "db": err(db.view(N, C).sum(0), rdb, 1.0)}  # sums: relative to max(|ref|) + 1
                if code == 3:
                    errs["dprelu"] = err(NA._prelu_grad(dp, pw, N, C, 3), rdp, 1.0)
                if dt in (torch.float32, torch.float64):  # against the C++ kernel's op
                    yc, mc, rc = NA.norm_act_fwd(x, w, b, 1e-5, 0.03, code, pw, kind, groups,
                                                 rm if kind == 3 else None, rv if kind == 3 else None)
                    dxc = NA.norm_act_bwd(dy, x, w, b, mc, rc, 0.03, code, pw, kind, groups)[0]
                    errs["y_vs_cpu"], errs["dx_vs_cpu"] = err(y, yc), err(dx, dxc)
                for k, v in errs.items():
                    worst[(str(dt), k)] = max(worst.get((str(dt), k), 0.0), v)
# the op's glue as the CUDA path calls it (float32 weight and bias for half x, running statistics,
# layouts, sums over n) against the C++ op on the same CPU tensors
for cl, kind, groups, code, pw in ((False, 2, 1, 2, None), (True, 1, 2, 3, torch.tensor([0.2])),
                                   (True, 3, 1, 3, torch.tensor([0.1, -0.2, 0.3, 0.25])), (False, 1, 4, 1, None)):
    x = torch.randn(3, 4, 6, 5, 7, generator=g, dtype=torch.float64).float()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    dy = torch.randn(3, 4, 6, 5, 7, generator=g)
    mean, rstd = torch.empty(12, dtype=torch.float64), torch.empty(12, dtype=torch.float64)
    if kind == 3:
        NA._given_stats(x, rm, rv, 1e-5, mean, rstd)
    y = NA._triton_fwd(K, x, w, b, 1e-5, 0.01, code, mean, rstd, pw, kind, groups)
    yc, mc, rc = NA.norm_act_fwd(x, w, b, 1e-5, 0.01, code, pw, kind, groups, rm if kind == 3 else None,
                                 rv if kind == 3 else None)
    torch.testing.assert_close(y, yc, rtol=1e-6, atol=1e-6)
    assert y.stride() == yc.stride()
    torch.testing.assert_close(mean, mc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, rc, rtol=1e-12, atol=1e-12)
    out = NA._triton_bwd(K, dy, x, w, b, mean, rstd, 0.01, code, pw, kind, groups)
    ref = NA.norm_act_bwd(dy, x, w, b, mc, rc, 0.01, code, pw, kind, groups)
    for a, r in zip(out, ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
# batch norm across sample slices (more samples than one grid axis takes), and planes whose chunk
# sums are first merged in groups: the same values
x = torch.randn(5, 3, 30, 30, 30, generator=g)
dy = torch.randn(5, 3, 30, 30, 30, generator=g)
outs = []
for max_n, merge in ((65535, 512), (2, 2)):
    K._MAX_N, K.MERGE_ABOVE = max_n, merge
    mean, rstd = torch.empty(15, dtype=torch.float64), torch.empty(15, dtype=torch.float64)
    y = torch.empty_like(x)
    K.norm_act_fwd(x, None, None, 1e-5, 0.01, 2, y, mean, rstd, None, 2)
    dx, dw, db = torch.empty_like(x), torch.empty(15, dtype=torch.float64), torch.empty(15, dtype=torch.float64)
    K.norm_act_bwd(dy, x, None, None, mean, rstd, 0.01, 2, dx, dw, db, None, None, 2)
    outs.append((y, mean, rstd, dx, dw, db))
K._MAX_N, K.MERGE_ABOVE = 65535, 512
for a, b in zip(*outs):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
yc = NA.batch_norm_act(x, None, None, training=True)
torch.testing.assert_close(outs[0][0], yc, rtol=1e-6, atol=1e-6)
for (dt, k), v in sorted(worst.items()):
    print(dt, k, v)
tol = {"torch.float64": 1e-12, "torch.float32": 2e-6, "torch.float16": 2e-3, "torch.bfloat16": 2e-2}
bad = [(dt, k, v) for (dt, k), v in worst.items() if v > tol[dt]]
assert not bad, bad
"""


@pytest.mark.background(SETS_SCRIPT, env={"TRITON_INTERPRET": "1"}, timeout=900)
def test_triton_group_and_batch_norm_under_the_interpreter(background):
    r = background
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


FAR_SCRIPT = r"""
import torch
from fastmed.kernels import norm_act_triton as K
from fastmed.ops import norm_act as NA

g = torch.Generator().manual_seed(2)
# planes far from 0 against their spread (mean 100, spread 0.01; mean 1000, spread 1e-4; a constant
# plane): the elementwise pass subtracts the mean first there, as the C++ kernel (the same bits in
# float32); forward and backward as float64's on the same input
for cl in (False, True):
    for kind, groups in ((0, 1), (1, 2), (2, 1), (3, 1)):
        for dt in (torch.float32, torch.bfloat16):
            x = 100 + 0.01 * torch.randn(2, 4, 5, 6, 7, generator=g, dtype=torch.float64)
            x[:, 1] = 1000 + 1e-4 * torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
            if kind != 2:
                x[1, 3] = 1000.0
            x = x.to(dt)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
            x64 = x.double()
            rm = x64.mean((0, 2, 3, 4)).float()
            rv = x64.var((0, 2, 3, 4)).float().clamp_min(1e-8)
            dy = torch.randn(x.shape, generator=g).to(dt)
            mean, rstd = torch.empty(8, dtype=torch.float64), torch.empty(8, dtype=torch.float64)
            if kind == 3:
                NA._given_stats(x, rm, rv, 1e-5, mean, rstd)
            y = NA._triton_fwd(K, x, w, b, 1e-5, 0.01, 2, mean, rstd, None, kind, groups)
            dx = NA._triton_bwd(K, dy, x, w, b, mean, rstd, 0.01, 2, None, kind, groups)[0]
            ry, rmn, rr = NA._reference_fwd(x64, w.double(), b.double(), 1e-5, 0.01, 2, None, kind, groups,
                                           rm.double(), rv.double())
            rdx = NA._reference_bwd(dy.double(), x64, w.double(), b.double(), rmn.flatten(), rr.flatten(), 0.01, 2,
                                    None, kind, groups)[0]
            tol = 2e-6 if dt == torch.float32 else 2e-2  # bfloat16: its own rounding of y and dx
            ey = (y.double() - ry).abs().max().item()
            edx = ((dx.double() - rdx).norm() / rdx.norm()).item()
            assert ey < tol and edx < (1e-5 if dt == torch.float32 else 1e-2), (cl, kind, dt, ey, edx)
            if kind == 0:
                # the bias (to the slope's rounding in float32, LeakyReLU's product; bfloat16: to one
                # unit of its last place, the interpreter's conversion)
                want = torch.nn.functional.leaky_relu(b[3], 0.01)
                rel = 1.2e-7 if dt == torch.float32 else 2 ** -7
                assert (y[1, 3].float() - want).abs().max().item() <= rel * abs(want.item()), (cl, dt)
            if dt == torch.float32:
                yc = NA.norm_act_fwd(x, w, b, 1e-5, 0.01, 2, None, kind, groups, rm if kind == 3 else None,
                                     rv if kind == 3 else None)[0]
                assert torch.equal(y, yc), (cl, kind)
# batch norm with given statistics: dx finite at an infinite x (dx = dz w rstd, as eager)
x = torch.randn(2, 3, 4, 5, 3, generator=g)
x[0, 1, 1, 1, 1], x[1, 2, 0, 0, 0] = float("inf"), -float("inf")
rm, rv, w = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) + 0.5
mean, rstd = torch.empty(6, dtype=torch.float64), torch.empty(6, dtype=torch.float64)
NA._given_stats(x, rm, rv, 1e-5, mean, rstd)
dy = torch.randn(x.shape, generator=g)
dx = NA._triton_bwd(K, dy, x, w, None, mean, rstd, 0.01, 2, None, 3, 1)[0]
want = NA.norm_act_bwd(dy, x, w, None, mean, rstd, 0.01, 2, None, 3, 1)[0]
assert dx.isfinite().all()
torch.testing.assert_close(dx, want, rtol=1e-6, atol=1e-6)
print("ok")
"""


@pytest.mark.background(FAR_SCRIPT, env={"TRITON_INTERPRET": "1"}, timeout=900)
def test_triton_planes_far_from_zero_under_the_interpreter(background):
    r = background
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
