"""pytest-benchmark view of the sliding-window case in fastmed.bench (same volume and predictor).

    pytest benches/bench_sliding_window.py [--device cuda]

``fastmed bench`` prints the stitching overhead (time beyond the predictor's own) against MONAI.
"""
import pytest
import torch

from fastmed import bench


def _impl(name):
    if name == "fastmed":
        from fastmed.inferers import sliding_window_inference
    else:
        monai = pytest.importorskip("monai")
        from monai.inferers import sliding_window_inference
    return sliding_window_inference


@pytest.mark.parametrize("impl", ["fastmed", "monai"])
def test_sliding_window(benchmark, impl, device):
    fn = _impl(impl)
    x, net, kw = bench._sw_case(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            fn(x, kw["roi_size"], kw["sw_batch_size"], net, kw["overlap"], kw["mode"])
        sync()

    benchmark.group = "sliding window 14 classes 192x192x160 roi 96^3"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
