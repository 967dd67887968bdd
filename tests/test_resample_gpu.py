"""CUDA resampling against the CPU kernel (skipped without a GPU)."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastmed.ops import resample as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _theta(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.diag(torch.rand(3, generator=g, dtype=torch.float64) * 1.5 + 0.4)
    if kind == "oblique":
        a = a + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    return torch.cat([a, torch.randn(3, 1, generator=g, dtype=torch.float64) * 2], 1)


@pytest.mark.parametrize("kind,order,padding", list(itertools.product(["diagonal", "oblique"], [0, 1, 3],
                                                                       list(R.PADDINGS))))
def test_cuda_equals_cpu_float64(kind, order, padding):
    x = torch.randn(2, 3, 17, 20, 13, dtype=torch.float64)
    th = _theta(kind)
    kw = dict(order=order, padding=padding, cval=0.5, compute_dtype=torch.float64)
    cpu = R.resample(x, th, (11, 23, 14), **kw)
    gpu = R.resample(x.cuda(), th, (11, 23, 14), **kw).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.int16])
def test_cuda_dtypes(dtype, out_dtype):
    x = (torch.rand(1, 2, 15, 16, 17) * 200).to(dtype)
    th = _theta("oblique", 1)
    cpu = R.resample(x, th, (9, 10, 11), order=1, padding="border", out_dtype=out_dtype)
    gpu = R.resample(x.cuda(), th, (9, 10, 11), order=1, padding="border", out_dtype=out_dtype).cpu()
    tol = 0 if not out_dtype.is_floating_point else (1e-4 if out_dtype == torch.float32 else 1e-1)
    if out_dtype.is_floating_point:
        torch.testing.assert_close(gpu.double(), cpu.double(), rtol=tol, atol=tol * 200)
    else:  # a value within rounding of .5 may round either way
        assert (gpu.long() - cpu.long()).abs().max() <= 1


@pytest.mark.parametrize("order", [0, 1, 3])
def test_cuda_argmax_and_labels(order):
    logits = torch.randn(1, 14, 15, 16, 17, dtype=torch.float64)
    th = _theta("oblique", 2)
    cpu = R.resample(logits, th, (9, 10, 11), order=order, padding="border", out="argmax", compute_dtype=torch.float64)
    gpu = R.resample(logits.cuda(), th, (9, 10, 11), order=order, padding="border", out="argmax",
                     compute_dtype=torch.float64).cpu()
    assert torch.equal(gpu, cpu)
    if order == 3:  # labels mode is orders 0 and 1
        return
    seg = torch.randint(0, 5, (1, 1, 15, 16, 17), dtype=torch.int16)
    for pad, cval in (("border", 0), ("zeros", 7)):
        cpu = R.resample(seg, th, (9, 10, 11), order=order, padding=pad, cval=cval, out="labels")
        gpu = R.resample(seg.cuda(), th, (9, 10, 11), order=order, padding=pad, cval=cval, out="labels").cpu()
        assert torch.equal(gpu, cpu)  # float64 sums on both devices


def test_cuda_batched_theta_channels_last_size_one_and_empty():
    x = torch.randn(3, 2, 9, 1, 11, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    th = torch.stack([_theta("oblique", s) for s in range(3)])
    for order in (0, 1, 3):
        kw = dict(order=order, padding="zeros", compute_dtype=torch.float64)
        torch.testing.assert_close(R.resample(x.cuda(), th, (5, 4, 6), **kw).cpu(), R.resample(x, th, (5, 4, 6), **kw),
                                   rtol=0, atol=1e-10)
    assert R.resample(x.cuda(), th, (0, 4, 6)).shape == (3, 2, 0, 4, 6)


@pytest.mark.parametrize("boundary", ["mirror", "reflect"])
@pytest.mark.parametrize("n", [2, 5, 64])
def test_cuda_prefilter(boundary, n):
    x = torch.randn(2, 2, n, 7, 9, dtype=torch.float64)
    cpu = R.spline_prefilter(x, None, boundary)
    gpu = R.spline_prefilter(x.cuda(), None, boundary).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-10)
    torch.testing.assert_close(R.spline_prefilter(x.float().cuda(), None, boundary).cpu().double(), cpu,
                               rtol=0, atol=1e-5)
