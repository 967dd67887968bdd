"""CUDA sliding-window stitching against the CPU kernels (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from fastmed import inferers as FI

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def pred3(x):
    return torch.cat([x.sin(), x.cos() * 2, x * x], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_cuda_equals_cpu(dtype, mode):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 37, 45, 29).to(dtype)
    cpu = FI.sliding_window_inference(x, (16, 20, 12), 3, pred3, 0.5, mode)
    gpu = FI.sliding_window_inference(x.cuda(), (16, 20, 12), 3, pred3, 0.5, mode)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    # sin/cos differ by an ulp between devices; the stitching itself rounds the same way
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)


def test_cuda_stitching_bit_identical_to_cpu_for_identical_predictions():
    torch.manual_seed(1)
    x = torch.randn(1, 1, 40, 33, 30)
    table = torch.randn(1, 4, 16, 16, 16)

    def fixed(w):
        return table.to(w.device).expand(w.shape[0], -1, -1, -1, -1) * 1.0

    cpu = FI.sliding_window_inference(x, (16, 16, 16), 2, fixed, 0.5, "gaussian")
    gpu = FI.sliding_window_inference(x.cuda(), (16, 16, 16), 2, fixed, 0.5, "gaussian")
    assert torch.equal(gpu.cpu(), cpu)
    lab_cpu = FI.sliding_window_labels(x, (16, 16, 16), 2, fixed, 0.5, "gaussian")
    lab_gpu = FI.sliding_window_labels(x.cuda(), (16, 16, 16), 2, fixed, 0.5, "gaussian")
    assert torch.equal(lab_gpu.cpu(), lab_cpu)


def test_sw_device_cuda_device_cpu():
    x = torch.randn(1, 1, 30, 30, 30)
    a = FI.sliding_window_inference(x, (16, 16, 16), 2, pred3, 0.25, "gaussian")
    b = FI.sliding_window_inference(x, (16, 16, 16), 2, pred3, 0.25, "gaussian", sw_device="cuda", device="cpu")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_adapt_falls_back_to_cpu_stitching_on_oom(monkeypatch):
    x = torch.randn(1, 1, 30, 30, 30, device="cuda")
    real_empty = FI.empty

    def oom_on_gpu(shape, dtype, device):
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_empty(shape, dtype, device)

    monkeypatch.setattr(FI, "empty", oom_on_gpu)
    inf = FI.SlidingWindowInfererAdapt((16, 16, 16), 2, 0.25, "gaussian")
    with pytest.warns(UserWarning, match="stitching on the CPU"):
        out = inf(x, pred3)
    assert out.device.type == "cpu" and inf.cpu_thresh == 30 * 30 * 30 - 1
    ref = FI.sliding_window_inference(x.cpu(), (16, 16, 16), 2, pred3, 0.25, "gaussian")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_volume_gpu_network_overlapped_copies_with_condition():
    """Volume on the CPU, network on the GPU: batches are staged in pinned memory and copied on a
    side stream; the result and the calls must not change."""
    torch.manual_seed(2)
    x = torch.randn(2, 1, 33, 30, 27)
    cond = torch.randn(2, 1, 33, 30, 27)
    seen = []

    def p(w, condition=None):
        assert w.device == condition.device
        seen.append(float(w.sum().cpu()))
        return pred3(w) + condition

    a = FI.sliding_window_inference(x, (16, 16, 16), 3, p, 0.5, "gaussian", condition=cond)
    calls_cpu = list(seen)
    seen.clear()
    b = FI.sliding_window_inference(x, (16, 16, 16), 3, p, 0.5, "gaussian", sw_device="cuda", device="cpu",
                                    condition=cond)
    assert len(seen) == len(calls_cpu)
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(calls_cpu), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float16])
def test_cuda_fused_softmax_equals_cpu(acc_dtype):
    from fastmed.ops.sliding_window import sw_normalize, sw_normalize_reference

    acc = (torch.randn(2, 7, 9, 10, 11) * 4).to(acc_dtype)
    count = (torch.rand(9, 10, 11) + 0.5).to(acc_dtype)
    gpu = sw_normalize(acc.cuda(), count.cuda(), torch.float32, True).cpu()
    tol = 1e-3 if acc_dtype == torch.float16 else 1e-6
    torch.testing.assert_close(gpu.double(), sw_normalize_reference(acc, count, True), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.float64])
def test_cuda_gather_equals_cat(dtype):
    from fastmed.ops.sliding_window import sw_gather

    vol = (torch.randn(2, 3, 20, 17, 15) * 10).to(dtype).cuda()
    starts = torch.tensor([[0, 0, 0, 0], [1, 4, 9, 7], [0, 12, 1, 8]])
    got = sw_gather(vol, starts, [8, 8, 7])
    want = torch.cat([vol[b:b + 1, :, z:z + 8, y:y + 8, x:x + 7] for b, z, y, x in starts.tolist()])
    assert torch.equal(got, want)


def test_label_map_and_nnunet_modes_overlap_copies_with_a_gpu_network():
    """Volume on the CPU, network on the GPU in the label-map and nnU-Net modes: windows staged in
    pinned memory and copied on a side stream; the same calls and results as all on the CPU."""
    torch.manual_seed(3)
    x = torch.randn(2, 1, 40, 33, 29)
    seen = []

    def p(w):
        seen.append((w.device.type, float(w.double().sum().cpu())))
        return pred3(w)

    a = FI.sliding_window_labels(x, (16, 16, 16), 2, p, 0.5, "gaussian", slab_dim=0)
    cpu_calls = list(seen)
    seen.clear()
    b = FI.sliding_window_labels(x, (16, 16, 16), 2, p, 0.5, "gaussian", sw_device="cuda", device="cpu", slab_dim=0)
    assert [d for d, _ in seen] == ["cuda"] * len(cpu_calls)
    torch.testing.assert_close(torch.tensor([v for _, v in seen]), torch.tensor([v for _, v in cpu_calls]))
    assert b.device.type == "cpu" and (a != b).float().mean() < 1e-3  # argmax ties may flip at float32 rounding
    seen.clear()
    a = FI.nnunet_sliding_window_inference(x, p, (16, 16, 16), 0.5, mirror_axes=(0, 2), sw_batch_size=3)
    n = len(seen)
    seen.clear()
    b = FI.nnunet_sliding_window_inference(x, p, (16, 16, 16), 0.5, mirror_axes=(0, 2), sw_batch_size=3,
                                           sw_device="cuda", device="cpu")
    assert len(seen) == n and all(d == "cuda" for d, _ in seen)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
