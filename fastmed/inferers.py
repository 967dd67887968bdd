"""Sliding-window inference with fused, weighted stitching: drop-ins for MONAI 1.6's
``sliding_window_inference`` and ``SlidingWindowInferer``.

Same arguments, window placement, order and batching (a stateful predictor sees the same calls),
outputs (tensor, tuple or dict; other resolutions than the input) and values as MONAI's. What
changes is the stitching: each predicted batch is added into the output in one pass with the
blending weight applied on the fly (``fastmed::sliding_window_accumulate``; MONAI multiplies the
batch by the weight map, then adds it, window by window), the normalising weight map is built once
per tiling and cached, and the final division is one pass in place
(``fastmed::sliding_window_normalize_``).

With autograd recording (grad mode on and a prediction, or a ``process_fn`` weight, that requires
grad) MONAI's result is differentiable, and so is fastmed's: such an output is stitched with
PyTorch's own ops in MONAI's order (same values, bit for bit; gradients flow to the predictor's
parameters and to the inputs), not by the kernels, which record no graph. Under ``torch.no_grad()``
or ``torch.inference_mode()``, as in inference, the kernels run. ``sliding_window_labels`` and
``nnunet_sliding_window_inference`` call the predictor under ``torch.no_grad()`` (an argmax has no
gradient; nnU-Net predicts under inference mode).
"""
from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext
from .ops.sliding_window import (FLOAT_DTYPES, empty, sw_accumulate, sw_argmax, sw_gather, sw_normalize_, sw_stitch,
                                 zeros)

_GATHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
                  torch.int32, torch.int64, torch.bool)

__all__ = [
    "sliding_window_inference", "sliding_window_labels", "SlidingWindowInferer", "SlidingWindowInfererAdapt",
    "importance_map_factors",
    "nnunet_sliding_window_inference", "nnunet_steps", "nnunet_gaussian",
]

_PAD_MODES = ("constant", "reflect", "replicate", "circular")
_BLEND_MODES = ("constant", "gaussian")


def _mode_value(mode) -> str:
    return str(getattr(mode, "value", mode)).lower()


def _plain(v):
    """numpy / torch scalars and arrays as Python numbers and lists (MONAI's ensure_tuple_rep takes
    them all)."""
    if isinstance(v, Tensor) or type(v).__module__ == "numpy":
        return v.tolist()
    return v


def _tuple_rep(v, n: int, name: str) -> tuple:
    v = _plain(v)
    if isinstance(v, (int, float)) or v is None:
        return (v,) * n
    v = tuple(v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"{name}: expected one value or {n}, got {len(v)}")
    return v


def _roi_fallback(roi_size, image_size: Sequence[int]) -> tuple:
    """MONAI's fall_back_tuple: a non-positive or None entry takes the image's size."""
    n = len(image_size)
    roi_size = _plain(roi_size)
    roi = (roi_size,) * n if isinstance(roi_size, int) or roi_size is None else tuple(roi_size)
    if len(roi) < n:
        roi = roi + (None,) * (n - len(roi))
    return tuple(int(r) if r is not None and r > 0 else int(s) for r, s in zip(roi[:n], image_size))


def _scan_interval(image_size, roi_size, overlap) -> tuple:
    out = []
    for s, r, o in zip(image_size, roi_size, overlap):
        if r == s:
            out.append(int(r))
        else:
            out.append(max(int(r * (1 - o)), 1))
    return tuple(out)


def _window_starts(image_size, roi_size, interval) -> list:
    """Start of every window, C order over the spatial dims (MONAI's dense_patch_slices)."""
    per_dim = []
    for s, r, i in zip(image_size, roi_size, interval):
        r = min(r, s)
        n = 1
        if i > 0:
            n = next((d + 1 for d in range(int(math.ceil(s / i))) if d * i + r >= s), 1)
        per_dim.append([d * i - max(d * i + r - s, 0) for d in range(n)])
    grids = torch.meshgrid(*[torch.tensor(p, dtype=torch.int64) for p in per_dim], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1).tolist()


def importance_map_factors(patch_size: Sequence[int], mode="constant", sigma_scale=0.125):
    """The per-dimension factors and clamp of MONAI's importance map: the map is
    ``max(((g[0] x g[1]) x g[2]), wmin)`` in float32 (``compute_importance_map``, same operations)."""
    mode = _mode_value(mode)
    n = len(patch_size)
    if mode == "constant":
        return [torch.ones(p, dtype=torch.float32) for p in patch_size], 1.0
    if mode != "gaussian":
        raise ValueError(f"mode: expected one of {_BLEND_MODES}, got {mode!r}")
    sig = _tuple_rep(sigma_scale, n, "sigma_scale")
    gs = []
    for p, s in zip(patch_size, sig):
        sigma = p * s
        x = torch.arange(start=-(p - 1) / 2.0, end=(p - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x**2 / (-2 * sigma**2))
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"sigma_scale: {sigma_scale} gives a Gaussian that is not finite over a window "
                             f"of {p} voxels (sigma = {p} x {s})")
        gs.append(g)
    low = gs[0].min()
    for g in gs[1:]:
        low = low * g.min()
    return gs, max(float(low), 1e-3)


def _importance_map(gs, wmin) -> Tensor:
    m = gs[0]
    for i, g in enumerate(gs[1:], 1):
        m = m.unsqueeze(-1) * g[(None,) * i]
    return torch.clamp(m, min=wmin)


def _flatten(out):
    if isinstance(out, Tensor):
        return None, (out,)
    if isinstance(out, Mapping):
        keys = sorted(out.keys())
        return keys, tuple(out[k] for k in keys)
    if isinstance(out, (list, tuple)):
        return None, tuple(out)
    return None, (out,)


def _pack(outs, keys):
    if keys is not None:
        return dict(zip(keys, outs))
    if len(outs) == 1:
        return outs[0]
    return tuple(outs)


class _Tiling:
    """Normalising weight maps by (image size, roi, interval, weight, device, dtype, scale)."""

    cache: dict = {}
    max_entries = 4
    max_bytes = 64 << 20

    @classmethod
    def count_map(cls, key, shape, starts, gs, wmin, wmap, device, dtype):
        hit = cls.cache.get(key)
        if hit is not None:
            return hit
        count = zeros([1, 1] + list(shape), dtype, device)
        st = torch.tensor([[0] + list(s) for s in starts], dtype=torch.int64)
        if wmap is not None:
            sw_accumulate(count, None, st, None, None, None, 0.0, wmap)
        else:
            sw_accumulate(count, None, st, *_pad3(gs), wmin, None)
        # keep a few small maps (repeated inference on same-size volumes); a big one is cheap to
        # rebuild next to the inference itself and not worth holding on to
        if count.numel() * count.element_size() <= cls.max_bytes:
            if len(cls.cache) >= cls.max_entries:
                cls.cache.pop(next(iter(cls.cache)))
            cls.cache[key] = count
        return count


def _pad3(gs):
    gs = list(gs)
    return [torch.ones(1)] * (3 - len(gs)) + gs


def _check_sizes(sizes, name: str, allow_none: bool = False) -> None:
    """Window sizes are whole numbers of voxels (an int, or None / non-positive for MONAI's fall-back)."""
    sizes = _plain(sizes)
    for r in (sizes if isinstance(sizes, Sequence) else [sizes]):
        if r is None and allow_none:
            continue
        if isinstance(r, bool) or not (isinstance(r, numbers.Integral) or (isinstance(r, float) and r.is_integer())):
            raise ValueError(f"{name}: expected whole numbers of voxels, got {sizes}")


def _check_args(inputs, roi_size, sw_batch_size, overlap, mode, padding_mode):
    """The argument checks both entry points share; returns (spatial dims, overlap, mode, padding_mode).
    (roi_size and sw_batch_size come through _plain first.)"""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor (B, C, *spatial), got {type(inputs).__name__}")
    nsp = inputs.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"inputs: expected (B, C, H, W) or (B, C, D, H, W), got shape {tuple(inputs.shape)}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"inputs: empty batch or no channels, got shape {tuple(inputs.shape)}")
    if isinstance(roi_size, Sequence) and len(roi_size) != nsp:
        raise ValueError(
            f"roi_size: has {len(roi_size)} dimensions but inputs {tuple(inputs.shape)} has {nsp} spatial dimensions"
        )
    _check_sizes(roi_size, "roi_size", allow_none=True)
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size: expected a positive int, got {sw_batch_size!r}")
    if inputs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"inputs: expected a floating-point tensor, got {inputs.dtype}")
    overlap = _tuple_rep(overlap, nsp, "overlap")
    if any(not 0 <= o < 1 for o in overlap):
        raise ValueError(f"overlap: must be >= 0 and < 1, got {overlap}")
    mode = _mode_value(mode)
    if mode not in _BLEND_MODES:
        raise ValueError(f"mode: expected one of {_BLEND_MODES}, got {mode!r}")
    padding_mode = _mode_value(padding_mode)
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode: expected one of {_PAD_MODES}, got {padding_mode!r}")
    return nsp, overlap, mode, padding_mode


def _device_arg(value, name: str, default: torch.device) -> torch.device:
    """``device`` / ``sw_device`` as a torch.device (``default`` for None), refused here, naming the
    argument, when it is not a device or names a CUDA device this process does not have."""
    if value is None:
        return default
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a device: {value!r}") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{name}: {value!r} asks for CUDA, which this process does not have "
                             f"(PyTorch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{name}: {value!r} asks for CUDA device {dev.index}, but this process sees {n}")
    return dev


def _real_pred(p: Tensor, who: str, dtype: torch.dtype) -> Tensor:
    """A prediction as the stitching kernels take it: floating point as it is; integers and booleans
    converted to the accumulator's ``dtype`` (summed as numbers); complex refused, naming ``who``."""
    if p.is_complex():
        raise TypeError(f"{who}: outputs must be real, got {p.dtype}")
    return p if p.dtype in FLOAT_DTYPES else p.to(dtype)


def _check_weight_sum(count: Tensor, name: str, origin: Optional[Sequence[int]] = None) -> None:
    """Refuse a weight sum that is 0 or not finite anywhere (a window weight map with zeros, NaN or
    inf; MONAI returns NaN or inf there), naming the argument that gave the weights. ``count`` is
    (1, 1, *spatial), its voxel 0 at ``origin`` of the (padded) image."""
    bad = ~torch.isfinite(count) | (count == 0)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        at = tuple(i + o for i, o in zip(first[2:], origin or [0] * (count.ndim - 2)))
        raise ValueError(
            f"{name}: the windows' weights sum to {count[tuple(first)].item()} at voxel {at} "
            f"(one of {int(bad.sum())}), so the result there would be 0/0 or not finite; give weights "
            "that are finite and non-zero where every voxel is covered")


def _pad_to_roi(inputs, condition, roi_size, padding_mode, cval):
    """MONAI's handling of an image smaller than the window: the roi's non-positive entries take the
    image size, and the image is padded (centred) to at least the roi.
    Returns (roi_size, padded image size, F.pad amounts, inputs, condition)."""
    nsp = inputs.ndim - 2
    image_size_ = tuple(inputs.shape[2:])
    roi_size = _roi_fallback(roi_size, image_size_)
    image_size = tuple(max(s, r) for s, r in zip(image_size_, roi_size))
    pad_size = []
    for k in range(inputs.ndim - 1, 1, -1):
        diff = max(roi_size[k - 2] - inputs.shape[k], 0)
        pad_size += [diff // 2, diff - diff // 2]
    if any(pad_size):
        if padding_mode in ("reflect", "circular"):
            for d in range(nsp):
                need = max(pad_size[2 * (nsp - 1 - d)], pad_size[2 * (nsp - 1 - d) + 1])
                limit = image_size_[d] - (1 if padding_mode == "reflect" else 0)
                if need > limit:
                    raise ValueError(
                        f"padding_mode: {padding_mode!r} can pad spatial dimension {d} (size {image_size_[d]}) by at "
                        f"most {limit} on a side, but roi_size {roi_size} needs {need}; use 'constant' or 'replicate'"
                    )
        pad_kw = {"value": cval} if padding_mode == "constant" else {}
        inputs = F.pad(inputs, pad=pad_size, mode=padding_mode, **pad_kw)
        if condition is not None:
            condition = F.pad(condition, pad=pad_size, mode=padding_mode, **pad_kw)
    return roi_size, image_size, pad_size, inputs, condition


def _crop_padding(t: Tensor, pad_size, image_size_, roi_size=None) -> Tensor:
    """Undo _pad_to_roi on a result (F.pad order: last dimension first). With ``roi_size``, the crop
    is scaled by the result's size over the roi, as MONAI does for outputs at other resolutions."""
    nsp = len(image_size_)
    zoom = [a / r for a, r in zip(t.shape[2:], roi_size)] if roi_size is not None else [1.0] * nsp
    sl = [slice(None)] * nsp
    for sp in range(nsp):
        si = nsp - sp - 1
        lo = pad_size[sp * 2]
        sl[si] = slice(int(round(lo * zoom[si])), int(round((lo + image_size_[si]) * zoom[si])))
    return t[(slice(None), slice(None), *sl)]


def _gather(t: Tensor, coords, pin_memory: bool = False) -> Tensor:
    """The windows ``t[c]`` for c in coords, concatenated (MONAI's torch.cat of slices), gathered by
    one kernel call when they are plain equal-size windows of one batch item each."""
    if t.dtype in _GATHER_DTYPES and t.device.type in ("cpu", "cuda") and not t.requires_grad:
        starts, size = [], None
        for c in coords:
            b, ch, *sp = c
            sz = [s.stop - s.start for s in sp]
            if b.stop - b.start != 1 or ch != slice(None) or any(s.step not in (None, 1) for s in sp) or (
                    size is not None and sz != size):
                break
            size = sz
            starts.append([b.start] + [s.start for s in sp])
        else:
            if _ext.cpu is not None and (t.device.type == "cpu" or _ext.cuda is not None):
                return sw_gather(t, torch.tensor(starts, dtype=torch.int64), size, pin_memory)
    out = torch.cat([t[tuple(c)] for c in coords]) if len(coords) > 1 else t[tuple(coords[0])]
    return out.pin_memory() if pin_memory else out


def _window_batches(inputs, condition, batches, coords_of, sw_device):
    """Yields (coords, windows on sw_device, condition windows) batch by batch. With the volume on the
    CPU and the network on a GPU, the next batch is gathered into pinned memory and copied on a side
    stream while the current one is predicted."""
    overlap = inputs.device.type == "cpu" and sw_device.type == "cuda" and torch.cuda.is_available()
    if not overlap:
        for idxs in batches:
            coords = coords_of(idxs)
            cond = _gather(condition, coords).to(sw_device) if condition is not None else None
            yield coords, _gather(inputs, coords).to(sw_device), cond
        return
    stream = torch.cuda.Stream(device=sw_device)

    def stage(idxs):
        coords = coords_of(idxs)
        hosts = [_gather(inputs, coords, pin_memory=True)]
        if condition is not None:
            hosts.append(_gather(condition, coords, pin_memory=True))
        with torch.cuda.stream(stream):
            devs = [h.to(sw_device, non_blocking=True) for h in hosts]
        done = torch.cuda.Event()
        done.record(stream)
        return coords, hosts, devs, done

    nxt = stage(batches[0]) if batches else None
    for k in range(len(batches)):
        coords, hosts, devs, done = nxt
        if k + 1 < len(batches):
            nxt = stage(batches[k + 1])  # its copy runs while this batch is predicted
        cur = torch.cuda.current_stream(sw_device)
        cur.wait_event(done)
        for d in devs:
            d.record_stream(cur)
        yield coords, devs[0], (devs[1] if len(devs) > 1 else None)
        del hosts


def sliding_window_inference(
    inputs: Tensor,
    roi_size,
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap=0.25,
    mode="constant",
    sigma_scale=0.125,
    padding_mode="constant",
    cval: float = 0.0,
    sw_device=None,
    device=None,
    progress: bool = False,
    roi_weight_map: Optional[Tensor] = None,
    process_fn: Optional[Callable] = None,
    buffer_steps: Optional[int] = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    **kwargs: Any,
):
    """Sliding-window inference, as ``monai.inferers.sliding_window_inference`` (MONAI 1.6), with
    every argument meaning the same. See the module docstring for what fastmed does differently.
    """
    return _sliding_window(inputs, roi_size, sw_batch_size, predictor, overlap, mode, sigma_scale, padding_mode, cval,
                           sw_device, device, progress, roi_weight_map, process_fn, buffer_steps, buffer_dim,
                           with_coord, False, args, kwargs)


def _sliding_window(inputs, roi_size, sw_batch_size, predictor, overlap, mode, sigma_scale, padding_mode, cval,
                    sw_device, device, progress, roi_weight_map, process_fn, buffer_steps, buffer_dim, with_coord,
                    softmax: bool, args, kwargs):
    """sliding_window_inference's body; ``softmax`` fuses a softmax over channels into the final
    normalisation (SlidingWindowInferer(softmax=True))."""
    roi_size, sw_batch_size = _plain(roi_size), _plain(sw_batch_size)
    nsp, overlap, mode, padding_mode = _check_args(inputs, roi_size, sw_batch_size, overlap, mode, padding_mode)
    buffered = buffer_steps is not None and buffer_steps > 0
    if buffered:
        if not -nsp <= buffer_dim < nsp:
            raise ValueError(f"buffer_dim: must be in [{-nsp}, {nsp}), got {buffer_dim}")
        if buffer_dim < 0:
            buffer_dim += nsp

    meta_src = inputs
    compute_dtype = inputs.dtype
    batch_size = inputs.shape[0]
    image_size_ = tuple(inputs.shape[2:])
    device = _device_arg(device, "device", inputs.device)
    sw_device = _device_arg(sw_device, "sw_device", inputs.device)
    condition = kwargs.pop("condition", None)
    if condition is not None and (not isinstance(condition, Tensor) or condition.ndim != inputs.ndim
                                  or condition.shape[0] != inputs.shape[0]
                                  or condition.shape[2:] != inputs.shape[2:]):
        raise ValueError(f"condition: expected a tensor with the batch size and spatial shape of inputs "
                         f"{tuple(inputs.shape)}, got {getattr(condition, 'shape', type(condition).__name__)}")
    if type(inputs) is not Tensor:  # e.g. MONAI's MetaTensor: work on the plain tensor
        inputs = inputs.as_subclass(Tensor)
        if condition is not None and type(condition) is not Tensor:
            condition = condition.as_subclass(Tensor)

    roi_size, image_size, pad_size, inputs, condition = _pad_to_roi(inputs, condition, roi_size, padding_mode, cval)

    interval = _scan_interval(image_size, roi_size, overlap)
    starts = grid_starts = _window_starts(image_size, roi_size, interval)
    patch = tuple(min(r, s) for r, s in zip(roi_size, image_size))
    num_win = len(starts)
    total = num_win * batch_size
    # per window, the box of voxels no earlier window (in C order) touched: written, not added
    fresh = _fresh_boxes(starts, patch)

    # the order and batches of windows
    if not buffered:
        batches = [list(range(i, min(i + sw_batch_size, total))) for i in range(0, total, sw_batch_size)]
    else:
        batches, starts = _buffered_batches(starts, patch, batch_size, sw_batch_size, buffer_dim, buffer_steps)

    # the window weight: MONAI's importance map, kept as separable factors where it is one
    if patch == roi_size and roi_weight_map is not None:
        gs, wmin = None, None
        imap = _weight_map_arg(roi_weight_map, patch).to(device=sw_device, dtype=compute_dtype)
    else:
        gs, wmin = importance_map_factors(patch, mode, sigma_scale)
        imap = _importance_map(gs, wmin).to(device=sw_device, dtype=compute_dtype)
        if not process_fn:
            imap = imap[None, None]
    own_map = gs is not None

    outputs, counts, zscales, graphs, unchecked, keys = [], [], [], [], [], None
    # CPU, plain tiling: each batch is added in one pass (sw_stitch) and every voxel is normalised
    # as it is written for the last time, so no separate normalisation pass
    grid = [sorted({s[d] for s in starts}) for d in range(nsp)]
    grid_flat, grid_n = [v for g in grid for v in g], [len(g) for g in grid]
    stitch_ok = (not buffered and not process_fn and device.type == "cpu" and sw_device.type == "cpu"
                 and compute_dtype in (torch.float32, torch.float64) and _ext.cpu is not None
                 and hasattr(_ext.cpu, "sw_stitch"))
    stitched = []  # per output: normalised by sw_stitch
    it = batches
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(batches)
        except ImportError:
            warnings.warn("progress=True needs tqdm, which is not installed")
    def coords_of(idxs):
        return [
            [slice(i // num_win, i // num_win + 1), slice(None)]
            + [slice(s, s + p) for s, p in zip(starts[i % num_win], patch)]
            for i in idxs
        ]

    loader = _window_batches(inputs, condition, batches, coords_of, sw_device)
    for idxs, (coords, win, cond) in zip(it, loader):
        if cond is not None:
            kwargs["condition"] = cond
        out = predictor(win, coords, *args, **kwargs) if with_coord else predictor(win, *args, **kwargs)
        keys, seg = _flatten(out)
        if process_fn:
            seg, w_t = process_fn(seg, win, imap)
            if not isinstance(w_t, Tensor):
                raise TypeError(f"process_fn: must return (outputs, weight tensor), got a {type(w_t).__name__} weight")
            custom_w = True
        else:
            w_t, custom_w = imap, not own_map
        if w_t.ndim < nsp + 2:  # as it broadcasts (MONAI: a window-shaped map gets [None, None])
            w_t = w_t.reshape((1,) * (nsp + 2 - w_t.ndim) + tuple(w_t.shape))
        if tuple(w_t.shape[2:]) != patch:  # spread over the window where it broadcasts; else refused below
            try:
                w_t = w_t.expand(tuple(w_t.shape[:2]) + patch).contiguous()
            except RuntimeError:
                pass
        w_t = w_t.to(dtype=compute_dtype, device=sw_device)
        if buffered:
            seg = seg[:1]  # MONAI's buffered mode keeps the first output only
        w_chain = w_t  # MONAI resizes the weight for an output at another resolution and keeps it resized
        for ss, p in enumerate(seg):
            w_o, cw_o = w_t, custom_w  # this output's weight
            if not isinstance(p, Tensor):
                raise TypeError(f"predictor: outputs must be tensors, got {type(p).__name__}")
            if p.ndim != nsp + 2 or p.shape[0] != len(idxs):
                raise ValueError(
                    f"predictor: output {ss} has shape {tuple(p.shape)}; expected ({len(idxs)}, C, ...) "
                    f"for a batch of {len(idxs)} windows of {nsp}D"
                )
            seg_shape = tuple(p.shape[2:])
            z = None
            if buffered and seg_shape != tuple(roi_size):
                raise ValueError(f"predictor: with buffer_steps, outputs must have the window's spatial size "
                                 f"{tuple(roi_size)}, got {tuple(p.shape)}")
            if not buffered and seg_shape != tuple(roi_size):
                z = [o / float(r) for o, r in zip(seg_shape, roi_size)]
                w_chain = w_o = F.interpolate(w_chain, seg_shape, mode="nearest-exact")
                cw_o = True
            elif w_chain is not w_t:
                # a full-resolution output after one at another resolution: MONAI weights it with the
                # resized map where that broadcasts (a 1 x 1 map, say), and fails where it does not;
                # there the window's own map is used here
                try:
                    w_o, cw_o = w_chain.expand(tuple(w_chain.shape[:2]) + seg_shape).contiguous(), True
                except RuntimeError:
                    pass
            if len(outputs) <= ss:
                shape = [batch_size, p.shape[1]] + (
                    [int(s * f) for s, f in zip(image_size, z)] if z else list(image_size))
                # with autograd recording (a prediction or weight that requires grad), MONAI's result
                # is differentiable: this output is then stitched with PyTorch ops, as MONAI does
                graph = torch.is_grad_enabled() and (p.requires_grad or w_o.requires_grad)
                graphs.append(graph)
                zscales.append(z)
                if graph:
                    outputs.append(torch.zeros(shape, dtype=compute_dtype, device=device))
                    counts.append(_count_map_autograd(grid_starts, z, w_o[:1, :1].to(device), shape[2:],
                                                      compute_dtype))
                    stitched.append(False)
                else:
                    # first touches write (no zero fill) in the plain grid order at the input's resolution
                    outputs.append((empty if not buffered and z is None else zeros)(shape, compute_dtype, device))
                    counts.append(_count_map(image_size, roi_size, interval, starts, z, w_o, cw_o, gs, wmin,
                                             mode, sigma_scale, shape[2:], device, compute_dtype))
                    stitched.append(stitch_ok and z is None and not softmax and w_o.shape[0] == 1
                                    and w_o.shape[1] == 1)
                unchecked.append(cw_o)  # a user's weights: their sum is checked below
            elif list(p.shape[1:2]) != list(outputs[ss].shape[1:2]) or zscales[ss] != z:
                raise ValueError(
                    f"predictor: output {ss} changed shape between windows ({tuple(p.shape)}); "
                    f"the first batch gave {outputs[ss].shape[1]} channels at scale {zscales[ss]}"
                )
            st = torch.tensor(
                [[i // num_win] + [int(s * f) for s, f in zip(starts[i % num_win], z or [1.0] * nsp)] for i in idxs],
                dtype=torch.int64,
            )
            fr = None if buffered or z is not None else torch.tensor([fresh[i % num_win] for i in idxs])
            p = _real_pred(p.to(device), "predictor", compute_dtype)
            if process_fn:
                try:
                    fits = torch.broadcast_shapes(w_o.shape, p.shape) == p.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    raise ValueError(f"process_fn: returned a weight of shape {tuple(w_o.shape)}, which does not "
                                     f"broadcast to the window batch's output {ss} of shape {tuple(p.shape)}")
            if unchecked[ss]:  # MONAI's result would be NaN / inf where a user's weights sum to 0
                cnt = counts[ss].detach()  # checked where the result is kept (not in padding cropped off)
                cnt = _crop_padding(cnt, pad_size, image_size_, roi_size) if any(pad_size) else cnt
                _check_weight_sum(cnt, "process_fn" if process_fn else "roi_weight_map")
                unchecked[ss] = False
            # MONAI weights a window in place (`buffer *= w_t`: rounded to the prediction's dtype; in
            # buffered mode `p * w_t`, the promoted dtype); the kernels weight in the accumulator's
            # dtype with a float32 weight map. Where that would round differently (a prediction of
            # another dtype than the accumulator, e.g. float16 under autocast, bfloat16 on a float16
            # input; a float64 custom weight not exact in float32) or the weight varies per window or
            # channel, the window is weighted here as MONAI does and added unweighted.
            pre = cw_o and (w_o.shape[0] != 1 or w_o.shape[1] != 1)
            pre = pre or (not buffered and p.dtype != compute_dtype)
            pre = pre or (cw_o and compute_dtype == torch.float64 and not _exact_in_float32(w_o))
            if p.shape[1] == 0:  # no channels: the output is empty (MONAI's too)
                continue
            if graphs[ss]:
                _add_windows_autograd(outputs[ss], _weighted(p, w_o.to(device), buffered), st)
                continue
            if pre:
                p = _weighted(p, w_o.to(device), buffered).contiguous()
            if stitched[ss]:
                wi = torch.tensor([i % num_win for i in idxs], dtype=torch.int64)
                g = _pad3(gs) if not (cw_o or pre) else [None] * 3
                wm = None if not cw_o or pre else w_o[0, 0].to(device)
                for k in range(0, len(idxs), 64):  # the kernel takes 64 windows at a time
                    sw_stitch(outputs[ss], p[k:k + 64], st[k:k + 64], wi[k:k + 64], grid_flat, grid_n, *g,
                              wmin if not (cw_o or pre) else 0.0, wm, counts[ss])
            elif pre:
                sw_accumulate(outputs[ss], p, st, None, None, None, 0.0, None, fr)
            elif not cw_o:
                sw_accumulate(outputs[ss], p, st, *_pad3(gs), wmin, None, fr)
            else:
                sw_accumulate(outputs[ss], p, st, None, None, None, 0.0, w_o[0, 0].to(device), fr)

    for ss in range(len(outputs)):
        if graphs[ss]:
            outputs[ss] = outputs[ss] / counts[ss]
            if softmax:
                outputs[ss] = torch.softmax(outputs[ss], 1)
        elif not stitched[ss] and outputs[ss].numel():
            sw_normalize_(outputs[ss], counts[ss], softmax)
    if any(pad_size):
        outputs = [_crop_padding(o, pad_size, image_size_, roi_size) for o in outputs]
    result = _pack(outputs, keys)
    if type(meta_src) is not Tensor:
        result = _to_meta(result, meta_src, device)
    return result


def _weighted(p: Tensor, w: Tensor, buffered: bool) -> Tensor:
    """A window batch times its weight as MONAI computes it: in place (the prediction's dtype), or
    in buffered mode a promoted product."""
    pw = p * w
    return pw if buffered else pw.to(p.dtype)


def _exact_in_float32(w: Tensor) -> bool:
    return bool(torch.equal(w.to(torch.float32).to(w.dtype), w))


def _fresh_boxes(starts, patch) -> list:
    """Windows on a grid in C order: the first window containing a voxel is, per dimension, the first
    window along that dimension containing its coordinate, so each window's first touches form a box:
    per dimension, from the end of the previous window along it to the window's end."""
    nsp = len(patch)
    lo = []
    for d in range(nsp):
        ss = sorted({s[d] for s in starts})
        lo.append({b: (max(0, a + patch[d] - b) if k else 0) for k, (a, b) in enumerate(zip([None] + ss[:-1], ss))})
    return [[v for d in range(nsp) for v in (lo[d][s[d]], patch[d])] for s in starts]


def _count_map(image_size, roi_size, interval, starts, z, w_t, custom_w, gs, wmin, mode, sigma_scale, shape, device,
               dtype):
    nsp = len(image_size)
    sc = z or [1.0] * nsp
    st = [[int(s * f) for s, f in zip(s0, sc)] for s0 in starts]
    if not custom_w:
        key = ("sep", tuple(image_size), tuple(roi_size), tuple(interval), tuple(map(tuple, starts)), mode,
               tuple(map(float, _tuple_rep(sigma_scale, nsp, "sigma_scale"))), str(device), dtype)
        return _Tiling.count_map(key, shape, st, gs, wmin, None, device, dtype)
    count = torch.zeros([1, 1] + list(shape), dtype=dtype, device=device)
    w = w_t[0, 0].to(device)
    if dtype == torch.float64 and not _exact_in_float32(w):  # the kernel's weight map is float32
        for s in st:
            count[(0, 0) + tuple(slice(a, a + n) for a, n in zip(s, w.shape))] += w
        return count
    stt = torch.tensor([[0] + s for s in st], dtype=torch.int64)
    sw_accumulate(count, None, stt, None, None, None, 0.0, w)
    return count


def _weight_map_arg(roi_weight_map, patch) -> Tensor:
    """roi_weight_map as a tensor of the window's shape (it may broadcast to it, as MONAI's product
    with the prediction allows); anything else is refused here rather than misread later."""
    try:
        w = torch.as_tensor(roi_weight_map)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"roi_weight_map: expected a tensor of the window's shape {tuple(patch)}, got "
                        f"{type(roi_weight_map).__name__}") from e
    full = (1, 1) + tuple(patch)
    try:
        ok = tuple(torch.broadcast_shapes(tuple(w.shape), full)) == full and w.ndim <= len(full)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"roi_weight_map: expected the window's shape {tuple(patch)} (or one that broadcasts "
                         f"to (1, 1, *roi_size)), got {tuple(w.shape)}")
    if w.is_complex():
        raise TypeError(f"roi_weight_map: expected real weights, got {w.dtype}")
    return w.expand(tuple(patch) if w.ndim <= len(patch) else full)


def _count_map_autograd(starts, z, w_t, shape, dtype) -> Tensor:
    """The weight sum as MONAI builds it (every window of the grid, in grid order, adds the first
    batch's weight ``w_t``, (1, 1, *window)), with PyTorch ops: differentiable where ``w_t``
    requires grad."""
    nsp = len(shape)
    sc = z or [1.0] * nsp
    count = torch.zeros([1, 1] + list(shape), dtype=dtype, device=w_t.device)
    ext = list(w_t.shape[2:])
    for s0 in starts:
        idx = (slice(None), slice(None)) + tuple(slice(int(s * f), int(s * f) + n) for s, f, n in zip(s0, sc, ext))
        count[idx] += w_t
    return count


def _add_windows_autograd(out: Tensor, pw: Tensor, st: Tensor) -> None:
    """``out[b, :, window] += pw[k]`` for each weighted prediction ``pw[k]`` of a batch, starts
    ``st[k] = (b, *offsets)``, with PyTorch's in-place indexing ops (recorded by autograd)."""
    ext = pw.shape[2:]
    for k, row in enumerate(st.tolist()):
        b = row[0]
        idx = (slice(b, b + 1), slice(None)) + tuple(slice(s, s + n) for s, n in zip(row[1:], ext))
        out[idx] += pw[k:k + 1]


def _buffered_batches(starts, patch, batch_size, sw_batch_size, buffer_dim, buffer_steps):
    """MONAI's buffered order: windows sorted (stably) by their start along buffer_dim, batches that
    do not cross a buffer boundary."""
    order = sorted(range(len(starts)), key=lambda i: starts[i][buffer_dim])
    starts = [starts[i] for i in order]
    firsts = [s[buffer_dim] for s in starts]
    counts = []
    for v in firsts:
        if counts and counts[-1][0] == v:
            counts[-1][1] += 1
        else:
            counts.append([v, 1])
    ends, acc = [], 0
    for _, c in counts:
        acc += c
        ends.append(acc)
    x = [0, *ends][:: min(len(ends), int(buffer_steps))]
    if x[-1] < ends[-1]:
        x.append(ends[-1])
    n = len(starts)
    batches = []
    for b in range(batch_size):
        for i in range(len(x) - 1):
            lo, hi = b * n + x[i], b * n + x[i + 1]
            batches += [list(range(j, min(j + sw_batch_size, hi))) for j in range(lo, hi, sw_batch_size)]
    return batches, starts


def _to_meta(result, src, device):
    """MONAI's last step for a MetaTensor input, as it does it: the whole result (a tensor, tuple or
    dict) converted to an empty MetaTensor carrying the input's metadata, on the output device (so a
    float32 result whatever the input's dtype, as MONAI gives)."""
    try:
        from monai.data import MetaTensor
        from monai.utils import convert_to_dst_type
    except ImportError:
        return result
    if not isinstance(src, MetaTensor):
        return result
    meta = MetaTensor([]).copy_meta_from(src, copy_attr=False)
    return convert_to_dst_type(result, meta, device=device)[0]


class SlidingWindowInferer:
    """``monai.inferers.SlidingWindowInferer`` (MONAI 1.6) with fastmed's stitching."""

    def __init__(self, roi_size, sw_batch_size: int = 1, overlap=0.25, mode="constant", sigma_scale=0.125,
                 padding_mode="constant", cval: float = 0.0, sw_device=None, device=None, progress: bool = False,
                 cache_roi_weight_map: bool = False, cpu_thresh: Optional[int] = None,
                 buffer_steps: Optional[int] = None, buffer_dim: int = -1, with_coord: bool = False,
                 softmax: bool = False) -> None:
        """MONAI's arguments, plus ``softmax`` (fastmed): return the softmax over channels of the
        stitched result, computed inside the final normalisation (no extra pass, no extra tensor)."""
        self.softmax = bool(softmax)
        self.roi_size = roi_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = _mode_value(mode)
        if self.mode not in _BLEND_MODES:
            raise ValueError(f"mode: expected one of {_BLEND_MODES}, got {mode!r}")
        self.sigma_scale = sigma_scale
        self.padding_mode = padding_mode
        self.cval = cval
        self.sw_device = sw_device
        self.device = device
        self.progress = progress
        self.cpu_thresh = cpu_thresh
        self.buffer_steps = buffer_steps
        self.buffer_dim = buffer_dim
        self.with_coord = with_coord
        self.roi_weight_map = None
        roi = _plain(roi_size)
        if cache_roi_weight_map and isinstance(roi, Sequence) and all(r is not None and r > 0 for r in roi):
            gs, wmin = importance_map_factors(tuple(roi), self.mode, sigma_scale)
            self.roi_weight_map = _importance_map(gs, wmin).to(device or "cpu")
        elif cache_roi_weight_map:
            warnings.warn("cache_roi_weight_map=True, but cache is not created. (dynamic roi_size?)")

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any):
        condition = kwargs.get("condition", None)
        if condition is not None and condition.shape != inputs.shape:
            raise ValueError(f"condition: must match the shape of inputs ({inputs.shape}), got {condition.shape}")
        device = kwargs.pop("device", self.device)
        buffer_steps = kwargs.pop("buffer_steps", self.buffer_steps)
        buffer_dim = kwargs.pop("buffer_dim", self.buffer_dim)
        if device is None and self.cpu_thresh is not None and inputs.shape[2:].numel() > self.cpu_thresh:
            device = "cpu"
        return _sliding_window(
            inputs, self.roi_size, self.sw_batch_size, network, self.overlap, self.mode, self.sigma_scale,
            self.padding_mode, self.cval, self.sw_device, device, self.progress, self.roi_weight_map, None,
            buffer_steps, buffer_dim, self.with_coord, self.softmax, args, kwargs)


def sliding_window_labels(
    inputs: Tensor,
    roi_size,
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap=0.25,
    mode="constant",
    sigma_scale=0.125,
    padding_mode="constant",
    cval: float = 0.0,
    sw_device=None,
    device=None,
    roi_weight_map: Optional[Tensor] = None,
    accumulate_dtype: Optional[torch.dtype] = None,
    labels_dtype: Optional[torch.dtype] = None,
    slab_dim: Optional[int] = None,
    *args: Any,
    **kwargs: Any,
) -> Tensor:
    """Sliding-window inference straight to a label map: ``argmax`` over the classes of what
    :func:`sliding_window_inference` would return, as ``(B, 1, *spatial)`` integers, without ever
    holding the C-channel result for the whole volume.

    Windows are taken slab by slab along ``slab_dim`` (default: the largest spatial dimension); the
    accumulator is a ring of ``roi_size[slab_dim]`` planes, and planes are turned into labels as soon
    as no later window touches them, so memory is ``C x roi x (the other two dimensions)`` instead of
    ``C x volume`` (117 classes, 512 x 512 x 800, roi 96: 5.9 GB in float16 instead of 98 GB in float32).
    ``accumulate_dtype`` defaults to the input's dtype (``torch.float16`` halves the memory; argmax
    may then differ where two classes are within fp16 rounding). ``labels_dtype`` defaults to
    uint8 (up to 256 classes), else int16. The predictor must return one tensor ``(n, C, *roi)``.
    With ``slab_dim=0`` the windows are summed in MONAI's order and the labels equal
    ``argmax(sliding_window_inference(...), 1)`` exactly.
    """
    roi_size, sw_batch_size = _plain(roi_size), _plain(sw_batch_size)
    nsp, overlap, mode, padding_mode = _check_args(inputs, roi_size, sw_batch_size, overlap, mode, padding_mode)
    acc_dtype = accumulate_dtype or inputs.dtype
    if acc_dtype not in FLOAT_DTYPES:
        raise TypeError(f"accumulate_dtype: expected a floating-point dtype, got {acc_dtype}")
    if labels_dtype is not None and (not isinstance(labels_dtype, torch.dtype) or labels_dtype.is_floating_point
                                     or labels_dtype.is_complex or labels_dtype == torch.bool):
        raise TypeError(f"labels_dtype: expected an integer dtype, got {labels_dtype}")
    if type(inputs) is not Tensor:
        inputs = inputs.as_subclass(Tensor)
    device = _device_arg(device, "device", inputs.device)
    sw_device = _device_arg(sw_device, "sw_device", inputs.device)
    batch_size, image_size_ = inputs.shape[0], tuple(inputs.shape[2:])
    roi_size, image_size, pad_size, inputs, _ = _pad_to_roi(inputs, None, roi_size, padding_mode, cval)
    slab_dim = _plain(slab_dim)
    if slab_dim is None:
        slab_dim = max(range(nsp), key=lambda d: (image_size[d], -d))
    if isinstance(slab_dim, bool) or not isinstance(slab_dim, numbers.Integral):
        raise TypeError(f"slab_dim: expected a spatial axis as an int, got {slab_dim!r}")
    slab_dim = int(slab_dim)
    if not -nsp <= slab_dim < nsp:
        raise ValueError(f"slab_dim: must be in [{-nsp}, {nsp}), got {slab_dim}")
    slab_dim %= nsp
    interval = _scan_interval(image_size, roi_size, overlap)
    starts = _window_starts(image_size, roi_size, interval)
    patch = tuple(min(r, s) for r, s in zip(roi_size, image_size))
    order = sorted(range(len(starts)), key=lambda i: starts[i][slab_dim])
    if patch == roi_size and roi_weight_map is not None:
        gs, wmin = None, 0.0
        wmap = _weight_map_arg(roi_weight_map, patch).to(device=device, dtype=torch.float32).reshape(patch)
    else:
        gs, wmin = importance_map_factors(patch, mode, sigma_scale)
        gs = [g.to(device) for g in gs]
        wmap = None
    R = patch[slab_dim]
    ax = 2 + slab_dim
    ring_shape = list(image_size)
    ring_shape[slab_dim] = R
    labels = None
    acc = count = None

    def weights_for(off, n):
        if gs is not None:
            g = list(gs)
            g[slab_dim] = g[slab_dim][off:off + n]
            return _pad3(g), wmin, None
        return [None, None, None], 0.0, wmap.narrow(slab_dim, off, n)

    def finalize(b, lo, hi):
        z = lo
        while z < hi:
            r = z % R
            n = min(hi - z, R - r, chunk)
            a = acc.narrow(ax, r, n)
            c = count.narrow(ax, r, n)
            if wmap is not None:  # a user's weights: refused where they sum to 0 (argmax of NaN) in the image
                lo = [pad_size[2 * (nsp - 1 - d)] for d in range(nsp)]
                a0, a1 = max(z, lo[slab_dim]), min(z + n, lo[slab_dim] + image_size_[slab_dim])
                if a1 > a0:
                    kept = tuple(slice(a0 - z, a1 - z) if d == slab_dim else slice(lo[d], lo[d] + image_size_[d])
                                 for d in range(nsp))
                    _check_weight_sum(c[(slice(None), slice(None)) + kept], "roi_weight_map",
                                      [a0 - lo[d] if d == slab_dim else 0 for d in range(nsp)])
            sw_argmax(a, c, labels[b:b + 1].narrow(ax, z, n))
            a.zero_()
            c.zero_()
            z += n

    for b in range(batch_size):
        groups = {}
        for i in order:
            groups.setdefault(starts[i][slab_dim], []).append(i)
        # (slab start, window ids) per predictor call, in order
        plan = [(s, groups[s][j:j + sw_batch_size]) for s in sorted(groups)
                for j in range(0, len(groups[s]), sw_batch_size)]

        def coords_of(item, b=b):
            return [[slice(b, b + 1), slice(None)] + [slice(st, st + p) for st, p in zip(starts[i], patch)]
                    for i in item[1]]

        base = None
        # windows gathered batch by batch (the next one copied while this one is predicted when the
        # volume is on the CPU and the network on a GPU)
        for (s, batch), (_, win, _) in zip(plan, _window_batches(inputs, None, plan, coords_of, sw_device)):
            if base is not None and s > base:
                finalize(b, base, s)
            base = s
            with torch.no_grad():  # labels (an argmax) have no gradient: no graph per window
                pred = predictor(win, *args, **kwargs)
            if not isinstance(pred, Tensor):
                raise TypeError(f"predictor: must return one tensor (n, C, *roi), got {type(pred).__name__}")
            if pred.ndim != nsp + 2 or pred.shape[0] != len(batch) or tuple(pred.shape[2:]) != patch:
                raise ValueError(
                    f"predictor: returned shape {tuple(pred.shape)}; expected ({len(batch)}, C, *{patch})")
            pred = _real_pred(pred.to(device), "predictor", acc_dtype)
            if pred.shape[1] == 0:
                raise ValueError(f"predictor: returned {tuple(pred.shape)}, no channels: a label map needs at "
                                 "least one class")
            if acc is None:
                C = pred.shape[1]
                if labels is None:
                    ldt = labels_dtype or (torch.uint8 if C <= 256 else torch.int16 if C <= 32768 else torch.int32)
                    if C - 1 > torch.iinfo(ldt).max:
                        raise ValueError(f"labels_dtype: {ldt} cannot hold {C} class indices (the predictor "
                                         f"returned {C} channels)")
                    labels = torch.empty([batch_size, 1] + list(image_size), dtype=ldt, device=device)
                acc = zeros([1, C] + ring_shape, acc_dtype, device)
                count = torch.zeros([1, 1] + ring_shape, dtype=acc_dtype, device=device)
                if acc.device.type == "cpu":
                    chunk = R  # the CPU sw_argmax needs no temporaries
                else:  # on CUDA it is PyTorch's (acc / count).argmax: temporaries of at most ~256 MB a step
                    plane = math.prod(ring_shape) // R
                    chunk = max(1, min(R, (256 << 20) // max(1, C * plane * acc.element_size())))
            elif pred.shape[1] != acc.shape[1]:
                raise ValueError(f"predictor: returned {pred.shape[1]} channels, earlier {acc.shape[1]}")
            r0 = s % R
            n1 = min(patch[slab_dim], R - r0)
            for boff, soff, n in ((r0, 0, n1), (0, n1, patch[slab_dim] - n1)):
                if n <= 0:
                    continue
                st = [[0] + [boff if d == slab_dim else starts[i][d] for d in range(nsp)] for i in batch]
                st_t = torch.tensor(st, dtype=torch.int64)
                (g0, g1, g2), wm, wmp = weights_for(soff, n)
                sw_accumulate(acc, pred.narrow(ax, soff, n), st_t, g0, g1, g2, wm, wmp)
                sw_accumulate(count, None, st_t, g0, g1, g2, wm, wmp)  # the weight sum
        finalize(b, base, image_size[slab_dim])
    return _crop_padding(labels, pad_size, image_size_) if any(pad_size) else labels


# ------------------------------------------------------------------------------------------------
# nnU-Net mode


def nnunet_steps(image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float) -> list:
    """nnU-Net v2's tile starts per dimension: as few tiles as keep the step at most
    ``tile_step_size * tile``, spread evenly from 0 to ``image - tile`` (rounded)."""
    steps = []
    for i, t in zip(image_size, tile_size):
        n = int(math.ceil((i - t) / (t * tile_step_size))) + 1
        actual = (i - t) / (n - 1) if n > 1 else 99999999999
        steps.append([int(round(actual * k)) for k in range(n)])
    return steps


def nnunet_gaussian(tile_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10.0,
                    dtype: torch.dtype = torch.float16) -> Tensor:
    """nnU-Net v2's importance map: a unit impulse at the tile centre blurred by a Gaussian (sigma =
    sigma_scale x tile, kernel cut at 4 sigma, as scipy.ndimage.gaussian_filter), scaled to a maximum
    of ``value_scaling_factor``, cast to ``dtype``, zeros replaced by the smallest non-zero value."""
    m = None
    for d, t in enumerate(tile_size):
        sigma = t * sigma_scale
        r = int(4.0 * sigma + 0.5)
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        phi = torch.exp(-0.5 * x * x / (sigma * sigma))
        phi = phi / phi.sum()
        g = torch.zeros(t, dtype=torch.float64)
        c = t // 2
        for k in range(t):
            if abs(k - c) <= r:
                g[k] = phi[k - c + r]
        m = g if m is None else m.unsqueeze(-1) * g[(None,) * d]
    m = m / (m.max() / value_scaling_factor)
    m = m.to(dtype)
    zero = m == 0
    if zero.any():
        m[zero] = m[~zero].min()
    return m


def nnunet_sliding_window_inference(
    inputs: Tensor,
    network: Callable[[Tensor], Tensor],
    patch_size: Sequence[int],
    tile_step_size: float = 0.5,
    use_gaussian: bool = True,
    mirror_axes: Optional[Sequence[int]] = None,
    sw_batch_size: int = 1,
    accumulate_dtype: torch.dtype = torch.float32,
    device=None,
    sw_device=None,
    softmax: bool = False,
) -> Tensor:
    """nnU-Net v2's sliding-window prediction (``nnUNetPredictor.predict_sliding_window_return_logits``)
    with fastmed's stitching: its tile placement (``tile_step_size``), its Gaussian (sigma 1/8, scaled
    to 10, float16), zero padding of an image smaller than the patch, and mirroring test-time
    augmentation over ``mirror_axes`` (spatial axes, e.g. ``(0, 1, 2)``): every non-empty subset of
    the axes is predicted on the flipped input, and the flipped prediction is added into the output
    read backwards, never copied. ``inputs`` is (B, C, *spatial); returns (B, K, *spatial) logits in
    ``accumulate_dtype`` (nnU-Net accumulates in float16; float32 here by default); with ``softmax``
    the probabilities instead, computed inside the final normalisation.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor (B, C, *spatial), got {type(inputs).__name__}")
    nsp = inputs.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"inputs: expected (B, C, H, W) or (B, C, D, H, W), got shape {tuple(inputs.shape)}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"inputs: empty batch or no channels, got shape {tuple(inputs.shape)}")
    patch_size, sw_batch_size, tile_step_size = _plain(patch_size), _plain(sw_batch_size), _plain(tile_step_size)
    _check_sizes(patch_size, "patch_size")
    patch = tuple(int(p) for p in _tuple_rep(patch_size, nsp, "patch_size"))  # an int: the same on every axis
    if min(patch) < 1:
        raise ValueError(f"patch_size: expected {nsp} positive sizes, got {patch_size}")
    if isinstance(tile_step_size, bool) or not isinstance(tile_step_size, numbers.Real):
        raise TypeError(f"tile_step_size: expected a number in (0, 1], got {tile_step_size!r}")
    if not 0 < tile_step_size <= 1:
        raise ValueError(f"tile_step_size: must be in (0, 1], got {tile_step_size}")
    if any(tile_step_size * p < 1 and s > p for p, s in zip(patch, inputs.shape[2:])):
        raise ValueError(f"tile_step_size: {tile_step_size} of patch_size {patch} is a step of less than one voxel "
                         "(tiles would repeat; nnU-Net uses 0.5)")
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size: expected a positive int, got {sw_batch_size!r}")
    mirror_axes = _plain(mirror_axes)
    if mirror_axes is None:
        mirror_axes = ()
    elif not isinstance(mirror_axes, Sequence):
        mirror_axes = (mirror_axes,)  # one axis, e.g. 0
    if any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in mirror_axes):
        raise TypeError(f"mirror_axes: expected spatial axes as ints, got {mirror_axes!r}")
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    if any(a < 0 or a >= nsp for a in axes):
        raise ValueError(f"mirror_axes: spatial axes must be in [0, {nsp}), got {mirror_axes}")
    if accumulate_dtype not in FLOAT_DTYPES:
        raise TypeError(f"accumulate_dtype: expected a floating-point dtype, got {accumulate_dtype}")
    if type(inputs) is not Tensor:
        inputs = inputs.as_subclass(Tensor)
    device = _device_arg(device, "device", inputs.device)
    sw_device = _device_arg(sw_device, "sw_device", inputs.device)
    image_size_ = tuple(inputs.shape[2:])
    _, image_size, pad, inputs, _ = _pad_to_roi(inputs, None, patch, "constant", 0.0)  # nnU-Net: zeros
    steps = nnunet_steps(image_size, patch, tile_step_size)
    grids = torch.meshgrid(*[torch.tensor(s, dtype=torch.int64) for s in steps], indexing="ij")
    starts = torch.stack([g.reshape(-1) for g in grids], 1).tolist()
    combos = [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    if use_gaussian:
        wmap = nnunet_gaussian(patch).to(torch.float32)
    else:
        wmap = torch.ones(patch, dtype=torch.float32)
    # each of the len(combos) predictions carries 1/len(combos) of the window's weight; into a float16 /
    # bfloat16 output those products would underflow where the Gaussian is small (1e-7 at the tile's
    # corners), so there the predictions are averaged in float32 first and weighted once
    wpred = (wmap / len(combos)).to(device)
    narrow = torch.tensor([], dtype=accumulate_dtype).element_size() < 4 and len(combos) > 1
    wfull = wmap.to(device)
    fresh = _fresh_boxes(starts, patch)
    out = count = None
    plan = [list(range(j, min(j + sw_batch_size, len(starts)))) for j in range(0, len(starts), sw_batch_size)]
    for b in range(inputs.shape[0]):
        def coords_of(ids, b=b):
            return [(slice(b, b + 1), slice(None)) + tuple(slice(s, s + p) for s, p in zip(starts[i], patch))
                    for i in ids]

        # the next batch copied while this one is predicted (volume on the CPU, network on a GPU)
        for ids, (_, win, _) in zip(plan, _window_batches(inputs, None, plan, coords_of, sw_device)):
            st = torch.tensor([[b] + starts[i] for i in ids], dtype=torch.int64)
            avg = None
            for n, combo in enumerate(combos):
                dims = [2 + a for a in combo]
                with torch.no_grad():  # nnU-Net predicts under inference mode: no graph per window
                    pred = network(torch.flip(win, dims) if dims else win)
                if not isinstance(pred, Tensor) or pred.ndim != nsp + 2 or pred.shape[0] != len(ids) or \
                        tuple(pred.shape[2:]) != patch:
                    raise ValueError(f"network: expected a tensor ({len(ids)}, K, *{patch}), got "
                                     f"{tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__}")
                pred = _real_pred(pred.to(device), "network", accumulate_dtype)
                if out is None:
                    out = empty((inputs.shape[0], pred.shape[1]) + image_size, accumulate_dtype, device)
                elif pred.shape[1] != out.shape[1]:
                    raise ValueError(f"network: returned {pred.shape[1]} channels, earlier {out.shape[1]}")
                if pred.shape[1] == 0:  # no channels: the output is empty
                    continue
                flip = sum(1 << a for a in combo)
                if narrow:  # the mirrored predictions averaged in float32 first (read backwards, not copied)
                    if avg is None:
                        avg = torch.zeros(pred.shape, dtype=torch.promote_types(pred.dtype, torch.float32),
                                          device=device)
                        st0 = torch.tensor([[k] + [0] * nsp for k in range(len(ids))], dtype=torch.int64)
                    sw_accumulate(avg, pred, st0, None, None, None, 0.0, None, None, flip)
                    continue
                fr = torch.tensor([fresh[i] for i in ids]) if n == 0 else None
                sw_accumulate(out, pred, st, None, None, None, 0.0, wpred, fr, flip)
            if avg is not None:  # then weighted once, as nnU-Net weights its averaged prediction
                sw_accumulate(out, avg.div_(len(combos)), st, None, None, None, 0.0, wfull,
                              torch.tensor([fresh[i] for i in ids]))
    count = _Tiling.count_map(("nnunet", image_size, patch, tuple(map(tuple, starts)), use_gaussian, str(device),
                               accumulate_dtype), image_size, starts, None, 0.0, wmap, device, accumulate_dtype)
    if out.numel():
        sw_normalize_(out, count, softmax)
    return _crop_padding(out, pad, image_size_) if any(pad) else out


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


class SlidingWindowInfererAdapt(SlidingWindowInferer):
    """``monai.inferers.SlidingWindowInfererAdapt``: stitch on the GPU when the input is there, and on
    CUDA out-of-memory warn and stitch on the CPU instead (the network stays on the GPU; the output
    then comes back on the CPU), in MONAI's buffered mode unless ``buffer_steps <= 0``, halving the
    buffer on each further out-of-memory. The image size that failed is remembered (``cpu_thresh``),
    so the next image as large goes to the CPU directly. With ``device`` given, no adaptation is
    tried. The calls and their arguments follow MONAI 1.6's step for step (a CPU input runs unbuffered
    whatever ``buffer_steps`` says), so a stateful predictor sees the same windows in the same order.
    """

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any):
        if self.device is not None or "device" in kwargs:
            return super().__call__(inputs, network, *args, **kwargs)
        if not isinstance(inputs, Tensor) or inputs.ndim < 3:
            raise TypeError(f"inputs: expected a torch.Tensor (B, C, *spatial), got "
                            f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
        skip_buffer = self.buffer_steps is not None and self.buffer_steps <= 0
        numel = inputs.shape[2:].numel()
        cpu_cond = self.cpu_thresh is not None and numel > self.cpu_thresh
        gpu = inputs.is_cuda and not cpu_cond
        buffered = inputs.is_cuda and cpu_cond and not skip_buffer
        steps = max(1, self.buffer_steps) if self.buffer_steps is not None else 1
        sh = list(inputs.shape[2:])
        big = sh.index(max(sh))
        dim = big if inputs.shape[big + 2] / inputs.shape[-1] >= 2 else -1
        for _ in range(10):  # MONAI's number of tries
            try:
                return super().__call__(inputs, network, *args, device=inputs.device if gpu else torch.device("cpu"),
                                        buffer_steps=steps if buffered else None, buffer_dim=dim, **kwargs)
            except RuntimeError as e:
                if not (gpu or buffered) or not _is_oom(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if gpu:
                    gpu = False
                    self.cpu_thresh = numel - 1
                    buffered = not skip_buffer
                    if buffered:
                        self.buffer_steps = steps
                    warnings.warn(f"fastmed: out of GPU memory stitching {tuple(inputs.shape)} on {inputs.device}; "
                                  f"stitching on the CPU instead" + (f" (buffer {steps}, dim {dim})" if buffered else ""))
                elif steps > 1:
                    steps = max(1, steps // 2)
                    self.buffer_steps = steps
                    warnings.warn(f"fastmed: out of GPU memory in buffered stitching of {tuple(inputs.shape)}; "
                                  f"buffer reduced to {steps}")
                else:
                    buffered = False
                    warnings.warn(f"fastmed: out of GPU memory in buffered stitching of {tuple(inputs.shape)}; "
                                  "stitching on the CPU without a buffer")
        raise RuntimeError(f"SlidingWindowInfererAdapt: out of memory in every one of 10 tries on {tuple(inputs.shape)}")
