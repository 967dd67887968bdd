"""``fastmed::resample`` / ``fastmed::spline_prefilter``: resampling through a voxel-to-voxel affine.

``resample(src, theta, out_size, order, padding, ...)`` samples ``src`` (``(B, C, *spatial)``, 2D or
3D, uint8 / int8 / int16 / int32 / float16 / bfloat16 / float32 / float64) at the input voxel
coordinates ``theta @ (out_index, 1)`` -- ``theta`` is ``(ndim, ndim + 1)`` (shared) or
``(B, ndim, ndim + 1)``, in the spatial dims' order -- evaluated inside the kernel for every output
voxel: no sampling grid is ever made. ``order`` per spatial dim: 0 nearest, 1 linear, 3 cubic
B-spline (``src`` must then hold B-spline coefficients: :func:`spline_prefilter`). ``padding``:

* ``"zeros"``: taps outside the input are ``cval`` (``grid_sample`` zeros, scipy ``grid-constant``);
* ``"border"``: the nearest edge voxel (``grid_sample`` border, scipy ``nearest``);
* ``"reflect"``: half-sample symmetric (``grid_sample`` reflection with ``align_corners=False``,
  scipy ``reflect``);
* ``"mirror"``: whole-sample symmetric (``grid_sample`` reflection with ``align_corners=True``,
  scipy ``mirror``);
* ``"constant"``: scipy's ``constant``: points outside ``[0, n - 1]`` are ``cval``, taps mirror.

``out`` selects what is written: ``"values"`` (``(B, C, *out_size)`` in ``out_dtype``), ``"argmax"``
(``(B, 1, *out_size)`` integer labels: the argmax over channels of the interpolated values, in one
pass), ``"labels"`` (``src`` an integer label map with ``C == 1``: each label of ``labels`` is
interpolated as an indicator and the last one reaching 0.5 wins, else ``cval``, an integer
background label; nnU-Net's ``resize_segmentation`` for orders 0 and 1 without a one-hot tensor;
always computed in float64, so ties at exactly 0.5 fall as in float64).

``resample_reference`` is the same computation in plain PyTorch float64 (the tests' oracle).

Gradients: the values mode is differentiable in ``src`` (as MONAI's ``grid_sample`` path): the
backward adds each output voxel's gradient onto the input voxels it was sampled from, with the same
weights (``resample_adjoint``: float64, PyTorch's ``index_add_``, output rows in chunks). Not in
``theta`` (an affine built from headers), and not through the cubic B-spline prefilter, whose
backward raises.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext

__all__ = ["resample", "spline_prefilter", "resample_reference", "spline_prefilter_reference", "resample_adjoint",
           "PADDINGS", "OUT_MODES", "LABEL_DTYPES"]

PADDINGS = {"zeros": 0, "border": 1, "reflect": 2, "mirror": 3, "constant": 4}
OUT_MODES = {"values": 0, "argmax": 1, "labels": 2}
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
SRC_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32,
              torch.float64)


def _vec3(t: Tensor, lead: int):
    nsp = t.ndim - lead
    st, sz = list(t.stride()), list(t.shape)
    return st[:lead], [0] * (3 - nsp) + st[lead:], [1] * (3 - nsp) + sz[lead:]


def _theta3(theta: Tensor, nsp: int, B: int) -> Tensor:
    """(B or 1, 3, 4) float64: a 2D theta gets a depth row mapping to 0."""
    th = theta.to(dtype=torch.float64)
    if th.ndim == 2:
        th = th.unsqueeze(0)
    if nsp == 2:
        full = th.new_zeros((th.shape[0], 3, 4))
        full[:, 1:, 1:3] = th[:, :, :2]
        full[:, 1:, 3] = th[:, :, 2]
        th = full
    return th.contiguous()


@torch.library.custom_op("fastmed::resample", mutates_args=())
def _resample_op(
    src: Tensor,
    theta: Tensor,
    out_size: Sequence[int],
    order: Sequence[int],
    padding: int,
    cval: float,
    nearest_half_up: bool,
    out_dtype: torch.dtype,
    compute_f64: bool,
    out_mode: int,
    labels: Optional[Tensor],
    index_offset: float = 0.0,
) -> Tensor:
    B, C = src.shape[0], src.shape[1]
    oc = C if out_mode == 0 else 1
    out = torch.empty((B, oc, *out_size), dtype=out_dtype, device=src.device)
    if out.numel() == 0:
        return out
    if src.device.type == "cpu" and _ext.cpu is not None:
        _ext.cpu.advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    mod = _ext.require(src.device, "resample")
    with _device_guard(src.device):
        _launch_resample(mod, src, theta, out, order, padding, cval, nearest_half_up, compute_f64, out_mode, labels,
                         index_offset)
    return out


_device_guard = _ext.device_guard  # launch on the tensor's own GPU (its current stream)


def _launch_resample(mod, src, theta, out, order, padding, cval, nearest_half_up, compute_f64, out_mode, labels,
                     index_offset=0.0):
    nsp = src.ndim - 2
    B, C = src.shape[0], src.shape[1]
    p = mod.ResampleParams()
    p.B, p.C = B, C
    (p.s_sb, p.s_sc), p.s_s, p.in_size = _vec3(src, 2)
    (p.d_sb, p.d_sc), p.d_s, p.out_size = _vec3(out, 2)
    p.src, p.src_dtype = src.data_ptr(), _ext.DTYPE_CODES[src.dtype]
    p.dst, p.dst_dtype = out.data_ptr(), _ext.DTYPE_CODES[out.dtype]
    th = _theta3(theta, nsp, B).to(src.device)
    p.theta, p.theta_sb = th.data_ptr(), (12 if th.shape[0] > 1 else 0)
    p.order = [0] * (3 - nsp) + [int(o) for o in order]
    p.padding, p.cval, p.nearest_half_up = int(padding), float(cval), int(bool(nearest_half_up))
    p.compute_f64, p.out_mode = int(bool(compute_f64)), int(out_mode)
    p.index_offset = float(index_offset)
    keep = [th]
    if labels is not None:
        lab = labels.to(device=src.device, dtype=torch.int64).contiguous()
        keep.append(lab)
        p.labels, p.nlabels = lab.data_ptr(), lab.numel()
    p.num_threads = _ext.num_threads()
    p.stream = _ext.stream_ptr(src.device)
    mod.resample(p)
    del keep


@_resample_op.register_fake
def _(src, theta, out_size, order, padding, cval, nearest_half_up, out_dtype, compute_f64, out_mode, labels,
      index_offset=0.0):
    oc = src.shape[1] if out_mode == 0 else 1
    return src.new_empty((src.shape[0], oc, *out_size), dtype=out_dtype)


def _resample_setup(ctx, inputs, output):
    src, theta, out_size, order, padding, cval, nearest_half_up = inputs[:7]
    ctx.src_shape, ctx.src_dtype = tuple(src.shape), src.dtype
    ctx.args = (list(out_size), list(order), int(padding), bool(nearest_half_up), int(inputs[9]),
                float(inputs[11]) if len(inputs) > 11 else 0.0)
    ctx.save_for_backward(theta)


def _resample_backward(ctx, grad):
    """The gradient with respect to src of the values mode: the adjoint of the interpolation (each
    output voxel's gradient added back onto the input voxels it was sampled from, with the same
    weights), in float64, output rows in chunks of ~2M voxels. Integer outputs (argmax / labels)
    have none."""
    (theta,) = ctx.saved_tensors
    out_size, order, padding, half_up, out_mode, offset = ctx.args
    if grad is None or out_mode != 0 or not ctx.needs_input_grad[0]:
        return (None,) * 12
    g = resample_adjoint(grad, ctx.src_shape, theta, out_size, order, padding, half_up, offset)
    return (g.to(ctx.src_dtype),) + (None,) * 11


def resample_adjoint(grad: Tensor, src_shape, theta: Tensor, out_size, order, padding, half_up: bool = False,
                     index_offset: float = 0.0) -> Tensor:
    """``d(sum(resample(src) * grad)) / d src`` for the values mode: float64, shape ``src_shape``."""
    B, C = src_shape[0], src_shape[1]
    size = list(src_shape[2:])
    nsp = len(size)
    orders = _orders(order, nsp)
    pad = _padding_code(padding)
    dev = grad.device
    th = theta.to(device=dev, dtype=torch.float64)
    th = th.unsqueeze(0).expand(B, -1, -1) if th.ndim == 2 else th.expand(B, -1, -1)
    strides = [math.prod(size[d + 1:]) for d in range(nsp)]
    gsrc = torch.zeros((B, C, math.prod(size)), dtype=torch.float64, device=dev)
    rest = math.prod(out_size[1:])
    step = max(1, (1 << 21) // max(1, rest))
    tail = torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=dev) + index_offset for n in out_size[1:]],
                          indexing="ij")
    tail = [t.reshape(-1) for t in tail]
    for i0 in range(0, out_size[0], step):
        n0 = min(step, out_size[0] - i0)
        first = (torch.arange(i0, i0 + n0, dtype=torch.float64, device=dev) + index_offset).repeat_interleave(rest)
        hom = torch.stack([first] + [t.repeat(n0) for t in tail] + [torch.ones_like(first)], 0)  # (nsp+1, P)
        for b in range(B):
            coords = th[b] @ hom
            inside = None
            if pad == 4:  # scipy "constant": points outside [0, n - 1] take cval (no gradient)
                inside = torch.ones(coords.shape[1], dtype=torch.bool, device=dev)
                for d in range(nsp):
                    inside &= (coords[d] >= 0) & (coords[d] <= size[d] - 1)
            taps = [_taps(coords[d], orders[d], size[d], 3 if pad == 4 else pad, half_up) for d in range(nsp)]
            gb = grad[b].reshape(C, -1)[:, i0 * rest:(i0 + n0) * rest].to(torch.float64)
            combos = [[]]
            for d in range(nsp):
                combos = [c + [t] for c in combos for t in taps[d]]
            for combo in combos:
                idx = sum(t[0] * st for t, st in zip(combo, strides))
                w = math.prod(t[1] for t in combo)
                ok = torch.stack([t[2] for t in combo]).all(0)
                if inside is not None:
                    ok &= inside
                gsrc[b].index_add_(1, idx, gb * torch.where(ok, w, torch.zeros_like(w)))
    return gsrc.view(B, C, *size)


_resample_op.register_autograd(_resample_backward, setup_context=_resample_setup)


@torch.library.custom_op("fastmed::spline_prefilter", mutates_args=())
def _prefilter_op(x: Tensor, dims: Sequence[int], boundary: int) -> Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    mod = _ext.require(x.device, "spline_prefilter")
    nsp = x.ndim - 2
    flat = out.view(-1, *out.shape[2:])
    with _device_guard(x.device):
        _launch_prefilter(mod, flat, dims, boundary, nsp, x.device)
    return out


def _launch_prefilter(mod, flat, dims, boundary, nsp, device):
    for d in dims:
        p = mod.SplineFilterParams()
        p.data, p.dtype = flat.data_ptr(), _ext.DTYPE_CODES[flat.dtype]
        p.lines, p.l_s = flat.shape[0], flat.stride(0)
        _, p.s, p.size = _vec3(flat, 1)
        p.dim, p.boundary = 3 - nsp + int(d), int(boundary)
        p.num_threads = _ext.num_threads()
        p.stream = _ext.stream_ptr(device)
        mod.spline_prefilter(p)


@_prefilter_op.register_fake
def _(x, dims, boundary):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _prefilter_backward(ctx, grad):
    raise NotImplementedError(
        "fastmed: no gradient through the cubic B-spline prefilter (spline order 3 with prefilter): "
        "resample with order 0 or 1 (MONAI 'nearest' / 'bilinear') where a gradient is needed")


_prefilter_op.register_autograd(_prefilter_backward, setup_context=lambda ctx, inputs, output: None)


def _padding_code(padding) -> int:
    if isinstance(padding, int) and padding in PADDINGS.values():
        return padding
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {sorted(PADDINGS)}, got {padding!r}")
    return PADDINGS[padding]


def _orders(order, nsp: int) -> list:
    orders = [int(order)] * nsp if isinstance(order, int) else [int(o) for o in order]
    if len(orders) != nsp or any(o not in (0, 1, 3) for o in orders):
        raise ValueError(f"order must be 0, 1 or 3 per spatial dim ({nsp}), got {order!r}")
    return orders


def _check(src: Tensor, theta: Tensor, out_size, nsp_allowed=(2, 3)) -> int:
    if not isinstance(src, Tensor):
        raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
    nsp = src.ndim - 2
    if nsp not in nsp_allowed:
        raise ValueError(f"src must be (B, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(src.shape)}")
    if src.dtype not in SRC_DTYPES:
        raise TypeError(f"src dtype {src.dtype} is not supported (one of {SRC_DTYPES})")
    if not isinstance(theta, Tensor) or theta.shape[-2:] != (nsp, nsp + 1) or theta.ndim not in (2, 3) or (
            theta.ndim == 3 and theta.shape[0] not in (1, src.shape[0])):
        raise ValueError(f"theta must be ({nsp}, {nsp + 1}) or (B, {nsp}, {nsp + 1}), got "
                         f"{tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__}")
    if not torch.compiler.is_compiling() and not torch.isfinite(theta).all():  # (data-dependent)
        raise ValueError("theta must be finite")
    if len(out_size) != nsp or any(int(s) != s or int(s) < 0 for s in out_size):
        raise ValueError(f"out_size must be {nsp} non-negative sizes, got {tuple(out_size)}")
    if min(src.shape[2:], default=1) < 1:
        raise ValueError(f"src must not be empty along a spatial dim, got shape {tuple(src.shape)}")
    return nsp


def resample(src: Tensor, theta: Tensor, out_size: Sequence[int], order=1, padding="zeros", cval: float = 0.0,
             nearest_half_up: bool = False, out_dtype: Optional[torch.dtype] = None, compute_dtype=torch.float32,
             out: str = "values", labels: Optional[Sequence[int]] = None, prefilter: bool = True,
             index_offset: float = 0.0) -> Tensor:
    """Sample ``src`` at ``theta @ (out_index + index_offset, 1)``; see the module docstring.
    ``index_offset`` 0.5 with ``theta`` = (scale, -0.5) per dim is scipy's ``zoom(grid_mode=True)``
    (skimage's resize, nnU-Net) coordinate ``(i + 0.5) * scale - 0.5`` rounded as scipy rounds it. ``out_dtype`` defaults to
    ``src``'s floating dtype (float32 for integer input) for values, uint8/int16 (by label range) for
    argmax and ``src``'s dtype for labels. ``compute_dtype`` float32 or float64. With ``prefilter``
    (as scipy's), dims of order 3 are sampled from B-spline coefficients computed here the way
    ``scipy.ndimage.map_coordinates`` computes them (border and zeros padding first extend every
    cubic dim by 12 voxels, as scipy does); ``prefilter=False`` takes ``src`` as coefficients."""
    nsp = _check(src, theta, out_size)
    orders = _orders(order, nsp)
    pad = _padding_code(padding)
    if src.shape[1] < 1:
        raise ValueError(f"src must have at least one channel, got shape {tuple(src.shape)}")
    if out_dtype is not None and out_dtype not in _ext.DTYPE_CODES:
        raise TypeError(f"out_dtype {out_dtype} is not supported (one of {sorted(map(str, _ext.DTYPE_CODES))})")
    if out not in OUT_MODES:
        raise ValueError(f"out must be one of {sorted(OUT_MODES)}, got {out!r}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if not math.isfinite(float(cval)):
        raise ValueError(f"cval must be finite, got {cval}")
    lab = None
    if out == "values":
        if out_dtype is None:
            out_dtype = src.dtype if src.is_floating_point() else torch.float32
    elif out == "argmax":
        if out_dtype is None:
            out_dtype = torch.uint8 if src.shape[1] <= 256 else torch.int16
        if out_dtype not in LABEL_DTYPES:
            raise TypeError(f"out_dtype must be an integer dtype for out='argmax', got {out_dtype}")
        if src.shape[1] > torch.iinfo(out_dtype).max + 1:
            raise ValueError(f"out_dtype {out_dtype} cannot hold {src.shape[1]} class indices")
    else:
        if src.is_floating_point() or src.shape[1] != 1:
            raise ValueError("out='labels' needs an integer label map src with one channel")
        if 3 in orders:
            raise NotImplementedError("out='labels' with order 3: the indicators would need a prefilter each; "
                                      "interpolate each label's indicator with out='values' instead")
        if labels is None:
            labels = torch.unique(src).tolist()
        lab = torch.as_tensor(list(labels), dtype=torch.int64)
        out_dtype = out_dtype or src.dtype
        if out_dtype not in LABEL_DTYPES:
            raise TypeError(f"out_dtype must be an integer dtype for out='labels', got {out_dtype}")
        info = torch.iinfo(out_dtype)
        if lab.numel() == 0:
            raise ValueError("labels must not be empty")
        if int(lab.min()) < info.min or int(lab.max()) > info.max:
            raise ValueError(f"labels must fit out_dtype {out_dtype}, got {lab.tolist()}")
        if float(cval) != int(cval) or not info.min <= int(cval) <= info.max:
            raise ValueError(f"cval is the background label for out='labels': an integer that fits {out_dtype}, "
                             f"got {cval}")
    theta = theta.detach()
    if prefilter and out != "labels" and 3 in orders:
        src, theta = _spline_coefficients(src, theta, orders, pad, float(cval), compute_dtype)
    # label sums are often exactly 0.5 (upsampling by 2, cubic taps at integer coordinates): float64
    # decides those ties as the reference (and nnU-Net's float64 masks) do
    f64 = compute_dtype == torch.float64 or out == "labels"
    if not math.isfinite(float(index_offset)):
        raise ValueError(f"index_offset must be finite, got {index_offset}")
    return _resample_op(src, theta, [int(s) for s in out_size], orders, pad, float(cval),
                        bool(nearest_half_up), out_dtype, f64, OUT_MODES[out], lab, float(index_offset))


_SPLINE_PAD = 12  # scipy's extension before prefiltering with border / zeros padding


def _spline_coefficients(src: Tensor, theta: Tensor, orders, pad: int, cval: float, compute_dtype,
                         reference: bool = False):
    """(coefficients, theta) for the order-3 dims, as scipy.ndimage prepares them (``reference``: with
    the float64 prefilter, for builds without the kernel)."""
    nsp = src.ndim - 2
    # scipy extends every cubic dim (a size-1 one too) before prefiltering for border / zeros
    extend = pad in (PADDINGS["zeros"], PADDINGS["border"])
    dims = [d for d in range(nsp) if orders[d] == 3 and (extend or src.shape[2 + d] > 1)]
    if not dims:
        return src, theta
    x = src.to(torch.float64 if compute_dtype == torch.float64 or src.dtype == torch.float64 else torch.float32)
    if pad in (PADDINGS["zeros"], PADDINGS["border"]):
        widths = []
        for d in reversed(range(nsp)):
            widths += [_SPLINE_PAD, _SPLINE_PAD] if d in dims else [0, 0]
        if pad == PADDINGS["border"]:
            x = torch.nn.functional.pad(x, widths, mode="replicate")
        else:
            x = torch.nn.functional.pad(x, widths, mode="constant", value=cval)
        theta = theta.to(torch.float64).clone()
        for d in dims:
            theta[..., d, -1] += _SPLINE_PAD
    boundary = "reflect" if pad == PADDINGS["reflect"] else "mirror"
    if reference:
        fdims = [d for d in dims if x.shape[2 + d] > 1]
        return spline_prefilter_reference(x, fdims, boundary).to(x.dtype), theta
    return spline_prefilter(x, dims, boundary), theta


def spline_prefilter(x: Tensor, dims: Optional[Sequence[int]] = None, boundary: str = "mirror") -> Tensor:
    """Cubic B-spline coefficients of ``x`` (``(B, C, *spatial)`` float32/float64; other dtypes are
    converted to float32) along ``dims`` (spatial dim indices; default all), with the whole-sample
    ``"mirror"`` or half-sample ``"reflect"`` boundary (scipy's ``spline_filter`` modes)."""
    nsp = x.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"x must be (B, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(x.shape)}")
    if boundary not in ("mirror", "reflect"):
        raise ValueError(f"boundary must be 'mirror' or 'reflect', got {boundary!r}")
    dims = list(range(nsp)) if dims is None else [int(d) for d in dims]
    if any(d < 0 or d >= nsp for d in dims):
        raise ValueError(f"dims must be spatial dim indices in [0, {nsp}), got {dims}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    dims = [d for d in dims if x.shape[2 + d] > 1]
    if not dims:
        return x.clone(memory_format=torch.contiguous_format)
    return _prefilter_op(x, dims, PADDINGS[boundary])


# ------------------------------------------------------------------------------------------------
# float64 reference (plain PyTorch; small inputs only)


def _extend(idx: Tensor, n: int, pad: int):
    """(index inside [0, n), valid mask) for integer taps under a padding mode."""
    if pad in (0,):
        valid = (idx >= 0) & (idx < n)
        return idx.clamp(0, n - 1), valid
    if pad == 1:
        return idx.clamp(0, n - 1), torch.ones_like(idx, dtype=torch.bool)
    if pad == 2:  # half-sample symmetric, period 2n
        m = torch.remainder(idx, 2 * n)
        return torch.where(m >= n, 2 * n - 1 - m, m), torch.ones_like(idx, dtype=torch.bool)
    # whole-sample symmetric, period 2n - 2
    if n == 1:
        return torch.zeros_like(idx), torch.ones_like(idx, dtype=torch.bool)
    m = torch.remainder(idx, 2 * n - 2)
    return torch.where(m >= n, 2 * n - 2 - m, m), torch.ones_like(idx, dtype=torch.bool)


def _fold(c: Tensor, n: int, pad: int) -> Tensor:
    """Coordinates outside the input folded into it by a reflecting padding (2: about -0.5 and
    n - 0.5; 3, 4: about 0 and n - 1), as the kernels' fold_coord."""
    if pad == 2:
        m = torch.remainder(c + 0.5, 2.0 * n)
        m = torch.where(m > n, 2.0 * n - m, m) - 0.5
        return torch.where((c >= -0.5) & (c <= n - 0.5), c, m)
    if pad in (3, 4):
        if n == 1:
            return torch.zeros_like(c)
        per = 2.0 * (n - 1)
        m = torch.remainder(c, per)  # above the input folded from n on, as scipy (see fold_coord)
        m = torch.where((c < 0) & (m > n - 1) | (c > 0) & (m >= n), per - m, m)
        return torch.where((c >= 0) & (c <= n - 1), c, m)
    return c


def _bspline3(t: Tensor) -> Tensor:
    a = t.abs()
    return torch.where(a < 1, 2.0 / 3 - a * a + a ** 3 / 2, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def _taps(c: Tensor, order: int, n: int, pad: int, half_up: bool):
    """For coordinates c (any shape): list of (index, weight, valid) taps along one dim."""
    if order == 0:  # a reflecting padding folds the coordinate before rounding (see fold_coord)
        c = _fold(c, n, pad)
        r = torch.floor(c + 0.5) if half_up else torch.round(c)
        i, v = _extend(r.long(), n, pad)
        return [(i, torch.ones_like(c), v)]
    if order == 1:
        f = torch.floor(c)
        t = c - f
        out = []
        for k, w in ((0, 1 - t), (1, t)):
            i, v = _extend(f.long() + k, n, pad)
            out.append((i, w, v))
        return out
    f = torch.floor(c)
    out = []
    for k in (-1, 0, 1, 2):
        i, v = _extend(f.long() + k, n, pad)
        out.append((i, _bspline3(c - (f + k)), v))
    return out


def resample_reference(src: Tensor, theta: Tensor, out_size: Sequence[int], order=1, padding="zeros",
                       cval: float = 0.0, nearest_half_up: bool = False, out: str = "values",
                       labels: Optional[Sequence[int]] = None, index_offset: float = 0.0) -> Tensor:
    """float64 version of :func:`resample` (values as float64; argmax/labels as int64)."""
    nsp = src.ndim - 2
    orders = _orders(order, nsp)
    pad = _padding_code(padding)
    B, C = src.shape[:2]
    size = list(src.shape[2:])
    th = theta.to(torch.float64)
    th = th.unsqueeze(0).expand(B, -1, -1) if th.ndim == 2 else th.expand(B, -1, -1)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) + index_offset for s in out_size], indexing="ij")
    hom = torch.stack([*grids, torch.ones_like(grids[0])], 0).reshape(nsp + 1, -1)  # (nsp+1, P)
    res = []
    for b in range(B):
        coords = th[b] @ hom  # (nsp, P)
        inside = torch.ones(coords.shape[1], dtype=torch.bool)
        if pad == 4:
            for d in range(nsp):
                inside &= (coords[d] >= 0) & (coords[d] <= size[d] - 1)
        taps = [_taps(coords[d], orders[d], size[d], 3 if pad == 4 else pad, nearest_half_up) for d in range(nsp)]
        flat_src = src[b].reshape(C, -1)
        if out == "labels":
            flat_src = flat_src.long()
        else:
            flat_src = flat_src.to(torch.float64)
        strides = [math.prod(size[d + 1:]) for d in range(nsp)]
        combos = [[]]
        for d in range(nsp):
            combos = [c + [t] for c in combos for t in taps[d]]
        if out == "labels":
            lab = torch.unique(src).tolist() if labels is None else list(labels)
            result = torch.full((coords.shape[1],), int(cval), dtype=torch.int64)
            for l in lab:
                acc = torch.zeros(coords.shape[1], dtype=torch.float64)
                for combo in combos:
                    idx = sum(t[0] * s for t, s in zip(combo, strides))
                    w = math.prod(t[1] for t in combo) if nsp else 1
                    valid = torch.stack([t[2] for t in combo]).all(0)
                    ind = (flat_src[0][idx] == l).to(torch.float64)
                    acc += w * torch.where(valid, ind, torch.full_like(ind, float(cval == l)))
                acc = torch.where(inside, acc, torch.full_like(acc, float(cval == l)))
                result = torch.where(acc >= 0.5, torch.full_like(result, l), result)
            res.append(result.view(1, *out_size))
            continue
        acc = torch.zeros(C, coords.shape[1], dtype=torch.float64)
        for combo in combos:
            idx = sum(t[0] * s for t, s in zip(combo, strides))
            w = math.prod(t[1] for t in combo)
            valid = torch.stack([t[2] for t in combo]).all(0)
            vals = torch.where(valid, flat_src[:, idx], torch.full_like(flat_src[:, idx], float(cval)))
            acc += w * vals
        acc = torch.where(inside, acc, torch.full_like(acc, float(cval)))
        if out == "argmax":
            res.append(acc.argmax(0).view(1, *out_size))
        else:
            res.append(acc.view(C, *out_size))
    return torch.stack(res, 0)


def spline_prefilter_reference(x: Tensor, dims: Optional[Sequence[int]] = None, boundary: str = "mirror") -> Tensor:
    """float64 B-spline coefficients by solving the interpolation system exactly along each dim:
    sum_j c[ext(j)] * beta3(i - j) = x[i] with the boundary's symmetric extension."""
    nsp = x.ndim - 2
    dims = list(range(nsp)) if dims is None else list(dims)
    y = x.to(torch.float64)
    pad = PADDINGS[boundary]
    for d in dims:
        n = y.shape[2 + d]
        if n == 1:
            continue
        m = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for k, w in ((-1, 1.0 / 6), (0, 4.0 / 6), (1, 1.0 / 6)):
                j, _ = _extend(torch.tensor(i + k), n, pad)
                m[i, int(j)] += w
        inv = torch.linalg.inv(m)
        y = torch.movedim(torch.movedim(y, 2 + d, -1) @ inv.T, -1, 2 + d)
    return y
