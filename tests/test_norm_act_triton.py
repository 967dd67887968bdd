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
for shape in [(2, 3, 5, 7, 9), (1, 2, 17, 13, 11), (3, 1, 40, 33)]:   # one plane longer than a block
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for act, code in (("leaky_relu", 2), ("relu", 1), ("none", 0)):
            for affine in (True, False):
                x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dt)
                C, planes = shape[1], shape[0] * shape[1]
                w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dt) if affine else None
                b = torch.randn(C, generator=g, dtype=torch.float64).to(dt) if affine else None
                dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dt)
                y = torch.empty_like(x)
                mean = torch.empty(planes, dtype=torch.float64)
                rstd = torch.empty(planes, dtype=torch.float64)
                K.norm_act_fwd(x, w, b, 1e-5, 0.03, code, y, mean, rstd)
                x2 = x.clone()
                K.norm_act_fwd(x2, w, b, 1e-5, 0.03, code, x2, mean.clone(), rstd.clone())
                assert torch.equal(x2, y), "in place differs"
                dx = torch.empty_like(x)
                dw = torch.empty(planes, dtype=torch.float64)
                db = torch.empty(planes, dtype=torch.float64)
                K.norm_act_bwd(dy, x, w, b, mean, rstd, 0.03, code, dx, dw, db)
                x64 = x.double()
                w64 = w.double() if affine else None
                b64 = b.double() if affine else None
                ref = NA.norm_act_reference(x64, w64, b64, 1e-5, act, 0.03)
                _, m64, r64 = NA._reference_fwd(x64, w64, b64, 1e-5, 0.03, code)
                rdx, rdw, rdb = NA._reference_bwd(dy.double(), x64, w64, b64, m64.flatten(), r64.flatten(), 0.03, code)
                scale = ref.abs().max().item()
                errs = {"y": (y.double() - ref).abs().max().item() / scale,
                        "mean": (mean - m64.flatten()).abs().max().item(),
                        "dx": (dx.double() - rdx).abs().max().item() / rdx.abs().max().item(),
                        "dw": (dw.view(shape[0], C).sum(0) - rdw).abs().max().item() / (rdw.abs().max().item() + 1),
                        "db": (db.view(shape[0], C).sum(0) - rdb).abs().max().item() / (rdb.abs().max().item() + 1)}
                if dt in (torch.float32, torch.float64):  # against the C++ kernel too
                    yc = NA.norm_act(x, w, b, 1e-5, act, 0.03)
                    errs["y_vs_cpu"] = (y.double() - yc.double()).abs().max().item() / scale
                key = str(dt)
                for k, v in errs.items():
                    worst[(key, k)] = max(worst.get((key, k), 0.0), v)
for (dt, k), v in sorted(worst.items()):
    print(dt, k, v)
tol = {"torch.float64": 1e-12, "torch.float32": 2e-6, "torch.float16": 2e-3, "torch.bfloat16": 2e-2}
bad = [(dt, k, v) for (dt, k), v in worst.items() if v > tol[dt]]
assert not bad, bad
"""


def test_triton_norm_act_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
