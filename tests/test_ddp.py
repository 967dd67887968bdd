"""Batch Dice across torch.distributed ranks: two gloo processes on the CPU give the same loss and the
same parameter gradients as one process that sees the whole batch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmed import losses as FL


def _make_loss(kind, ddp):
    if kind == "dicece":
        return FL.DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False, ddp=ddp)
    if kind == "dice":
        return FL.DiceLoss(to_onehot_y=True, softmax=True, batch=True, ddp=ddp)
    return FL.NNUNetDiceCELoss(batch_dice=True, ddp=ddp)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 6, 7, 5, generator=g)
    y = torch.randint(0, 3, (4, 1, 6, 7, 5), generator=g)
    return x, y


def _model():
    torch.manual_seed(1)
    return torch.nn.Conv3d(2, 3, kernel_size=3, padding=1)


def _worker(rank, world, init_file, kind, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = _data()
        per = x.shape[0] // world
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        model = torch.nn.parallel.DistributedDataParallel(_model())
        loss = _make_loss(kind, ddp=True)(model(xs), ys)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    # About 1 run in 20 here, a worker aborted in interpreter shutdown, after all of the above had
    # run ("terminate called without an active exception", no Python frame; with and without
    # fastmed's op modules imported). A known PyTorch abort, not fastmed's: pytorch/pytorch#190489
    # (open) reports the same message after gloo jobs and traces it to PyTorch's own teardown
    # (its interpreter callbacks and the autograd engine's worker threads racing interpreter
    # finalization). The results are on disk: skip the shutdown.
    os._exit(0)


@pytest.mark.parametrize("kind", ["dice", "dicece", "nnunet"])
def test_batch_dice_over_two_gloo_ranks(kind, tmp_path):
    world = 2
    init_file = tmp_path / "init"
    mp.start_processes(_worker, args=(world, str(init_file), kind, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    x, y = _data()
    model = _model()
    ref = _make_loss(kind, ddp=False)(model(x), y)
    ref.backward()
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        if kind == "dice":
            # the whole loss is the batch Dice: every rank sees exactly the global value
            torch.testing.assert_close(r["loss"], ref.detach(), rtol=1e-6, atol=1e-7)
        for g, p in zip(r["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
