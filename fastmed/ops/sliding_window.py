"""``fastmed::sliding_window_accumulate`` / ``fastmed::sliding_window_normalize``: sliding-window stitching.

``sw_accumulate(acc, pred, starts, g0, g1, g2, wmin, wmap)`` adds a batch of predicted windows into
a full-volume accumulator in place, each multiplied by the blending weight computed on the fly:

* separable (``g0, g1, g2`` given): ``w[i, j, k] = max((g0[i] * g1[j]) * g2[k], wmin)`` in float32,
  exactly MONAI's Gaussian importance map (same operations, same rounding);
* a full map ``wmap`` (the window's spatial shape, float32);
* neither: weight 1.

``pred`` is ``(N, C, *window)``; ``starts`` is ``(N, 1 + ndim)`` int64: batch index, then the window's
offset in the accumulator. Optional ``fresh`` ``(N, 2 * ndim)``: per window, the window-local box
``[lo, hi)`` per dim of voxels no earlier window touched; there the value is written, not added, so
the accumulator needs no zero fill. ``flip`` (a bit per spatial dim) adds ``torch.flip(pred, dims)``
without making the flipped copy. ``pred=None`` adds the weight alone (the normalising map; ``acc`` then has
one channel). Windows are added in order, each product and sum rounded to the accumulator's dtype,
so the result equals PyTorch's ``out[idx] += pred * w`` window after window, bit for bit.

``sw_normalize(acc, count, dtype, softmax)`` returns ``acc / count`` (count broadcast over batch and
channels) in ``dtype``, or its softmax over channels; ``sw_normalize_`` does it in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _ext

__all__ = ["sw_gather", "sw_accumulate", "sw_normalize", "sw_normalize_", "sw_normalize_reference", "sw_accumulate_reference", "sw_argmax", "zeros", "empty", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def empty(shape, dtype: torch.dtype, device) -> Tensor:
    """torch.empty; on the CPU with FASTMED_HUGE_PAGES=1 a large buffer asks for transparent huge
    pages (see csrc/common/common.h: opt-in, slower by default on the VMs we measured)."""
    device = torch.device(device)
    out = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu" and _ext.cpu is not None:
        _ext.cpu.advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out


def zeros(shape, dtype: torch.dtype, device) -> Tensor:
    """torch.zeros; on the CPU with FASTMED_HUGE_PAGES=1 a large buffer asks for transparent huge
    pages first (faulting in 330 MB of 4 KiB pages costs ~70 ms on a 2-core machine, ~20 ms with
    2 MiB pages already backed, several hundred ms with pages a VM's host must back first)."""
    device = torch.device(device)
    if device.type != "cpu" or _ext.cpu is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    _ext.cpu.advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out.zero_()


def _vec3(t: Tensor, lead: int):
    """(strides of the `lead` leading dims, spatial strides padded to 3, spatial sizes padded to 3)."""
    nsp = t.ndim - lead
    st, sz = list(t.stride()), list(t.shape)
    return st[:lead], [0] * (3 - nsp) + st[lead:], [1] * (3 - nsp) + sz[lead:]


def _starts4(starts: Tensor, device) -> Tensor:
    """(N, 4) contiguous int64 on `device`: batch index, then z, y, x offsets (2D: z = 0)."""
    st = _ext.to_device(starts, torch.device(device), torch.int64)
    if st.shape[1] < 4:
        st = torch.cat([st[:, :1], st.new_zeros((st.shape[0], 4 - st.shape[1])), st[:, 1:]], 1)
    return st.contiguous()


@torch.library.custom_op("fastmed::sliding_window_gather", mutates_args=())
def sw_gather(src: Tensor, starts: Tensor, roi: list[int], pin_memory: bool = False) -> Tensor:
    """``out[n] = src[starts[n, 0], :, starts[n, 1]:+roi[0], ...]``: a batch of equal-size windows
    gathered in one pass (any dtype, any strides; every window inside ``src``), into pinned memory
    on request (to be copied to a GPU without staging)."""
    nsp = src.ndim - 2
    if nsp not in (1, 2, 3) or len(roi) != nsp or any(r < 0 for r in roi):
        raise ValueError(f"roi: expected {max(nsp, 0)} non-negative sizes for src of shape {tuple(src.shape)}, "
                         f"got {list(roi)}")
    _check_starts(starts, list(roi), src, "src")
    shape = (starts.shape[0], src.shape[1], *roi)
    if pin_memory and src.device.type == "cpu":
        out = torch.empty(shape, dtype=src.dtype, pin_memory=True)
    else:  # a fresh batch buffer per call (huge pages only with FASTMED_HUGE_PAGES=1)
        out = empty(shape, src.dtype, src.device)
    if out.numel() == 0:
        return out
    mod = _ext.require(src.device, "sw_gather")
    p = mod.SWGatherParams()
    (p.s_sb, p.s_sc), p.s_s, _ = _vec3(src, 2)
    p.src, p.esize, p.dst = src.data_ptr(), src.element_size(), out.data_ptr()
    p.N, p.C = starts.shape[0], src.shape[1]
    p.win = [1] * (3 - nsp) + [int(r) for r in roi]
    st = _starts4(starts, src.device)
    p.starts = st.data_ptr()
    p.num_threads = _ext.num_threads()
    with _ext.device_guard(src.device):  # launch on src's GPU, in its current stream
        p.stream = _ext.stream_ptr(src.device)
        mod.sw_gather(p)
    return out


@sw_gather.register_fake
def _(src, starts, roi, pin_memory=False):
    return src.new_empty((starts.shape[0], src.shape[1], *roi))


@torch.library.custom_op("fastmed::sliding_window_accumulate", mutates_args=("acc",))
def sw_accumulate(
    acc: Tensor,
    pred: Optional[Tensor],
    starts: Tensor,
    g0: Optional[Tensor],
    g1: Optional[Tensor],
    g2: Optional[Tensor],
    wmin: float,
    wmap: Optional[Tensor],
    fresh: Optional[Tensor] = None,
    flip: int = 0,
) -> None:
    _check_windows(acc, pred, starts, g0, g1, g2, wmap, fresh)
    mod = _ext.require(acc.device, "sw_accumulate")
    p, keep = _acc_params(mod, acc, pred, starts, g0, g1, g2, wmin, wmap, flip)
    if fresh is not None:
        fr = _ext.to_device(fresh, acc.device, torch.int64)
        if fr.shape[1] < 6:  # 2D: the depth range is [0, 1)
            fr = torch.cat([fr.new_tensor([[0, 1]]).expand(fr.shape[0], 2), fr], 1)
        fr = fr.contiguous()
        keep.append(fr)
        p.fresh = fr.data_ptr()
    with _ext.device_guard(acc.device):  # the stream in p is acc's device's
        mod.sw_accumulate(p)
    del keep


def _check_starts(starts: Tensor, win: list, target: Tensor, name: str) -> None:
    """Every window (batch index, offsets) of size ``win`` lies inside ``target`` (B, C, *spatial)."""
    nsp = target.ndim - 2
    if starts.ndim != 2 or starts.shape[1] != nsp + 1:
        raise ValueError(f"starts: expected (N, {nsp + 1}) rows (batch index, offsets), got {tuple(starts.shape)}")
    for n, row in enumerate(starts.tolist()):
        if not 0 <= row[0] < target.shape[0] or any(
                s < 0 or s + w > a for s, w, a in zip(row[1:], win, target.shape[2:])):
            raise ValueError(f"starts: window {n} at {row} of size {tuple(win)} is not inside {name} of shape "
                             f"{tuple(target.shape)}")


def _check_windows(acc, pred, starts, g0, g1, g2, wmap, fresh=None) -> None:
    """The kernels trust their windows: every one inside acc, pred's channels those of acc, the weight
    (factors or map) the window's size, the fresh boxes inside the window. Checked here, in Python,
    so that a wrong call raises instead of writing out of bounds."""
    nsp = acc.ndim - 2
    if nsp not in (1, 2, 3):
        raise ValueError(f"acc: expected (B, C, *spatial) with 1 to 3 spatial dims, got shape {tuple(acc.shape)}")
    if starts.ndim != 2 or starts.shape[1] != nsp + 1:
        raise ValueError(f"starts: expected (N, {nsp + 1}) rows (batch index, offsets), got {tuple(starts.shape)}")
    if pred is not None:
        if pred.ndim != acc.ndim or pred.shape[0] != starts.shape[0] or pred.shape[1] != acc.shape[1]:
            raise ValueError(f"pred: expected ({starts.shape[0]}, {acc.shape[1]}, *window) for acc of shape "
                             f"{tuple(acc.shape)}, got {tuple(pred.shape)}")
        win = list(pred.shape[2:])
    elif wmap is not None:
        win = list(wmap.shape[-nsp:])
    else:
        win = [int(g.numel()) for g in (g0, g1, g2)][3 - nsp:] if g1 is not None else None
    if win is None:
        raise ValueError("pred, wmap or g0 / g1 / g2: one of them must give the window's size")
    if wmap is not None and (wmap.ndim < nsp or list(wmap.shape[-nsp:]) != win or wmap.numel() != math.prod(win)):
        raise ValueError(f"wmap: expected the window's shape {tuple(win)}, got {tuple(wmap.shape)}")
    if g1 is not None:
        sizes = [int(g.numel()) for g in (g0, g1, g2)]
        if sizes != [1] * (3 - nsp) + win:
            raise ValueError(f"g0 / g1 / g2: expected the window's sizes {[1] * (3 - nsp) + win}, got {sizes}")
    _check_starts(starts, win, acc, "acc")
    if fresh is not None:
        if fresh.ndim != 2 or fresh.shape[0] != starts.shape[0] or fresh.shape[1] != 2 * nsp:
            raise ValueError(f"fresh: expected ({starts.shape[0]}, {2 * nsp}), got {tuple(fresh.shape)}")
        for row in fresh.tolist():
            if any(not 0 <= lo <= hi <= w for lo, hi, w in zip(row[0::2], row[1::2], win)):
                raise ValueError(f"fresh: boxes must lie inside the window {tuple(win)}, got {row}")


def _acc_params(mod, acc, pred, starts, g0, g1, g2, wmin, wmap, flip=0):
    """SWAccParams for acc, pred, starts and the weight; with the tensors that must outlive the call."""
    p = mod.SWAccParams()
    nsp = acc.ndim - 2
    (p.a_sb, p.a_sc), p.a_s, p.a_size = _vec3(acc, 2)
    p.acc, p.acc_dtype = acc.data_ptr(), _ext.DTYPE_CODES[acc.dtype]
    starts = _starts4(starts, acc.device)
    p.starts, p.N = starts.data_ptr(), starts.shape[0]
    keep = [starts]
    if pred is not None:
        (p.p_sn, p.p_sc), ps, p.win = _vec3(pred, 2)
        ptr = pred.data_ptr()
        for d in range(nsp):  # flip bit d: read spatial dim d backwards (no flipped copy)
            if flip >> d & 1:
                k = 3 - nsp + d
                ptr += (p.win[k] - 1) * ps[k] * pred.element_size()
                ps[k] = -ps[k]
        p.p_s = ps
        p.pred, p.pred_dtype, p.C = ptr, _ext.DTYPE_CODES[pred.dtype], pred.shape[1]
    else:
        p.C = 1
        p.win = ([1] * (3 - nsp) + list(wmap.shape[-nsp:])) if wmap is not None else [
            int(g.numel()) for g in (g0 if g0 is not None else torch.ones(1), g1, g2)]
    if g1 is not None:
        gs = [_ext.to_device(g, acc.device, torch.float32).contiguous() for g in (g0, g1, g2)]
        keep += gs
        p.wmode, p.wmin = 1, float(wmin)
        p.g0, p.g1, p.g2 = (g.data_ptr() for g in gs)
    elif wmap is not None:
        wm = _ext.to_device(wmap, acc.device, torch.float32).contiguous()
        keep.append(wm)
        p.wmode, p.wmap = 2, wm.data_ptr()
    p.num_threads = _ext.num_threads()
    p.stream = _ext.stream_ptr(acc.device)
    return p, keep


@sw_accumulate.register_fake
def _(acc, pred, starts, g0, g1, g2, wmin, wmap, fresh=None, flip=0):
    return None


@torch.library.custom_op("fastmed::sliding_window_stitch", mutates_args=("acc",))
def sw_stitch(
    acc: Tensor,
    pred: Tensor,
    starts: Tensor,
    widx: Tensor,
    grid: list[int],
    grid_n: list[int],
    g0: Optional[Tensor],
    g1: Optional[Tensor],
    g2: Optional[Tensor],
    wmin: float,
    wmap: Optional[Tensor],
    count: Optional[Tensor] = None,
) -> None:
    """CPU: a batch of windows added in one pass, with the result of sw_accumulate (same roundings).
    The windows lie on the tiling grid (per spatial dim its ``grid_n[d]`` sorted window starts, one
    dim after the other in ``grid``) and are consecutive in its C order: ``widx[n]`` is window n's place in that order within its image.
    Where no earlier window of the tiling touches a voxel the sum is written (acc needs no zero
    fill); with ``count``, where no later window touches it the sum is divided by ``count`` (the
    final normalisation of sw_normalize_, done as the voxel is written for the last time).
    At most 64 windows per call."""
    if acc.device.type != "cpu":
        raise ValueError(f"acc: sliding_window_stitch runs on the CPU, got {acc.device}")
    if not 1 <= starts.shape[0] <= 64:
        raise ValueError(f"starts: 1 to 64 windows per call, got {starts.shape[0]}")
    nsp = acc.ndim - 2
    if len(grid_n) != nsp or sum(grid_n) != len(grid):
        raise ValueError(f"grid_n: one count per spatial dim ({nsp}) adding up to len(grid) ({len(grid)}), "
                         f"got {list(grid_n)}")
    _check_windows(acc, pred, starts, g0, g1, g2, wmap)
    _check_stitch(acc, pred, starts, widx, grid, grid_n)
    if count is not None:
        _check_count(acc, count, acc)
    mod = _ext.require(acc.device, "sw_stitch")
    p, keep = _acc_params(mod, acc, pred, starts, g0, g1, g2, wmin, wmap)
    gt = torch.tensor([0] * (3 - nsp) + list(grid), dtype=torch.int64)
    wi = widx.to(dtype=torch.int64).contiguous()
    keep += [gt, wi]
    p.grid, p.grid_n, p.widx = gt.data_ptr(), [1] * (3 - nsp) + list(grid_n), wi.data_ptr()
    if count is not None:
        cnt = count.to(dtype=acc.dtype)
        cnt = cnt.reshape(cnt.shape[-nsp:]) if cnt.ndim > nsp else cnt
        keep.append(cnt)
        _, p.n_s, _ = _vec3(cnt, 0)
        p.count = cnt.data_ptr()
    mod.sw_stitch(p)
    del keep


def _check_stitch(acc, pred, starts, widx, grid, grid_n) -> None:
    """The kernel trusts its windows: each must sit on the grid at its place widx, inside acc, and
    the windows of one image must be consecutive places (else first / last touches are wrong)."""
    nsp = acc.ndim - 2
    st, wi = starts.tolist(), widx.tolist()
    if len(wi) != len(st) or pred.shape[0] != len(st) or any(len(r) != nsp + 1 for r in st):
        raise ValueError(f"starts / widx / pred: one row of {nsp + 1} per window, got {tuple(starts.shape)}, "
                         f"{tuple(widx.shape)}, {tuple(pred.shape)}")
    offs = [sum(grid_n[:d]) for d in range(nsp)]
    for n, (row, w) in enumerate(zip(st, wi)):
        if not 0 <= row[0] < acc.shape[0]:
            raise ValueError(f"starts: window {n} is for image {row[0]}, acc holds {acc.shape[0]}")
        if n and row[0] == st[n - 1][0] and w != wi[n - 1] + 1:
            raise ValueError(f"widx: windows of one image must be consecutive places on the grid, got {wi}")
        k = w
        for d in reversed(range(nsp)):
            j, k = k % grid_n[d], k // grid_n[d]
            if row[1 + d] != grid[offs[d] + j] or row[1 + d] + pred.shape[2 + d] > acc.shape[2 + d]:
                raise ValueError(f"starts: window {n} ({row[1:]}) is not the grid window at place {w}, or leaves acc")
        if k:
            raise ValueError(f"widx: place {w} is outside the grid of {grid_n} windows")


@sw_stitch.register_fake
def _(acc, pred, starts, widx, grid, grid_n, g0, g1, g2, wmin, wmap, count=None):
    return None


@torch.library.custom_op("fastmed::sliding_window_normalize", mutates_args=())
def sw_normalize(acc: Tensor, count: Tensor, dtype: torch.dtype, softmax: bool = False) -> Tensor:
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    _normalize_into(acc, count, out, softmax)
    return out


@sw_normalize.register_fake
def _(acc, count, dtype, softmax=False):
    return acc.new_empty(acc.shape, dtype=dtype)


@torch.library.custom_op("fastmed::sliding_window_normalize_", mutates_args=("acc",))
def sw_normalize_(acc: Tensor, count: Tensor, softmax: bool = False) -> None:
    _normalize_into(acc, count, acc, softmax)


@sw_normalize_.register_fake
def _(acc, count, softmax=False):
    return None


def sw_normalize_reference(acc: Tensor, count: Tensor, softmax: bool = False) -> Tensor:
    """float64: ``acc / count``, then the softmax over channels when asked."""
    out = acc.double() / count.double()
    return torch.softmax(out, 1) if softmax else out


def _check_count(acc: Tensor, count: Tensor, out: Tensor, out_channels: Optional[int] = None) -> None:
    """count: the spatial shape of acc (leading size-1 dims allowed); out: acc's batch and spatial
    shape (and channels, unless out_channels says otherwise)."""
    nsp = acc.ndim - 2
    sp = tuple(acc.shape[2:])
    if count.ndim < nsp or tuple(count.shape[count.ndim - nsp:]) != sp or count.numel() != math.prod(sp):
        raise ValueError(f"count: expected the spatial shape of acc {sp}, got {tuple(count.shape)}")
    want = (acc.shape[0], acc.shape[1] if out_channels is None else out_channels) + sp
    if tuple(out.shape) != want:
        raise ValueError(f"out: expected shape {want}, got {tuple(out.shape)}")


def _normalize_into(acc: Tensor, count: Tensor, out: Tensor, softmax: bool = False) -> None:
    _check_count(acc, count, out)
    mod = _ext.require(acc.device, "sw_normalize")
    p = mod.SWNormParams()
    count = _ext.to_device(count, acc.device, acc.dtype)
    count = count.reshape(count.shape[-(acc.ndim - 2):]) if count.ndim > acc.ndim - 2 else count
    (p.a_sb, p.a_sc), p.a_s, p.size = _vec3(acc, 2)
    _, p.n_s, _ = _vec3(count, 0)
    (p.d_sb, p.d_sc), p.d_s, _ = _vec3(out, 2)
    p.B, p.C = acc.shape[0], acc.shape[1]
    p.softmax = int(bool(softmax))
    p.acc, p.acc_dtype = acc.data_ptr(), _ext.DTYPE_CODES[acc.dtype]
    p.count, p.dst, p.dst_dtype = count.data_ptr(), out.data_ptr(), _ext.DTYPE_CODES[out.dtype]
    p.num_threads = _ext.num_threads()
    with _ext.device_guard(acc.device):  # launch on acc's GPU, in its current stream
        p.stream = _ext.stream_ptr(acc.device)
        mod.sw_normalize(p)


@torch.library.custom_op("fastmed::sliding_window_argmax", mutates_args=("out",))
def sw_argmax(acc: Tensor, count: Tensor, out: Tensor) -> None:
    """``out[b, 0] = argmax over c of acc[b, c] / count`` (the division rounded to acc's dtype; first
    maximum wins, NaN counts as the largest, as ``torch.argmax``). CUDA: plain PyTorch."""
    _check_count(acc, count, out, 1)
    if acc.device.type != "cpu":
        out.copy_((acc / count.to(acc.dtype)).argmax(1, keepdim=True))
        return
    mod = _ext.require(acc.device, "sw_argmax")
    p = mod.SWArgmaxParams()
    count = count.to(dtype=acc.dtype)
    count = count.reshape(count.shape[-(acc.ndim - 2):]) if count.ndim > acc.ndim - 2 else count
    (p.a_sb, p.a_sc), p.a_s, p.size = _vec3(acc, 2)
    _, p.n_s, _ = _vec3(count, 0)
    (p.d_sb, _), p.d_s, _ = _vec3(out, 2)
    p.B, p.C = acc.shape[0], acc.shape[1]
    p.acc, p.acc_dtype, p.count = acc.data_ptr(), _ext.DTYPE_CODES[acc.dtype], count.data_ptr()
    p.dst, p.dst_esize = out.data_ptr(), out.element_size()
    p.num_threads = _ext.num_threads()
    mod.sw_argmax(p)


@sw_argmax.register_fake
def _(acc, count, out):
    return None


def sw_accumulate_reference(acc: Tensor, pred: Optional[Tensor], starts: Tensor, weight: Optional[Tensor]) -> None:
    """Plain PyTorch: ``acc[b, :, window] += pred[n] * weight`` for each window in order (in place)."""
    nsp = acc.ndim - 2
    for n in range(starts.shape[0]):
        s = [int(v) for v in starts[n]]
        size = weight.shape[-nsp:] if pred is None else pred.shape[2:]
        idx = (slice(s[0], s[0] + 1), slice(None)) + tuple(slice(o, o + w) for o, w in zip(s[1:], size))
        if pred is None:
            acc[idx] += weight
        else:
            acc[idx] += pred[n:n + 1] * weight if weight is not None else pred[n:n + 1]
