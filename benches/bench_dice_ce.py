"""pytest-benchmark view of the dice_ce cases in fastmed.bench (same inputs, same baselines).

    pytest benches/bench_dice_ce.py --benchmark-group-by=param:case [--device cuda]

``fastmed bench`` prints the same cases as one table with ratios, GB/s and peak memory.
"""
import pytest
import torch

from fastmed import bench

CASES = [c for c in bench.cases(quick=False) if c.op == "dice_ce"]


@pytest.mark.parametrize("impl", ["fastmed", "monai"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_dice_ce(benchmark, case, impl, phase, device):
    x, y = case.make_inputs(device)
    loss = case.impls[impl]()
    xr = x.detach().clone().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            loss(xr, y)
        sync()

    def both():
        xr.grad = None
        loss(xr, y).backward()
        sync()

    benchmark.group = f"{case.name} {phase}"
    benchmark.pedantic(fwd if phase == "fwd" else both, rounds=5, warmup_rounds=1)
