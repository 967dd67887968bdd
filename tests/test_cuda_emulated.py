"""fastmed's CUDA C++ kernels (csrc/*/*_cuda.cu) run on the CPU under fmemu (tests/cuda_emu), against
the CPU kernels and the float64 references.

No GPU has run these kernels yet; the GPU tests (tests/*_gpu.py, run by benches/gpu/run.sh) do that
where one is lent. Here the same sources, compiled by the host compiler with fmemu's stand-ins for
the CUDA headers, run their blocks as fibers: barriers, warp shuffles, shared memory, grid-stride
loops and the launch checks of the CUDA runtime are emulated, and a barrier not reached by every
thread, a shuffle not reached by the whole warp or a bad launch configuration is an error; shared
memory and the ops' fresh outputs start as garbage. What this cannot see: the device's own
arithmetic (FMA contraction, its exp / log) and performance; out-of-bounds accesses only in the
AddressSanitizer pass, races only in the ThreadSanitizer pass (a thread runs uninterrupted from one
barrier to the next, so a missing atomic still sums right in the others).

``test_under_address_sanitizer`` runs this file again in a process with AddressSanitizer, the
emulated kernels built with it: a read or write past the end of any tensor fails there.
``test_under_thread_sanitizer`` runs it (a sample of the large grids) with ThreadSanitizer, each
emulated GPU thread a fiber ordered only by barriers, atomics and launch boundaries: two threads
touching one address, one writing, with nothing between them, fail there.

The ops are called as usual with CPU tensors; ``emulated_gpu()`` makes ``fastmed._ext.require``
hand them the emulated module instead of fastmed._C for the ops the CUDA module implements, so the
whole Python side (parameter packing, workspace sizes, error handling) is the CUDA path's.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from fastmed import _ext
from fastmed import inferers as FI
from fastmed import losses as FL
from fastmed.ops import dice_ce as D
from fastmed.ops import resample as R
from fastmed.ops import sliding_window as SW

_spec = importlib.util.spec_from_file_location("fastmed_cuda_emu_build", Path(__file__).parent / "cuda_emu" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# the ops whose kernels fastmed._C_cuda implements (the op names they pass to _ext.require)
CUDA_OPS = {"dice_ce", "sw_gather", "sw_accumulate", "sw_normalize", "resample", "spline_prefilter"}

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="needs a C++ compiler to build the emulation")


@pytest.fixture(scope="module")
def emu():
    return build.load(sanitize=os.environ.get("FMEMU_ASAN") == "1", fma=os.environ.get("FMEMU_FMA") == "1",
                      tsan=os.environ.get("FMEMU_TSAN") == "1")


def _garbage(t):
    """Fill a fresh tensor with what a GPU allocation may hold: NaN, or -1 (a fresh CPU page is 0,
    which would hide an output element no kernel wrote)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool and not t.is_complex():
        t.fill_(-1)
    return t


@contextlib.contextmanager
def emulated_gpu(emu, **env):
    """fastmed's ops run the emulated CUDA kernels, and torch.empty's new tensors hold garbage;
    ``env`` sets fmemu's variables meanwhile."""
    real = _ext.require
    old = {k: os.environ.get(k) for k in env}
    empties = (torch.empty, torch.empty_like, torch.Tensor.new_empty)

    def require(device, op):
        return emu if op in CUDA_OPS else real(device, op)

    _ext.require = require
    torch.empty = lambda *a, **k: _garbage(empties[0](*a, **k))
    torch.empty_like = lambda *a, **k: _garbage(empties[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _garbage(empties[2](self, *a, **k))
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        _ext.require = real
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empties
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sampled_under_tsan(request, every: int) -> None:
    """The ThreadSanitizer pass (FMEMU_TSAN=1, 10-20x slower) runs one case in about ``every`` of a
    large grid (which ones: a hash of the test's name, the same on every run); races depend on the
    kernel's code path and launch shape, which the rest of the grid's dtypes repeat."""
    if os.environ.get("FMEMU_TSAN") == "1" and zlib.crc32(request.node.name.encode()) % every:
        pytest.skip("ThreadSanitizer pass: a sample of this grid")


# ------------------------------------------------------------------------------------------------
# fmemu itself (tests/cuda_emu/selftest.cu): what it must refuse, and what it must compute


@pytest.fixture(scope="module")
def selftest():
    return build.load(sanitize=os.environ.get("FMEMU_ASAN") == "1", module=build.SELFTEST,
                      tsan=os.environ.get("FMEMU_TSAN") == "1")


def test_fmemu_reports_what_would_hang_or_be_undefined_on_a_gpu(selftest):
    code, msg = selftest.divergent_barrier()
    assert code == 719 and "__syncthreads() not reached by every thread" in msg and "10 exited" in msg
    out, (code, msg) = selftest.shuffle(48, 1, 32, 0)  # the second warp has 16 threads
    assert code == 719 and "a shuffle in a warp of fewer than 32 threads" in msg
    out, (code, msg) = selftest.shuffle(64, 1, 32, 16)  # lanes 0-15 exit before the shuffle
    assert code == 719 and "not reached by all 32 lanes of warp 0" in msg
    assert selftest.indices([1, 1, 1], [2000, 1, 1])[1] == (9, "invalid configuration argument (block of 2000x1x1 threads)")
    assert selftest.indices([1, 1, 1], [8, 8, 32])[1][0] == 9  # 2048 threads
    assert selftest.indices([1, 70000, 1], [32, 1, 1])[1][0] == 9  # grid.y over 65535
    assert selftest.dynamic_shared(1, 4, 64 << 10)[1][0] == 1  # over the 48 KiB default
    assert selftest.big_static_shared(1024) == ([3.0] * 32, (0, ""))  # 40000 + 1024 bytes
    out, (code, msg) = selftest.big_static_shared(9 << 10)  # 40000 + 9216 bytes
    assert code == 719 and "40000 bytes static + 9216 dynamic, over the 48 KiB" in msg


@pytest.mark.parametrize("n,mask,width", [(64, 1, 32), (32, 3, 8), (32, 16, 16), (32, 8, 4), (96, 31, 32)])
def test_fmemu_shuffle_xor(selftest, n, mask, width):
    out, err = selftest.shuffle(n, mask, width, 0)
    assert err == (0, "")
    want = []
    for t in range(n):  # CUDA: a source in a later segment of `width` lanes gives the lane's own value
        lane, base = t % 32, t - t % 32
        src = lane ^ mask
        want.append(base + (src if src < (lane // width + 1) * width else lane))
    assert out == want


def test_fmemu_blocks_barriers_shared_memory_and_indices(selftest):
    v = [float(i % 97) * 0.25 for i in range(5000)]
    out, err = selftest.block_sum(v, 3)  # 2D blocks (32 x 8): warps are rows
    assert err == (0, "") and sum(out) == sum(v)
    sh = selftest.unwritten_shared()  # shared memory no thread of the block wrote: garbage (NaN), not 0
    # and not what the previous block left there
    assert sh[5] != sh[5] and sh[:5] == [0.0, 1.0, 2.0, 3.0, 4.0] and sh[6:] == [float(i) for i in range(6, 64)]
    out, err = selftest.dynamic_shared(2, 4, 16)
    assert err == (0, "") and out == [3.0, 2.0, 1.0, 0.0, 103.0, 102.0, 101.0, 100.0]
    out, err = selftest.indices([3, 2, 2], [4, 2, 2])  # every (block, thread) exactly once
    assert err == (0, "") and out == [1 + (i // 16) * 1000 + i % 16 for i in range(12 * 16)]


def test_the_emulated_module(emu):
    assert "fmemu" in emu.build_info()["archs"] and emu.device_count() == 1
    # the CUDA module's ops and no others
    assert {n for n in dir(emu) if not n.startswith("_") and not n[0].isupper()} == {
        "build_info", "device_count", "dice_ce_workspace_size", "dice_ce_fwd", "dice_ce_bwd", "sw_gather",
        "sw_accumulate", "sw_normalize", "resample", "spline_prefilter"}


# ------------------------------------------------------------------------------------------------
# fused Dice + cross-entropy


def _dice_case(act, ce, label_map, dtype, variant, B=2, C=5, sp=(13, 17, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((B, C) + sp, generator=g) * 3).to(dtype)
    lab = torch.randint(0, C, (B, 1) + sp, generator=g)
    mask, w, ignore = None, None, None
    squared, soft = variant == "squared", variant == "soft"
    if variant == "weights+mask+ignore":
        w = torch.rand(C, generator=g) + 0.5
        mask = (torch.rand((B, 1) + sp, generator=g) > 0.3).float()
        if label_map:
            ignore = 255
            lab[:, :, 0] = 255
    target = lab if label_map else torch.nn.functional.one_hot(lab[:, 0].clamp(max=C - 1), C).movedim(-1, 1).to(dtype)
    return x, target, (mask, w, act, ce, True, label_map, squared, soft, ignore)


def _dice_run(x, target, args):
    """Statistics, CE sums and the logits' gradient for fixed upstream gradients."""
    xx = x.clone().requires_grad_(True)
    s, c = D.dice_ce_fwd(xx, target, *args)
    gs = torch.linspace(-1, 1, s.numel(), dtype=torch.float64).view_as(s)
    gc = torch.tensor([[0.3, 0.01, 0.0, 0.0]] * x.shape[0], dtype=torch.float64)
    (gx,) = torch.autograd.grad((s * gs).sum() + (c * gc).sum(), xx)
    return s, c, gx


def _assert_dice_close(got, want, dtype):
    # statistics: float32 (float64 for float64 logits) per voxel, summed in double on both devices in
    # different orders; the gradient: one rounding per term, then the logits' dtype
    # different orders (and the raw logits of act "none" cancel: the error scales with the largest sum)
    t = 2e-6 if dtype != torch.float64 else 1e-12
    # (terms that cancel: the error is relative to the largest gradient, not to each element)
    g = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=t, atol=t * max(b.abs().max().item(), 1.0))
    scale = max(want[2].double().abs().max().item(), 0.1)  # (floor: the upstream gradients are O(0.1..1))
    torch.testing.assert_close(got[2].double(), want[2].double(), rtol=g, atol=g * scale)


@pytest.mark.parametrize("act,ce", [(2, 1), (2, 0), (1, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("label_map", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["plain", "squared", "soft", "weights+mask+ignore"])
def test_dice_ce_kernels_match_cpu(request, emu, act, ce, label_map, dtype, variant):
    _sampled_under_tsan(request, 10)
    x, target, args = _dice_case(act, ce, label_map, dtype, variant)
    want = _dice_run(x, target, args)
    with emulated_gpu(emu):
        got = _dice_run(x, target, args)
    _assert_dice_close(got, want, dtype)


@pytest.mark.parametrize("C,sp,env", [
    (2, (40, 40, 20), dict(FMEMU_DICE_TARGET_BLOCKS=1)),   # 125 tiles in one block: persistent sums flushed 7 times
    (3, (9, 10, 11), dict(FMEMU_DICE_MAX_GRID=3)),         # grid-stride loops over work items, both kernels
    (600, (4, 5, 3), {}),                                   # 2400 Dice sums per block: accumulators in the workspace
    (117, (7, 6, 9), dict(FMEMU_DICE_TARGET_BLOCKS=2)),    # many classes, several tiles per block
    (1, (300,), {}),                                        # one class, 1D, a partial tile
    (4, (1, 1, 1), {}),                                     # one voxel
])
@pytest.mark.parametrize("label_map", [True, False])
def test_dice_ce_layouts(emu, C, sp, env, label_map):
    x, target, args = _dice_case(2, 1, label_map, torch.float32, "weights+mask+ignore", C=C, sp=sp, seed=C)
    want = _dice_run(x, target, args)
    with emulated_gpu(emu, **env):
        got = _dice_run(x, target, args)
    _assert_dice_close(got, want, torch.float32)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32,
                                         torch.float64], ids=str)
def test_dice_ce_label_dtypes(emu, label_dtype):
    """Label maps of every dtype (MONAI pipelines often hand float labels); a NaN label is an error."""
    x, target, args = _dice_case(2, 1, True, torch.float32, "weights+mask+ignore", C=4, sp=(7, 8, 9), seed=4)
    t = target.to(label_dtype) if label_dtype != torch.int8 else target.masked_fill(target == 255, 100).to(label_dtype)
    a = args[:-1] + ((100 if label_dtype == torch.int8 else args[-1]),)
    want = _dice_run(x, t, a)
    with emulated_gpu(emu):
        got = _dice_run(x, t, a)
    _assert_dice_close(got, want, torch.float32)
    if label_dtype.is_floating_point:
        t = t.clone()
        t[1, 0, 2, 3, 4] = float("nan")
        t[0, 0, 1, 1, 1] = 2.5  # truncated to 2, as .long() does
        with emulated_gpu(emu), pytest.raises(ValueError, match="target: labels must lie in"):
            D.dice_ce_fwd(x, t, *a)


@pytest.mark.parametrize("act,ce,dice", [(0, 0, True), (0, 1, True), (2, 2, True), (2, 1, False), (1, 2, False)])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.uint8], ids=str)
def test_dice_ce_flags_and_integer_dense_targets(emu, act, ce, dice, target_dtype):
    x, target, args = _dice_case(act, ce, False, torch.float32, "plain", C=3, sp=(6, 7, 8), seed=5)
    args = (None, None, act, ce, dice, False, False, False, None)
    t = target.to(target_dtype)
    want = _dice_run(x, t, args)
    with emulated_gpu(emu, FMEMU_DICE_MAX_GRID=1):  # both kernels grid-strided
        got = _dice_run(x, t, args)
    _assert_dice_close(got, want, torch.float32)


def test_dice_ce_non_finite_logits(emu):
    """+inf, -inf and NaN logits: NaN exactly where the float64 reference (MONAI's one-hot sums) has
    it, the CPU kernel's values elsewhere. (The CPU kernel's label-map intersections skip voxels of
    other labels, so a NaN softmax there leaves them finite; the loss is NaN either way, since
    every class's prediction sum is.)"""
    x, target, args = _dice_case(2, 1, True, torch.float32, "plain", C=4, sp=(5, 6, 7), seed=6)
    x[0, 1, 0, 0, 0] = float("inf")
    x[0, :, 1, 0, 0] = float("-inf")
    x[1, 2, 2, 2, 2] = float("nan")
    for variant in (args, args[:2] + (1, 2) + args[4:]):
        want = D.dice_ce_fwd(x, target, *variant)
        ref = D.dice_ce_reference(x, target, *variant)
        with emulated_gpu(emu):
            got = D.dice_ce_fwd(x, target, *variant)
        for a, b, r in zip(got, want, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(r)) and torch.isnan(a).any()
            both = ~torch.isnan(a) & ~torch.isnan(b)
            torch.testing.assert_close(a[both], b[both], rtol=2e-6, atol=1e-5)


def test_dice_ce_final_kernel_grid_stride(emu):
    x, target, args = _dice_case(2, 1, True, torch.float32, "plain", B=3, C=20, sp=(5, 6, 7), seed=7)
    want = _dice_run(x, target, args)
    with emulated_gpu(emu, FMEMU_DICE_MAX_GRID=2):
        got = _dice_run(x, target, args)
    _assert_dice_close(got, want, torch.float32)


def test_dice_ce_strided_logits_and_channels_last(emu):
    x, target, args = _dice_case(2, 1, True, torch.float32, "plain", C=6, sp=(9, 8, 7))
    for xs in (x.to(memory_format=torch.channels_last_3d), x.transpose(2, 4).contiguous().transpose(2, 4)):
        want = _dice_run(xs, target, args)
        with emulated_gpu(emu):
            got = _dice_run(xs, target, args)
        _assert_dice_close(got, want, torch.float32)


def test_dice_ce_bit_identical_whatever_the_schedule(emu):
    """Blocks and the threads of a block run in shuffled orders: no result may change (every
    reduction order is fixed; nothing read depends on which block or thread ran first). Outputs and
    the workspace start as garbage on each run (emulated_gpu), so a run cannot inherit the previous
    one's partial sums. Not covered: a missing atomic (see fmemu.h)."""
    x, target, args = _dice_case(2, 1, True, torch.float32, "weights+mask+ignore", C=7, sp=(17, 9, 12))
    runs = []
    for seed in (0, 1, 977):
        with emulated_gpu(emu, FMEMU_SCHEDULE=seed, FMEMU_DICE_TARGET_BLOCKS=3):
            runs.append(_dice_run(x, target, args))
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)


def test_dice_ce_bad_labels_raise(emu):
    x = torch.randn(2, 3, 8, 8, 8)
    y = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    y[1, 0, 7, 7, 7] = 7
    y[0, 0, 1, 1, 1] = -2
    with emulated_gpu(emu), pytest.raises(ValueError, match=r"target: labels must lie in \[0, 3\).*found 2 voxels"):
        FL.DiceCELoss(to_onehot_y=True, softmax=True)(x, y)


@pytest.mark.parametrize("make", [
    lambda: FL.DiceCELoss(to_onehot_y=True, softmax=True, include_background=False),
    lambda: FL.DiceLoss(sigmoid=True, squared_pred=True),
    lambda: FL.GeneralizedDiceLoss(to_onehot_y=True, softmax=True),
    lambda: FL.NNUNetDiceCELoss(ignore_label=2),
])
def test_losses_and_gradients_on_the_cuda_kernels(emu, make):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 12, 10, 9, generator=g)
    y = torch.randint(0, 4, (2, 1, 12, 10, 9), generator=g)
    if isinstance(make(), FL.DiceLoss) and not isinstance(make(), FL.DiceCELoss):
        y = torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).float()
    res = []
    for ctx in (contextlib.nullcontext(), emulated_gpu(emu)):
        xx = x.clone().requires_grad_(True)
        with ctx:
            loss = make()(xx, y)
            (gx,) = torch.autograd.grad(loss, xx)
        res.append((loss, gx))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# sliding-window gather, accumulate, normalise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.float64])
def test_gather(emu, dtype):
    vol = (torch.randn(2, 3, 20, 17, 15) * 10).to(dtype)
    starts = torch.tensor([[0, 0, 0, 0], [1, 4, 9, 7], [0, 12, 1, 8]])
    want = torch.cat([vol[b:b + 1, :, z:z + 8, y:y + 8, x:x + 7] for b, z, y, x in starts.tolist()])
    with emulated_gpu(emu):
        assert torch.equal(SW.sw_gather(vol, starts, [8, 8, 7]), want)
        v2 = vol[:, :, 3].transpose(-1, -2)  # 2D, strided
        st2 = torch.tensor([[0, 0, 0], [1, 4, 9], [0, 10, 11]])
        assert torch.equal(SW.sw_gather(v2, st2, [5, 6]),
                           torch.cat([v2[b:b + 1, :, y:y + 5, x:x + 6] for b, y, x in st2.tolist()]))
    with emulated_gpu(emu, FMEMU_GRID_CAP=2):  # grid-stride loop
        assert torch.equal(SW.sw_gather(vol, starts, [8, 8, 7]), want)


def _weights(win, g):
    gs = [torch.rand(w, generator=g) + 0.1 for w in win]
    return gs, torch.einsum("i,j,k->ijk", *gs).contiguous()


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight", ["none", "factors", "map", "count"])
def test_accumulate_bit_identical_to_cpu(request, emu, acc_dtype, pred_dtype, weight):
    """Products and sums are rounded separately on both devices, in the same order: equal bits."""
    _sampled_under_tsan(request, 8)
    g = torch.Generator().manual_seed(4)
    win = (6, 7, 5)
    acc0 = torch.randn(2, 3, 13, 12, 11, generator=g).to(acc_dtype)
    pred = torch.randn(4, 3, *win, generator=g).to(pred_dtype)
    starts = torch.tensor([[0, 0, 0, 0], [1, 7, 5, 6], [0, 3, 2, 1], [0, 4, 3, 2]])  # overlapping windows
    gs, wmap = _weights(win, g)
    args = {"none": (None, None, None, 0.0, None), "factors": (*gs, 0.05, None),
            "map": (None, None, None, 0.0, wmap), "count": (*gs, 0.05, None)}[weight]
    p = None if weight == "count" else pred
    if weight == "count":
        acc0 = acc0[:, :1].contiguous()
    out = {}
    for ctx in ("cpu", "emu"):
        acc = acc0.clone()
        with emulated_gpu(emu) if ctx == "emu" else contextlib.nullcontext():
            SW.sw_accumulate(acc, p, starts, *args)
        out[ctx] = acc
    assert torch.equal(out["emu"], out["cpu"])


@pytest.mark.parametrize("flip", [0, 1, 5, 7])
def test_accumulate_flipped_and_fresh(emu, flip):
    g = torch.Generator().manual_seed(5)
    win = (5, 6, 4)
    pred = torch.randn(2, 2, *win, generator=g)
    starts = torch.tensor([[0, 1, 2, 3], [0, 4, 0, 5]])
    fresh = torch.tensor([[0, 5, 0, 6, 0, 4], [1, 5, 2, 6, 0, 3]])  # boxes written, not added
    gs, _ = _weights(win, g)
    out = {}
    for ctx in ("cpu", "emu"):
        acc = torch.full((1, 2, 10, 9, 10), 7.0)
        with emulated_gpu(emu, FMEMU_GRID_CAP=3) if ctx == "emu" else contextlib.nullcontext():
            SW.sw_accumulate(acc, pred, starts, *gs, 0.0, None, fresh, flip)
        out[ctx] = acc
    assert torch.equal(out["emu"], out["cpu"])
    ref = torch.full((1, 2, 10, 9, 10), 7.0)  # the reference, from flipped copies
    pf = pred.flip([2 + d for d in range(3) if flip >> d & 1])
    w = torch.einsum("i,j,k->ijk", *gs)
    for n, (b, z, y, x) in enumerate(starts.tolist()):
        z0, z1, y0, y1, x0, x1 = fresh[n].tolist()
        view = ref[b, :, z:z + 5, y:y + 6, x:x + 4]
        keep = torch.ones(win, dtype=torch.bool)
        keep[z0:z1, y0:y1, x0:x1] = False
        view.copy_(torch.where(keep, view, 0.0) + pf[n] * w)
    torch.testing.assert_close(out["emu"], ref, rtol=1e-6, atol=1e-6)


def test_accumulate_2d(emu):
    g = torch.Generator().manual_seed(8)
    pred = torch.randn(3, 2, 5, 6, generator=g)
    starts = torch.tensor([[0, 0, 0], [1, 3, 4], [0, 2, 1]])
    gs, _ = _weights((1, 5, 6), g)
    out = {}
    for ctx in ("cpu", "emu"):
        acc = torch.randn(2, 2, 9, 10, generator=torch.Generator().manual_seed(9))
        with emulated_gpu(emu) if ctx == "emu" else contextlib.nullcontext():
            SW.sw_accumulate(acc, pred, starts, *gs, 0.0, None)
        out[ctx] = acc
    assert torch.equal(out["emu"], out["cpu"])


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=str)
def test_normalize(request, emu, acc_dtype, softmax, dst_dtype):
    _sampled_under_tsan(request, 8)
    g = torch.Generator().manual_seed(6)
    acc = (torch.randn(2, 7, 9, 10, 11, generator=g) * 4).to(acc_dtype)
    count = (torch.rand(9, 10, 11, generator=g) + 0.5).to(acc_dtype)
    want = SW.sw_normalize(acc, count, dst_dtype, softmax)
    with emulated_gpu(emu, FMEMU_GRID_CAP=5):
        got = SW.sw_normalize(acc, count, dst_dtype, softmax)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6 if dst_dtype == torch.float32 else 1e-2,
                               atol=1e-6 if acc_dtype not in (torch.float16, torch.bfloat16) else 1e-2)
    # against the float64 result: half a unit in the last place of each rounding (acc / count in acc's
    # dtype, then dst's), times the logits' size (4 sigma) where the softmax follows
    tol = {torch.float16: 1e-3, torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[acc_dtype]
    tol *= 16 if softmax else 1
    tol = max(tol, {torch.bfloat16: 5e-3, torch.float16: 1e-3, torch.float32: 2e-7}.get(dst_dtype, 0.0), 1e-12)
    torch.testing.assert_close(got.double(), SW.sw_normalize_reference(acc, count, softmax), rtol=tol, atol=tol)


def pred3(x):
    return torch.cat([x.sin(), x.cos() * 2, x * x], 1)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_buffered_sliding_window_inference_on_the_cuda_kernels(emu, mode):
    """buffer_steps takes the gather / accumulate / normalise route of a GPU; equal to MONAI-exact
    unbuffered stitching on the CPU."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 37, 45, 29)
    want = FI.sliding_window_inference(x, (16, 20, 12), 3, pred3, 0.5, mode)
    with emulated_gpu(emu):
        got = FI.sliding_window_inference(x, (16, 20, 12), 3, pred3, 0.5, mode, buffer_steps=2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_nnunet_mirroring_on_the_cuda_kernels(emu):
    torch.manual_seed(1)
    x = torch.randn(1, 1, 33, 30, 27)
    want = FI.nnunet_sliding_window_inference(x, pred3, (16, 16, 16), 0.5, mirror_axes=(0, 2), sw_batch_size=3)
    with emulated_gpu(emu):
        got = FI.nnunet_sliding_window_inference(x, pred3, (16, 16, 16), 0.5, mirror_axes=(0, 2), sw_batch_size=3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# resampling


def _theta(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.diag(torch.rand(3, generator=g, dtype=torch.float64) * 1.5 + 0.4)
    if kind == "oblique":
        a = a + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    return torch.cat([a, torch.randn(3, 1, generator=g, dtype=torch.float64) * 2], 1)


@pytest.mark.parametrize("kind,order,padding", list(itertools.product(["diagonal", "oblique"], [0, 1, 3],
                                                                       list(R.PADDINGS))))
def test_resample_float64_equals_cpu(request, emu, kind, order, padding):
    _sampled_under_tsan(request, 5)
    x = torch.randn(2, 3, 17, 20, 13, dtype=torch.float64)
    th = _theta(kind)
    kw = dict(order=order, padding=padding, cval=0.5, compute_dtype=torch.float64)
    want = R.resample(x, th, (11, 23, 14), **kw)
    with emulated_gpu(emu):
        got = R.resample(x, th, (11, 23, 14), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)  # (the CPU kernel's sums differ in the last bit)
    if order < 3:  # the float64 reference's own roundings, term by term (mul_rn / add_rn): its bits
        assert torch.equal(got, R.resample_reference(x, th, (11, 23, 14), order=order, padding=padding, cval=0.5))


@pytest.mark.parametrize("half_up", [False, True])
def test_resample_nearest_ties_outside_fold_before_rounding(emu, half_up):
    """Nearest at half-integers outside the input under the reflecting paddings: the CUDA kernel
    folds the coordinate before rounding, as the CPU kernel (checked against scipy and grid_sample
    in test_resample.py)."""
    for n in (1, 2, 3, 6, 7):
        x = (torch.arange(n, dtype=torch.float64) * 10 + 1).view(1, 1, 1, 1, n)
        cs = torch.arange(-3 * n - 2, 4 * n + 2, 0.5, dtype=torch.float64)
        th = torch.zeros(len(cs), 3, 4, dtype=torch.float64)
        th[:, 2, 3] = cs
        xb = x.expand(len(cs), 1, 1, 1, n).contiguous()
        for padding in ("reflect", "mirror"):
            kw = dict(order=0, padding=padding, nearest_half_up=half_up)
            want = R.resample(xb, th, (1, 1, 1), **kw)
            with emulated_gpu(emu):
                got = R.resample(xb, th, (1, 1, 1), **kw)
            assert torch.equal(got, want), (n, padding)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.int16])
def test_resample_dtypes(request, emu, dtype, out_dtype):
    _sampled_under_tsan(request, 5)
    x = (torch.rand(1, 2, 15, 16, 17) * 200).to(dtype)
    th = _theta("oblique", 1)
    kw = dict(order=1, padding="border", out_dtype=out_dtype)
    want = R.resample(x, th, (9, 10, 11), **kw)
    with emulated_gpu(emu, FMEMU_GRID_CAP=3):
        got = R.resample(x, th, (9, 10, 11), **kw)
    if os.environ.get("FMEMU_FMA") != "1":
        # the same coordinates, weights and sums term by term (no FMA in either build): equal
        assert torch.equal(got, want)
    elif out_dtype.is_floating_point:  # float32 arithmetic fused as nvcc fuses it: a few units in the last place
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-6 if out_dtype == torch.float32 else 1e-3,
                                   atol=0)
    else:
        assert (got.long() - want.long()).abs().max() <= 1


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_argmax_and_labels(emu, order):
    logits = torch.randn(1, 14, 15, 16, 17, dtype=torch.float64)
    th = _theta("oblique", 2)
    kw = dict(order=order, padding="border", out="argmax", compute_dtype=torch.float64)
    want = R.resample(logits, th, (9, 10, 11), **kw)
    with emulated_gpu(emu):
        assert torch.equal(R.resample(logits, th, (9, 10, 11), **kw), want)
    if order == 3:  # labels mode is orders 0 and 1
        return
    seg = torch.randint(0, 5, (1, 1, 15, 16, 17), dtype=torch.int16)
    for pad, cval in (("border", 0), ("zeros", 7)):
        kw = dict(order=order, padding=pad, cval=cval, out="labels")
        want = R.resample(seg, th, (9, 10, 11), **kw)
        with emulated_gpu(emu):
            assert torch.equal(R.resample(seg, th, (9, 10, 11), **kw), want)  # float64 sums on both


def test_resample_batched_theta_channels_last_size_one_and_empty(emu):
    x = torch.randn(3, 2, 9, 1, 11, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    th = torch.stack([_theta("oblique", s) for s in range(3)])
    for order in (0, 1, 3):
        kw = dict(order=order, padding="zeros", compute_dtype=torch.float64)
        want = R.resample(x, th, (5, 4, 6), **kw)
        with emulated_gpu(emu):
            got = R.resample(x, th, (5, 4, 6), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        if order < 3:  # (the reference's order 3 takes B-spline coefficients, not values)
            torch.testing.assert_close(got, R.resample_reference(x, th, (5, 4, 6), order=order, padding="zeros"),
                                       rtol=0, atol=1e-9)
    with emulated_gpu(emu):
        assert R.resample(x, th, (0, 4, 6)).shape == (3, 2, 0, 4, 6)


@pytest.mark.parametrize("case", ["half_up", "index_offset", "2d", "float_order0", "float_order3", "mixed_orders"])
def test_resample_options(emu, case):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 12, 13, 11, generator=g, dtype=torch.float64)
    th, size = _theta("oblique", 3), (9, 10, 11)
    kw = dict(order=0, padding="border", compute_dtype=torch.float64)
    if case == "half_up":  # scale 1/2: many coordinates fall exactly on .5
        th = torch.cat([torch.eye(3, dtype=torch.float64) * 0.5, torch.zeros(3, 1, dtype=torch.float64)], 1)
        kw["nearest_half_up"] = True
    elif case == "index_offset":
        th = torch.cat([torch.eye(3, dtype=torch.float64) * 1.3, torch.full((3, 1), -0.5, dtype=torch.float64)], 1)
        kw.update(order=1, index_offset=0.5)
    elif case == "2d":
        x, th, size = x[:, :, 0], torch.tensor([[0.9, 0.2, 0.3], [-0.1, 1.1, 0.5]], dtype=torch.float64), (10, 9)
        kw["order"] = 3
    elif case.startswith("float"):
        x = x.float()
        kw.update(order=int(case[-1]), compute_dtype=torch.float32)
    else:
        kw["order"] = (0, 3, 1)
    want = R.resample(x, th, size, **kw)
    with emulated_gpu(emu):
        got = R.resample(x, th, size, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 if x.dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("out_dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bfloat16], ids=str)
def test_resample_integer_and_bfloat16_outputs(emu, out_dtype):
    """Values rounded and saturated to an integer dtype (NaN to 0), or rounded to bfloat16."""
    x = torch.randn(1, 2, 11, 12, 13, dtype=torch.float64) * 300
    x[0, 0, 3:6, 3:6, 3:6] = float("nan")
    th = _theta("oblique", 4)
    kw = dict(order=1, padding="zeros", out_dtype=out_dtype, compute_dtype=torch.float64)
    want = R.resample(x, th, (8, 9, 10), **kw)
    with emulated_gpu(emu):
        got = R.resample(x, th, (8, 9, 10), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # (bfloat16 keeps NaN)
    assert out_dtype.is_floating_point or (got == 0).any()


@pytest.mark.parametrize("boundary", ["mirror", "reflect"])
@pytest.mark.parametrize("n", [2, 5, 64])
def test_spline_prefilter(emu, boundary, n):
    x = torch.randn(2, 2, n, 7, 9, dtype=torch.float64)
    want = R.spline_prefilter(x, None, boundary)
    with emulated_gpu(emu):
        got = R.spline_prefilter(x, None, boundary)
        got32 = R.spline_prefilter(x.float(), None, boundary)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, R.spline_prefilter_reference(x, None, boundary), rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# the same tests with multiply-adds fused as on a GPU, and with AddressSanitizer


@pytest.mark.skipif(any(os.environ.get(v) == "1" for v in ("FMEMU_ASAN", "FMEMU_FMA", "FMEMU_TSAN")),
                    reason="this is a second pass")
@pytest.mark.skipif(not build.fma_supported(), reason="needs an x86-64 CPU with FMA")
def test_with_multiply_adds_fused_as_nvcc_fuses_them():
    """nvcc fuses a * b + c into one FMA by default; the CPU kernels never do. The stitching
    (products and sums rounded separately: __fmul_rn / __fadd_rn) and the float64 resampling
    (mul_rn / add_rn: the reference's bits) claim their results on a GPU all the same: the
    sliding-window and resampling tests again with the kernels built with -ffp-contract=fast -mfma
    at -O2, every other multiply-add fused, the _rn intrinsics kept apart. (GCC fuses within a basic
    block, as nvcc's LLVM does; which pairs each compiler fuses may still differ.)"""
    build.build(fma=True)
    env = dict(os.environ, FMEMU_FMA="1")
    sel = "not dice and not losses and not fmemu and not under_address_sanitizer and not multiply_adds"
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", sel],
                       env=env, capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def _runtime_library(name: str):
    out = subprocess.run([build.compiler(), f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.skipif(os.environ.get("FMEMU_ASAN") == "1" or os.environ.get("FMEMU_TSAN") == "1",
                    reason="this is a second pass")
def test_under_address_sanitizer():
    """Every test above (the Dice grid without float64), with the kernels built with
    AddressSanitizer and libasan preloaded: an access outside a tensor's allocation (they come from
    malloc, so ASan guards their ends) aborts with a report naming the kernel."""
    asan, stdcxx = _runtime_library("libasan.so"), _runtime_library("libstdc++.so")
    if asan is None or stdcxx is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    build.build(sanitize=True)
    env = dict(os.environ, FMEMU_ASAN="1", LD_PRELOAD=f"{asan} {stdcxx}",  # libstdc++ too: ASan's __cxa_throw
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    sel = "not sanitizer and not multiply_adds and (not kernels_match or float32 or float16)"
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", sel],
                       env=env, capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def _tsan_env(log: Path) -> dict:
    tsan = _runtime_library("libtsan.so")
    if tsan is None or not sys.platform.startswith("linux"):
        pytest.skip("the compiler has no ThreadSanitizer runtime")
    # halt at the first report, with its own exit code; the report goes to a file (pytest's capture
    # would lose it when the process ends)
    return dict(os.environ, FMEMU_TSAN="1", LD_PRELOAD=tsan, OMP_NUM_THREADS="1",
                TSAN_OPTIONS=f"halt_on_error=1:exitcode=66:log_path={log}")


def _tsan_reports(log: Path) -> str:
    return "".join(f.read_text() for f in sorted(log.parent.glob(log.name + "*")))


@pytest.mark.skipif(any(os.environ.get(v) == "1" for v in ("FMEMU_ASAN", "FMEMU_FMA", "FMEMU_TSAN")),
                    reason="this is a second pass")
@pytest.mark.parametrize("mode, race", [(0, "a missing atomic"), (1, None), (2, "a read without the barrier"),
                                        (3, None), (4, "two blocks write one element"),
                                        (5, "a shuffle orders no memory"), (6, None)])
def test_fmemu_thread_sanitizer_sees_races(tmp_path, mode, race):
    """The FMEMU_TSAN build (every emulated GPU thread a ThreadSanitizer fiber, ordered only by its
    block's barriers, atomics and the end of the launch) reports the races of selftest.cu's
    race_kernel and nothing in its race-free modes (the atomic, the barrier, shared memory reused
    across barriers)."""
    log = tmp_path / "tsan"
    env = _tsan_env(log)
    so = build.build(module=build.SELFTEST, tsan=True)
    code = ("import importlib.util; "
            f"s = importlib.util.spec_from_file_location({build.SELFTEST!r}, {str(so)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            f"c, out, err = m.race({mode}); assert err == (0, ''), err; print(c, out[0], out[1])")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    reports = _tsan_reports(log)
    if race is None:
        assert r.returncode == 0 and not reports, r.stdout + r.stderr + reports
        want = {1: "128 0.0 0.0", 3: "0 1.0 2.0", 6: "0 6.0 9.0"}[mode]
        assert r.stdout.split() == want.split()
    else:
        assert r.returncode == 66 and "WARNING: ThreadSanitizer: data race" in reports, race + r.stderr + reports
        # both accesses in the kernel (inlined into the launch's body), none in fmemu's bookkeeping
        lines = reports.splitlines()
        first = [lines[i + 1] for i, t in enumerate(lines[:-1]) if t.lstrip().startswith(("Write of", "Read of",
                                                                                        "Previous write", "Previous read"))]
        assert len(first) >= 2 and all("#0 void fmemu::call_body<" in f for f in first), reports


@pytest.mark.skipif(any(os.environ.get(v) == "1" for v in ("FMEMU_ASAN", "FMEMU_FMA", "FMEMU_TSAN")),
                    reason="this is a second pass")
def test_under_thread_sanitizer(tmp_path):
    """The tests above again with ThreadSanitizer (a sample of the large grids): two threads of a
    launch that touch one address, one of them writing, with no barrier, atomic or launch boundary
    between them, fail with the report. (fmemu runs one thread at a time, so a missing atomic or
    barrier would otherwise still give the right values.)"""
    log = tmp_path / "tsan"
    env = _tsan_env(log)
    build.build(tsan=True)
    build.build(module=build.SELFTEST, tsan=True)
    # (not the two whole-inference tests: 35 s here for kernels the gather / accumulate tests launch)
    sel = "not sanitizer and not multiply_adds and not buffered_sliding_window and not nnunet_mirroring"
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", sel],
                       env=env, capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + _tsan_reports(log)[-8000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_spline_prefilter_strided_input_and_grid_stride(emu):
    x = torch.randn(2, 9, 3, 8, 7, dtype=torch.float64).transpose(1, 3)  # (2, 8, 3, 9, 7), not contiguous
    want = R.spline_prefilter(x, None, "mirror")
    with emulated_gpu(emu, FMEMU_GRID_CAP=2):
        got = R.spline_prefilter(x, None, "mirror")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
