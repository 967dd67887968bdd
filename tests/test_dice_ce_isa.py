"""Every instruction-set build of the CPU kernels gives the same results, and sliding-window stitching
the same bits (FASTMED_CPU_ISA picks a
lower build than the machine's best; each runs in its own process because the choice is made once)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import sys, torch, fastmed
from fastmed import losses as FL
torch.manual_seed(0)
out = {"isa": fastmed.build_info()["cpu"]["isa"]}
cases = [
    ("odd", (2, 5, 7, 9, 11), torch.float32, {}, False),
    ("cl", (2, 14, 12, 10, 8), torch.float32, {}, True),
    ("half", (1, 3, 17, 5, 3), torch.float16, {}, False),
    ("opts", (2, 6, 9, 8, 7), torch.float32, {"weight": torch.rand(6) + 0.5, "ignore_index": 5, "label_smoothing": 0.1}, False),
    ("sq", (2, 4, 6, 6, 6), torch.float32, {"squared_pred": True, "jaccard": True}, False),
]
for name, shape, dt, kw, cl in cases:
    x = (torch.randn(shape) * 3).to(dt)
    if cl:
        x = x.to(memory_format=torch.channels_last_3d)
    y = torch.randint(0, shape[1], (shape[0], 1) + shape[2:])
    x.requires_grad_(True)
    loss = FL.DiceCELoss(to_onehot_y=True, softmax=True, **kw)(x, y)
    loss.backward()
    out[name] = (loss.detach().double(), x.grad.double())
from fastmed.ops import resample as R
th = torch.tensor([[0.6, 0.0, 0.0, 0.3], [0.1, 1.3, 0.0, -0.5], [0.0, 0.0, 0.7, 0.2]], dtype=torch.float64)
obl = th.clone(); obl[0, 2] = 0.2
src = torch.randn(2, 3, 17, 9, 13) * 50
for name, t in (("rs_rows", th), ("rs_general", obl)):
    for order in (0, 1, 3):
        out[f"{name}{order}"] = (R.resample(src, t, (11, 13, 19), order=order, padding="reflect").double(),
                                 R.resample(src, t, (11, 13, 19), order=order, padding="border", out="argmax").double())
from fastmed import inferers as FI
vol = torch.randn(2, 2, 37, 45, 29)
def net(w):
    return torch.cat([w.sin(), w.cos() * 2, w * w], 1)
for name, bs in (("sw_b2", 2), ("sw_b5", 5)):  # the stitching kernels: bit-exact in every build
    out[name] = (FI.sliding_window_inference(vol, (16, 20, 12), bs, net, 0.5, "gaussian").double(),
                 FI.sliding_window_inference(vol.double(), (16, 20, 12), bs, net, 0.25, "constant"))
from fastmed.ops import upconv as U
ux, uw, ub = torch.randn(2, 13, 5, 7, 37), torch.randn(13, 11, 2, 2, 2), torch.randn(11)
out["uc_3d"] = (U.upconv(ux, uw, ub).double(), U.upconv(ux, uw[:, :, :1], None, torch.randn(2, 3, 5, 14, 74)).double())
cl = torch.channels_last_3d  # channels last, into the concatenation (40 channels: a partial register block)
ucx, ucw = ux.contiguous(memory_format=cl), torch.randn(13, 40, 2, 2, 1)
out["uc_cl"] = (U.upconv(ucx, ucw, None, torch.randn(2, 5, 10, 14, 37).contiguous(memory_format=cl)).double(),
                U.upconv(ucx, uw, ub, torch.randn(2, 3, 10, 14, 74), True).double())
torch.save(out, sys.argv[1])
"""


def _run(isa, path):
    env = dict(os.environ, FASTMED_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the AVX2 and AVX-512 builds exist on x86-64 only")
def test_all_cpu_builds_agree(tmp_path):
    best = _run("avx512", tmp_path / "best.pt")
    seen = {best["isa"]}
    for isa in ("baseline", "avx2"):
        got = _run(isa, tmp_path / f"{isa}.pt")
        if got["isa"] in seen:
            continue
        seen.add(got["isa"])
        for name in best:
            if name == "isa":
                continue
            l0, g0 = best[name]
            l1, g1 = got[name]
            tol = 2e-3 if name == "half" else 1e-5
            if name.startswith("sw_"):  # sliding window: float32 and float64, bit for bit
                assert torch.equal(l1, l0) and torch.equal(g1, g0), f"{isa} {name}"
                continue
            if name.startswith("uc_"):  # upconv: fused multiply-adds in some builds, not in others
                torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4, msg=f"{isa} {name}")
                torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-4, msg=f"{isa} {name}")
                continue
            if name.startswith("rs_"):  # resampled values (and labels: exactly)
                torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-3, msg=f"{isa} {name}")
                frac = (g1 != g0).double().mean().item()
                assert frac < 1e-3, f"{isa} {name} argmax differs at {frac:.2%} of voxels"
                continue
            torch.testing.assert_close(l1, l0, rtol=tol, atol=tol, msg=f"{isa} {name} loss")
            torch.testing.assert_close(g1, g0, rtol=tol, atol=tol * 1e-2 if name != "half" else tol,
                                       msg=f"{isa} {name} grad")
    # x86-64 always has the baseline build and this project's CI machines have AVX2 too
    assert {"baseline", "avx2"} <= seen, seen
