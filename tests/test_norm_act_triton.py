"""The Triton kernels of fastmed::norm_act (the CUDA path) run under TRITON_INTERPRET=1 on the CPU:
forward, in place and backward against the C++ kernel (float32 / float64) and the float64
reference (float16 / bfloat16). In a subprocess: the interpreter must be on before triton loads."""
from __future__ import annotations

import os
import subprocess
import sys

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
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
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
for (dt, k), v in sorted(worst.items()):
    print(dt, k, v)
tol = {"torch.float64": 1e-12, "torch.float32": 2e-6, "torch.float16": 2e-3, "torch.bfloat16": 2e-2}
bad = [(dt, k, v) for (dt, k), v in worst.items() if v > (1e-3 if k == "y_bits_vs_cpu" else tol[dt])]
assert not bad, bad
"""


def test_triton_norm_act_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
