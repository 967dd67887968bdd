"""Resampling transforms: MONAI's ``Spacing`` / ``Spacingd``, nnU-Net's resampling, logits to labels.

Every function here works out *where* to sample (a voxel-to-voxel affine ``theta`` that maps an
output voxel index to an input voxel index, in the tensor's dim order) and hands the sampling to
the ``fastmed::resample`` op, which evaluates ``theta`` per output voxel inside the kernel: no
sampling grid, no one-hot tensor, no float64 copy of the volume is ever made.

* :func:`resample_to_spacing`, :class:`Spacing`, :class:`Spacingd`: drop-ins for MONAI 1.6's
  ``Spacing`` / ``Spacingd`` (same constructor arguments, defaults, output shape, affine and
  values). ``mode`` "nearest"/"bilinear" reproduce MONAI's ``torch.nn.functional.grid_sample``
  path, integer ``mode`` 0/1/3 its ``scipy.ndimage.map_coordinates`` path (with scipy's padding
  modes and spline prefilter). Not supported, with a clear error: ``mode="bicubic"`` (grid_sample's
  Keys cubic convolution, a = -0.75, which the kernel does not implement), spline orders 2, 4, 5,
  the ``wrap``/``grid-wrap`` scipy modes for integer orders, and lazy resampling. Their outputs
  carry MONAI's transform trace, and ``inverse`` (theirs, or MONAI's ``Compose.inverse`` /
  ``Invertd``) resamples back as MONAI's.
* :func:`resample_nnunet`: nnU-Net v2's ``resample_data_or_seg_to_spacing`` / ``..._to_shape``
  (skimage ``resize`` with ``mode="edge"``, no anti-aliasing, clipping to the input range; the
  separate-z scheme for anisotropic spacings; ``resize_segmentation`` for label maps) in one pass
  of the kernel where the scheme allows it.
* :func:`resample_argmax`: resample C-channel logits/probabilities and write the argmax label map
  (uint8/int16) in one pass; equal to resampling then ``argmax(dim=channel)``.

Bad arguments (non-finite pixdim or spacing, singular or non-finite affines, wrong dims or channel
counts, an output beyond ``memory_limit``) raise ``ValueError``/``TypeError`` naming the argument
(:class:`MemoryLimitError`, a ``MemoryError`` and ``ValueError``, for the memory limit).
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import _ext
from .ops import resample as _R

__all__ = [
    "resample_to_spacing", "Spacing", "Spacingd", "resample_nnunet", "resample_argmax", "MemoryLimitError",
    "spacing_geometry", "nnunet_new_shape", "nnunet_separate_z", "affine_transform",
]

AFFINE_TOL = 1e-3  # MONAI's tolerance for "same affine" / "same spacing" decisions
_SCIPY_MODES = ("reflect", "grid-mirror", "constant", "grid-constant", "nearest", "mirror", "grid-wrap", "wrap")
_GS_PAD_MODES = ("zeros", "border", "reflection")
_INTERP_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")
_SCIPY_PREPAD = 12  # scipy pre-pads by 12 voxels before the spline prefilter for 'nearest'/'grid-constant'
# how the op (resample(prefilter=True)) prepares order-3 coefficients per padding: (pre-padding, boundary)
_OP_PREFILTER = {"zeros": ("constant", "mirror"), "border": ("replicate", "mirror"), "reflect": (None, "reflect"),
                 "mirror": (None, "mirror"), "constant": (None, "mirror")}


class MemoryLimitError(MemoryError, ValueError):
    """The result (plus workspace) would need more bytes than ``memory_limit`` allows."""


# ------------------------------------------------------------------------------------------------
# small helpers


def _val(x):
    """An enum's value (MONAI passes StrEnums), else x."""
    return getattr(x, "value", x)


def _torch_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
    except TypeError as exc:
        raise TypeError(f"dtype: {dtype!r} is not a numpy or torch dtype") from exc


def _as_affine(affine, name: str = "affine") -> np.ndarray:
    a = affine.detach().cpu().numpy() if isinstance(affine, Tensor) else np.asarray(affine)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name} must be a numeric matrix, got {type(affine).__name__}")
    a = a.astype(np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"{name} must be a square (r+1)x(r+1) matrix, got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got {a.tolist()}")
    return a


def _check_invertible(a: np.ndarray, name: str) -> None:
    lin = a[:-1, :-1]
    s = np.linalg.svd(lin, compute_uv=False)
    if s.min() <= s.max() * 1e-12 or s.max() == 0:
        raise ValueError(f"{name} is singular (its {len(lin)}x{len(lin)} linear part has singular values "
                         f"{s.tolist()}); a voxel-to-world affine must be invertible")


def _to_affine_nd(r: int, affine: np.ndarray) -> np.ndarray:
    """MONAI's ``to_affine_nd`` with an integer rank: the top-left kxk block and the translation of
    ``affine`` in an (r+1)x(r+1) identity, k = max(min(r, len(affine) - 1), 1)."""
    out = np.eye(r + 1, dtype=np.float64)
    d = max(min(r, len(affine) - 1), 1)
    out[:d, :d] = affine[:d, :d]
    if d > 1:
        out[:d, -1] = affine[:d, -1]
    return out


def _embed_affine(full: np.ndarray, small: np.ndarray) -> np.ndarray:
    """MONAI's ``to_affine_nd(full, small)`` for the shapes used here: ``small`` placed in an identity
    of ``full``'s size."""
    return _to_affine_nd(len(full) - 1, small)


def _affine_to_spacing(affine: np.ndarray, r: int) -> np.ndarray:
    sp = np.sqrt(np.sum(affine[:r, :r] * affine[:r, :r], axis=0))
    sp[sp == 0] = 1.0
    return sp


def _zoom_affine(affine: np.ndarray, scale: np.ndarray, diagonal: bool) -> np.ndarray:
    """The (r+1)x(r+1) affine with column norms ``scale`` (non-positive entries: the input's spacing),
    keeping the input's rotation and axis signs (``diagonal=False``) or axis-aligned (``True``);
    zero translation. Same as MONAI's ``zoom_affine``."""
    d = len(affine) - 1
    norm = _affine_to_spacing(affine, d)
    s = np.asarray(scale, dtype=np.float64)
    if len(s) < d:
        s = np.append(s, norm[len(s):])
    s = np.array([u if u > 0 else v for u, v in zip(s[:d], norm)], dtype=np.float64)
    if diagonal:
        return np.diag(np.append(s, 1.0))
    rzs = affine[:-1, :-1]
    try:
        zs = np.linalg.cholesky(rzs.T @ rzs).T
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"affine is singular, cannot take its rotation: {affine.tolist()}") from exc
    rotation = rzs @ np.linalg.inv(zs)
    out = np.eye(d + 1)
    out[:-1, :-1] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(s))
    return out


def _compute_shape_offset(shape, in_affine: np.ndarray, out_affine: np.ndarray, scale_extent: bool):
    """Output shape and world offset covering the input's field of view (MONAI's
    ``compute_shape_offset``: corner-to-corner extent rounded half to even, the offset put on the
    input corner that is smallest in output voxel coordinates, else centred)."""
    shape = np.array(tuple(shape), dtype=np.float64)
    sr = len(shape)
    ia, oa = _to_affine_nd(sr, in_affine), _to_affine_nd(sr, out_affine)
    in_coords = [(-0.5, n - 0.5) if scale_extent else (0.0, n - 1.0) for n in shape]
    corners = np.asarray(np.meshgrid(*in_coords, indexing="ij")).reshape((sr, -1))
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    try:
        corners_out = np.linalg.solve(oa, ia) @ corners
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"the output affine {oa.tolist()} is not invertible") from exc
    corners = ia @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    ext = np.ptp(corners_out, axis=1)
    out_shape = np.round(ext) if scale_extent else np.round(ext + 1.0)
    if not (np.isfinite(out_shape).all() and (np.abs(out_shape) < 2.0 ** 62).all()):
        raise ValueError(f"pixdim: the output would have {out_shape.tolist()} voxels per dim for input shape "
                         f"{tuple(int(n) for n in shape)}: a spacing that small cannot be sampled")
    offset = None
    for i in range(corners.shape[1]):
        min_corner = np.min(all_dist - all_dist[:, i:i + 1], 1)
        if np.allclose(min_corner, 0.0, rtol=AFFINE_TOL):
            offset = corners[:-1, i]
            break
    if offset is None:
        offset = ia[:-1, :-1] @ (shape / 2.0) + ia[:-1, -1] - oa[:-1, :-1] @ (out_shape / 2.0)
    if scale_extent:
        with np.errstate(divide="ignore", invalid="ignore"):
            in_offset = np.append(0.5 * (shape / out_shape - 1.0), 1.0)
            offset = np.abs((ia @ in_offset / in_offset[-1])[:-1]) * np.sign(offset)
    return out_shape.astype(int), offset


def _scale_affine(old_shape, new_shape, align_corners: bool) -> np.ndarray:
    """MONAI's ``scale_affine(old, new, centered=True, align_corners)`` (what ``recompute_affine``
    writes as the output affine)."""
    r = len(new_shape)
    if align_corners:
        s = [0.0 if float(n) == 1 else (float(o) - 1) / (float(n) - 1) for o, n in zip(old_shape, new_shape)]
    else:
        s = [float(o) / float(max(n, 1)) for o, n in zip(old_shape, new_shape)]
    out = np.diag(np.append(np.asarray(s, dtype=np.float64), 1.0))
    if not align_corners:
        out[:r, -1] = (np.asarray(s) - 1) / 2.0
    return out


def _vec(x, name: str) -> np.ndarray:
    """A float64 vector from a scalar / sequence / None (None -> [nan], as MONAI's ``ensure_tuple``)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if x is None:
        return np.array([np.nan])
    try:
        v = np.array(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {x!r}") from exc
    if v.size == 0:
        raise ValueError(f"{name} must not be empty")
    return v


def _none_nan(x):
    """None entries of a sequence as NaN (MONAI's ``ensure_tuple`` + float64 array)."""
    return [np.nan if v is None else v for v in x] if isinstance(x, (list, tuple)) else x


def _pixdim_vec(pixdim) -> np.ndarray:
    """pixdim as a float64 vector: None entries NaN (the input's spacing, MONAI's rule); infinite
    entries refused."""
    pix = _vec(_none_nan(pixdim), "pixdim")
    if np.isinf(pix).any():
        raise ValueError(f"pixdim must not be infinite (entries <= 0 or None keep the input spacing), got {pixdim!r}")
    return pix


def spacing_geometry(spatial_shape: Sequence[int], affine, pixdim, diagonal: bool = False, scale_extent: bool = False,
                     min_pixdim=None, max_pixdim=None):
    """What MONAI's ``Spacing`` computes before it samples: ``(src_affine, dst_affine, out_shape)``,
    the input and output voxel-to-world affines as (r+1)x(r+1) float64 arrays (r = len(spatial_shape))
    and the output spatial shape. ``pixdim`` entries <= 0, None or NaN keep the input's spacing
    (MONAI's rule); infinite entries are refused."""
    sr = len(spatial_shape)
    a = _as_affine(affine)
    pix = _pixdim_vec(pixdim)
    mn_all, mx_all = _vec(min_pixdim, "min_pixdim"), _vec(max_pixdim, "max_pixdim")
    affine_ = _to_affine_nd(sr, a)
    _check_invertible(affine_, "affine")
    out_d = pix[:sr].copy()
    if out_d.size < sr:
        out_d = np.append(out_d, [out_d[-1]] * (sr - out_d.size))
    orig_d = _affine_to_spacing(affine_, sr)
    for idx, (d0, mn, mx) in enumerate(zip_longest(orig_d, mn_all[:sr], mx_all[:sr], fillvalue=np.nan)):
        target = out_d[idx]
        mn = target if np.isnan(mn) else min(mn, target)
        mx = target if np.isnan(mx) else max(mx, target)
        if mn > mx:
            raise ValueError(f"min_pixdim is larger than max_pixdim at dim {idx}: min {mn} max {mx} out {target}.")
        out_d[idx] = d0 if (mn - AFFINE_TOL) <= d0 <= (mx + AFFINE_TOL) else target
    new_affine = _zoom_affine(affine_, out_d, diagonal)
    out_shape, offset = _compute_shape_offset(spatial_shape, affine_, new_affine, scale_extent)
    new_affine[:sr, -1] = offset[:sr]
    return affine_, new_affine, [int(s) for s in out_shape]


# ------------------------------------------------------------------------------------------------
# sampling plans: how a MONAI / scipy / nnU-Net mode maps onto the op


@dataclass
class _Plan:
    orders: list                 # per spatial dim, 0 / 1 / 3
    padding: str                 # the op's padding name
    half_up: bool                # order 0 rounds half up (scipy) instead of half to even (grid_sample)
    boundary: Optional[str] = None   # spline prefilter boundary ("mirror"/"reflect") when an order is 3
    prepad: Optional[str] = None     # scipy's 12-voxel pre-padding before the prefilter: "replicate"/"constant"
    cval: float = 0.0
    backend: str = "torch"       # "torch" (grid_sample semantics) or "scipy"
    index_offset: float = 0.0    # 0.5: coordinates (i + 0.5) * scale - 0.5 as scipy's zoom(grid_mode) rounds them


def _scipy_plan(order: int, padding_mode, nsp: int) -> _Plan:
    """map_coordinates(order, mode) semantics (MONAI's integer modes, nnU-Net)."""
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"mode: spline order must be 0-5, got {order!r}")
    if order in (2, 4, 5):
        raise NotImplementedError(f"mode: spline order {order} is not supported by fastmed's resample kernel "
                                  "(orders 0, 1 and 3 are); use mode=3 or MONAI for this order")
    pm = _val(padding_mode)
    pm = pm.strip() if isinstance(pm, str) else pm
    pm = {"zeros": "constant", "border": "nearest", "reflection": "reflect"}.get(pm, pm)
    if pm not in _SCIPY_MODES:
        raise ValueError(f"padding_mode: {padding_mode!r} is not a valid mode for integer (spline) modes; "
                         f"use one of {list(_SCIPY_MODES)} or zeros/border/reflection")
    if pm in ("wrap", "grid-wrap"):
        raise NotImplementedError(f"padding_mode: {pm!r} (periodic) is not supported by fastmed's resample kernel")
    padding, boundary, prepad = {
        "constant": ("constant", "mirror", None),
        "grid-constant": ("zeros", "mirror", "constant"),
        "nearest": ("border", "mirror", "replicate"),
        "reflect": ("reflect", "reflect", None),
        "grid-mirror": ("reflect", "reflect", None),
        "mirror": ("mirror", "mirror", None),
    }[pm]
    return _Plan([order] * nsp, padding, True, boundary if order == 3 else None, prepad if order == 3 else None,
                 backend="scipy")


def _monai_plan(mode, padding_mode, align_corners: bool, nsp: int) -> _Plan:
    """How MONAI's ``spatial_resample`` samples for ``mode`` / ``padding_mode``."""
    if isinstance(mode, bool):
        raise ValueError(f"mode: expected 'nearest', 'bilinear' or a spline order 0-5, got {mode!r}")
    if isinstance(mode, int):
        return _scipy_plan(mode, padding_mode, nsp)
    m = _val(mode)
    m = m.strip() if isinstance(m, str) else str(m)
    if m not in _INTERP_MODES:
        m = {"0": "nearest-exact", "1": "linear", "3": "bicubic"}.get(m, m)
    if m not in _INTERP_MODES:
        raise ValueError(f"mode: expected 'nearest', 'bilinear' or a spline order 0-5, got {mode!r}")
    if m.endswith("linear"):
        m = "bilinear"
    if m == "bicubic":
        raise NotImplementedError(
            "mode='bicubic' is grid_sample's Keys cubic convolution (a=-0.75), which fastmed's resample kernel "
            "does not implement (MONAI supports it for 2D images only); use mode=3 (cubic B-spline, scipy "
            "semantics) or mode='bilinear'")
    if m not in ("nearest", "bilinear"):
        raise ValueError(f"mode: {mode!r} is not a grid_sample mode (nearest, bilinear)")
    p = _val(padding_mode)
    p = p.strip() if isinstance(p, str) else p
    p = {"constant": "zeros", "grid-constant": "zeros", "nearest": "border", "reflect": "reflection",
         "wrap": "reflection", "grid-wrap": "reflection", "grid-mirror": "reflection"}.get(p, p)
    if p not in _GS_PAD_MODES:
        raise ValueError(f"padding_mode: {padding_mode!r} is not one of {list(_GS_PAD_MODES)} "
                         "(or the scipy names MONAI maps onto them)")
    pad = {"zeros": "zeros", "border": "border", "reflection": "mirror" if align_corners else "reflect"}[p]
    return _Plan([0 if m == "nearest" else 1] * nsp, pad, False, backend="torch")


def _gs_norm(n: int, align_corners: bool) -> np.ndarray:
    """MONAI's ``normalize_transform`` along one dim: voxel index -> [-1, 1], as (scale, shift)."""
    if align_corners:
        nn_ = 2.0 if n <= 1 else float(n)
        return np.array([2.0 / (nn_ - 1.0), -1.0])
    nn_ = 2.0 if n <= 0 else float(n)
    return np.array([2.0 / nn_, 1.0 / n - 1.0])


def _diag_affine(pairs) -> np.ndarray:
    r = len(pairs)
    m = np.eye(r + 1)
    for i, (s, t) in enumerate(pairs):
        m[i, i], m[i, -1] = s, t
    return m


def _monai_theta(xform: np.ndarray, in_shape, out_shape, plan: _Plan, align_corners: bool) -> np.ndarray:
    """The output-index -> input-index map that MONAI's ``spatial_resample`` samples at, for the
    voxel-to-voxel ``xform`` = inv(src_affine) @ dst_affine, including its coordinate conventions."""
    if plan.backend == "torch":
        # AffineTransform(normalized=False): theta_n = N_in @ xform @ inv(N_out); affine_grid makes the
        # normalised output grid G_out, grid_sample un-normalises with U_in.
        if align_corners:
            g_out = _diag_affine([(2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0) for n in out_shape])
            u_in = _diag_affine([((n - 1) / 2.0, (n - 1) / 2.0) for n in in_shape])
        else:
            g_out = _diag_affine([(2.0 / n, 1.0 / n - 1.0) for n in out_shape])
            u_in = _diag_affine([(n / 2.0, (n - 1) / 2.0) for n in in_shape])
        n_in = _diag_affine([tuple(_gs_norm(n, align_corners)) for n in in_shape])
        n_out = _diag_affine([tuple(_gs_norm(n, align_corners)) for n in out_shape])
        theta = u_in @ n_in @ xform @ np.linalg.inv(n_out) @ g_out
    else:
        # Affine(normalized=True): centred output grid, xform @ T((D-1)/2); with align_corners the grid
        # is scaled by D'/(D'-1) and Resample maps c -> (d'-1)/d' * (c + 0.5) (D', d' = max(size, 2)).
        theta = xform.copy()
        if align_corners:
            r = len(out_shape)
            c_out = np.array([(n - 1) / 2.0 for n in out_shape])
            s_out = np.array([max(n, 2) / (max(n, 2) - 1.0) for n in out_shape])
            inner = _diag_affine([(s, c - s * c) for s, c in zip(s_out, c_out)])
            s_in = np.array([(max(n, 2) - 1.0) / max(n, 2) for n in in_shape])
            outer = _diag_affine([(s, 0.5 * s) for s in s_in])
            theta = outer @ xform @ inner
            assert theta.shape == (r + 1, r + 1)
    return _denoise(theta[:-1])


def _denoise(theta: np.ndarray) -> np.ndarray:
    """Zero the round-off a rotation's Cholesky / solve leaves where the voxel map has exact zeros
    (linear entries below 1e-12 of the largest, translations below 1e-9 voxel), so that a coordinate on
    the input's edge is on it, not 1e-17 outside."""
    th = theta.copy()
    lin = th[:, :-1]
    lin[np.abs(lin) < 1e-12 * np.abs(lin).max()] = 0.0
    th[np.abs(th[:, -1]) < 1e-9, -1] = 0.0
    return th


# ------------------------------------------------------------------------------------------------
# running the op (kernel, or the float64 reference where this build has no kernel)

_FORCE_BACKEND: Optional[str] = None  # tests: "kernel" / "reference"
_warned_fallback = False


def _kernel_available(device: torch.device) -> bool:
    mod = _ext.cpu if device.type == "cpu" else _ext.cuda if device.type == "cuda" else None
    return mod is not None and hasattr(mod, "resample") and hasattr(mod, "spline_prefilter")


def _use_kernel(device: torch.device) -> bool:
    global _warned_fallback
    if _FORCE_BACKEND == "kernel":
        return True
    if _FORCE_BACKEND == "reference":
        return False
    if _kernel_available(device):
        return True
    if not _warned_fallback:
        warnings.warn("fastmed was built without the resample kernel for this device; falling back to the slow "
                      "float64 reference (rebuild fastmed to get the kernel)", RuntimeWarning, stacklevel=3)
        _warned_fallback = True
    return False


def _sample(src: Tensor, theta: Tensor, out_size, orders, padding, cval, half_up, out_dtype, compute_dtype,
            out="values", labels=None, index_offset: float = 0.0) -> Tensor:
    """One op call on prepared input (B-spline coefficients for order-3 dims)."""
    if (_FORCE_BACKEND is None and src.device.type != "cpu" and not _kernel_available(src.device)
            and _kernel_available(torch.device("cpu"))):
        warnings.warn(f"fastmed was built without the resample kernel for {src.device.type}; resampling on the "
                      "CPU kernel and copying back (rebuild fastmed with CUDA to resample on the GPU)",
                      RuntimeWarning, stacklevel=3)
        return _R.resample(src.cpu(), theta.cpu(), out_size, orders, padding, cval, half_up, out_dtype,
                           compute_dtype, out, labels, prefilter=False, index_offset=index_offset).to(src.device)
    if _use_kernel(src.device):
        return _R.resample(src, theta, out_size, orders, padding, cval, half_up, out_dtype, compute_dtype, out,
                           labels, prefilter=False, index_offset=index_offset)
    if out == "labels" and labels is None:
        labels = torch.unique(src).tolist()
    res = _R.resample_reference(src.cpu(), theta.cpu(), out_size, orders, padding, cval, half_up, out, labels,
                                index_offset=index_offset)
    if out == "argmax" and out_dtype is None:
        out_dtype = torch.uint8 if src.shape[1] <= 256 else torch.int16
    if out == "labels" and out_dtype is None:
        out_dtype = src.dtype
    if out == "values" and compute_dtype == torch.float32:
        res = res.to(torch.float32)
    return res.to(device=src.device, dtype=out_dtype)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return int(math.prod(int(s) for s in shape)) * (torch.finfo(dtype).bits if dtype.is_floating_point
                                                    else torch.iinfo(dtype).bits) // 8


def _check_memory(memory_limit, out_bytes: int, work_bytes: int, what: str) -> None:
    if memory_limit is None:
        return
    if not isinstance(memory_limit, (int, float)) or isinstance(memory_limit, bool) or memory_limit <= 0:
        raise ValueError(f"memory_limit must be a positive number of bytes or None, got {memory_limit!r}")
    need = out_bytes + work_bytes
    if need > memory_limit:
        raise MemoryLimitError(
            f"{what} would need {need} bytes ({out_bytes} for the output + {work_bytes} of workspace), more than "
            f"memory_limit={int(memory_limit)} bytes")


def _run(img: Tensor, theta: np.ndarray, out_shape, plan: _Plan, compute_dtype: torch.dtype, *, out="values",
         out_dtype=None, labels=None, memory_limit=None, what="resampling") -> Tensor:
    """Sample ``img`` ((C, *in) or (B, C, *in)) at ``theta`` into (…, *out_shape)."""
    batched = img.ndim == len(out_shape) + 2
    src = img if batched else img.unsqueeze(0)
    nsp = src.ndim - 2
    th = np.array(theta, dtype=np.float64, copy=True)
    cubic = [d for d in range(nsp) if plan.orders[d] == 3]
    oc = src.shape[1] if out == "values" else 1
    od = out_dtype
    if od is None:
        od = (torch.float32 if out == "values" else
              (torch.uint8 if src.shape[1] <= 256 else torch.int16) if out == "argmax" else src.dtype)
    out_bytes = _nbytes((src.shape[0], oc, *out_shape), od)
    work = 0
    if cubic:
        padded = [s + (2 * _SCIPY_PREPAD if (plan.prepad and d in cubic) else 0) for d, s in enumerate(src.shape[2:])]
        work = 2 * _nbytes((src.shape[0], src.shape[1], *padded), compute_dtype)
    _check_memory(memory_limit, out_bytes, work, what)
    theta_t = torch.from_numpy(th)
    size = [int(s) for s in out_shape]
    if cubic and plan.boundary is not None and out != "labels":
        # B-spline coefficients as scipy prepares them (12-voxel pre-padding for 'nearest'/'grid-constant',
        # then the mirror / reflect prefilter along the order-3 dims): the op does this on the kernel path
        if (plan.prepad, plan.boundary) != _OP_PREFILTER[plan.padding]:
            raise AssertionError(f"plan {plan} disagrees with the op's scipy prefilter")
        if _use_kernel(src.device):
            res = _R.resample(src, theta_t, size, plan.orders, plan.padding, plan.cval, plan.half_up, od,
                              compute_dtype, out, labels, prefilter=True, index_offset=plan.index_offset)
            return res if batched else res[0]
        src, theta_t = _R._spline_coefficients(src.to(compute_dtype), theta_t, plan.orders,
                                               _R.PADDINGS[plan.padding], plan.cval, compute_dtype, reference=True)
    res = _sample(src, theta_t, size, plan.orders, plan.padding, plan.cval, plan.half_up, od, compute_dtype, out,
                  labels, plan.index_offset)
    return res if batched else res[0]


def _to_tensor(x, name: str) -> tuple:
    """(tensor view without subclass, was_numpy)."""
    if isinstance(x, np.ndarray):
        t, was_np = torch.from_numpy(np.ascontiguousarray(x)), True
    elif isinstance(x, Tensor):
        t, was_np = (x.as_subclass(Tensor) if type(x) is not Tensor else x), False
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.is_complex():  # the kernels read real values: the imaginary part would be dropped
        raise TypeError(f"{name}: complex data is not supported (resample the real and imaginary parts "
                        f"separately), got {t.dtype}")
    return t, was_np


def _check_image(img: Tensor, name: str, nsp=None) -> int:
    n = img.ndim - 1
    if n not in (2, 3) or (nsp is not None and n != nsp):
        want = f"{nsp}" if nsp is not None else "2 or 3"
        raise ValueError(f"{name} must be channel-first (C, *spatial) with {want} spatial dims, got shape "
                         f"{tuple(img.shape)}")
    if img.shape[0] < 1 or min(img.shape[1:]) < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(img.shape)}")
    if img.dtype == torch.bool:
        return n
    if img.dtype not in _R.SRC_DTYPES and img.dtype != torch.int64:
        raise TypeError(f"{name} dtype {img.dtype} is not supported")
    return n


def _src_for_op(img: Tensor, compute_dtype: torch.dtype) -> Tensor:
    if img.dtype in _R.SRC_DTYPES:
        return img
    return img.to(compute_dtype)  # bool / int64: MONAI casts to the compute dtype first


# ------------------------------------------------------------------------------------------------
# MONAI Spacing


def _monai_resample(img: Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, spatial_size, mode, padding_mode,
                    align_corners: bool, dtype, memory_limit):
    """MONAI's ``spatial_resample`` (eager): returns (float32 tensor, xform or None when unchanged)."""
    sr = img.ndim - 1
    in_shape = list(img.shape[1:])
    src = _to_affine_nd(sr, src_affine)
    dst = _to_affine_nd(sr, dst_affine)
    size = [int(s) for s in spatial_size]
    if len(size) != sr or any(s < 1 for s in size):
        raise ValueError(f"the output spatial shape must be {sr} positive sizes, got {size}")
    try:
        xform = np.linalg.solve(src, dst)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"affine is not invertible: {src.tolist()}") from exc
    same = size == in_shape
    if same and (np.allclose(src, dst, rtol=1e-5, atol=AFFINE_TOL) or
                 np.allclose(xform, np.eye(sr + 1), rtol=1e-5, atol=AFFINE_TOL)):
        return img.to(torch.float32), None
    plan = _monai_plan(mode, padding_mode, align_corners, sr)
    dt = _torch_dtype(dtype) or img.dtype
    if not dt.is_floating_point and img.dtype != dt:  # MONAI casts the image to an integer dtype first
        img = img.to(dt)
    rounded = plan.backend == "scipy" and not dt.is_floating_point and max(plan.orders) > 0
    compute = torch.float64 if dt == torch.float64 or rounded else torch.float32
    theta = _monai_theta(xform, in_shape, size, plan, align_corners)
    out = _run(_src_for_op(img, compute), theta, size, plan, compute, memory_limit=memory_limit,
               what=f"resampling {tuple(img.shape)} to {tuple(size)}")
    if rounded:  # MONAI resamples an integer / bool image in its own dtype; float32 comes back
        out = _cast_like_scipy(out, dt).to(torch.float32)
    return out, xform


def _cast_like_scipy(out: Tensor, dt: torch.dtype) -> Tensor:
    """``out`` (computed in float64) written into a scipy output of dtype ``dt``: integers rounded
    half away from zero and clipped to the dtype's range (a cubic overshoot below 0 in uint8 is 0);
    bool truncated to an integer whose low byte is tested, as scipy writes it (0.9 and 256 are
    False; 1, -1 and 300 True). Inside a mask, where the interpolated value is 1, scipy's float64
    sum lands just below 1 at some voxels (holes); here a value within 1e-9 of an integer counts
    as that integer."""
    with torch.no_grad():
        if dt.is_floating_point:
            return out.to(dt)
        if dt == torch.bool:
            t = (out + torch.where(out < 0, -1e-9, 1e-9)).trunc()
            return torch.remainder(t, 256) != 0
        r = torch.where(out >= 0, torch.floor(out + 0.5), torch.ceil(out - 0.5))
        info = torch.iinfo(dt)
        return r.clamp(float(info.min), float(info.max)).to(dt)


def _meta_of(x):
    """(affine, meta dict) of a MONAI MetaTensor-like input, else (None, None)."""
    if isinstance(x, Tensor) and hasattr(x, "meta") and hasattr(x, "affine"):
        if getattr(x, "pending_operations", None):
            raise NotImplementedError("the input MetaTensor has pending lazy operations; apply them first "
                                      "(fastmed's Spacing does not resample lazily)")
        if getattr(x, "is_batch", False):
            raise ValueError("data_array: a batched MetaTensor was given; Spacing takes one (C, *spatial) image")
        return x.affine, x.meta
    return None, None


def _track_meta() -> Optional[bool]:
    """MONAI's ``get_track_meta()``, or None without MONAI."""
    try:
        from monai.data.meta_obj import get_track_meta
    except ImportError:
        return None
    return get_track_meta()


def _wrap_output(out: Tensor, like, new_affine: np.ndarray, tracked: Optional[np.ndarray], op: Optional[dict] = None):
    """A MetaTensor like MONAI returns (same class as the input when it was one; a MONAI MetaTensor for plain
    input when MONAI is importable), else ``out``; a plain tensor when MONAI tracks no meta
    (``set_track_meta(False)``), as MONAI's. ``op``: a transform trace to append to its
    ``applied_operations``."""
    aff = torch.as_tensor(new_affine, dtype=torch.float64)
    meta = getattr(like, "meta", None)
    track = _track_meta()
    if track is False:
        return out
    cls = type(like) if meta is not None else None
    if cls is None:
        if track is None:
            return out
        from monai.data import MetaTensor

        cls = MetaTensor
        meta = {}
    meta = dict(meta)
    meta["affine"] = aff
    if tracked is not None and "pixdim" in meta:  # MONAI: pixdim follows the resampled (not recomputed) affine
        pd = meta["pixdim"]
        pd = pd.clone() if isinstance(pd, Tensor) else np.array(pd, copy=True)
        sp = _affine_to_spacing(tracked, min(3, len(tracked) - 1))
        pd[1:1 + len(sp)] = torch.as_tensor(sp, dtype=pd.dtype) if isinstance(pd, Tensor) else sp
        meta["pixdim"] = pd
    ops = list(getattr(like, "applied_operations", []) or [])
    if op is not None:
        ops.append(op)
    return cls(out, meta=meta, applied_operations=ops)


def _spacing_impl(img: Tensor, affine_full: Optional[np.ndarray], pixdim, diagonal, mode, padding_mode, align_corners,
                  dtype, scale_extent, recompute_affine, min_pixdim, max_pixdim, output_spatial_shape, memory_limit):
    """Spacing's computation on a plain (C, *spatial) tensor: (float32 result, new full affine)."""
    sr = _check_image(img, "image")
    if affine_full is None:
        affine_full = np.eye(4)
    src_affine, new_affine, out_shape = spacing_geometry(img.shape[1:], affine_full, pixdim, diagonal, scale_extent,
                                                         min_pixdim, max_pixdim)
    if min(out_shape) < 1:
        why = (" (scale_extent=True: an axis of one voxel has no extent to scale; MONAI's affine would be NaN)"
               if scale_extent and 1 in img.shape[1:] else "")
        pd = np.asarray(pixdim, dtype=np.float64).tolist() if isinstance(pixdim, np.ndarray) else pixdim
        raise ValueError(f"pixdim {pd!r} gives an empty output shape {out_shape} for input shape "
                         f"{tuple(img.shape[1:])}{why}")
    if output_spatial_shape is not None:
        oss = output_spatial_shape.tolist() if isinstance(output_spatial_shape, (np.ndarray, Tensor)) else \
            output_spatial_shape
        oss = [oss] * sr if isinstance(oss, (int, np.integer)) else list(oss)[:sr]
        if len(oss) != sr:
            raise ValueError(f"output_spatial_shape must have {sr} entries, got {output_spatial_shape!r}")
        size = [int(o) if o >= 0 else int(i) for o, i in zip(oss, img.shape[1:])]
    else:
        size = out_shape
    out, xform = _monai_resample(img, affine_full, new_affine, size, mode, padding_mode, align_corners, dtype,
                                 memory_limit)
    tracked = None if xform is None else affine_full @ _embed_affine(affine_full, xform)
    result_affine = affine_full if tracked is None else tracked
    if recompute_affine:
        result_affine = _scale_affine(list(img.shape[1:]), size, align_corners)
    return out, result_affine, tracked


def resample_to_spacing(image, affine, pixdim, mode: Union[str, int] = "bilinear", padding_mode: str = "border",
                        align_corners: bool = False, dtype=torch.float32, diagonal: bool = False,
                        scale_extent: bool = False, recompute_affine: bool = False, min_pixdim=None, max_pixdim=None,
                        output_spatial_shape=None, memory_limit: Optional[int] = None):
    """Resample a channel-first image (C, H, W[, D]) with voxel-to-world ``affine`` to voxel spacing
    ``pixdim``, as MONAI's ``Spacing`` does; returns ``(resampled, new_affine)``.

    ``resampled`` is float32 (a tensor, or an ndarray for ndarray input); ``new_affine`` has the shape
    and kind (tensor / ndarray) of ``affine`` ((r+1)x(r+1), or 4x4 for a 2D image as NIfTI stores it;
    with ``recompute_affine`` it is, as in MONAI 1.6, the bare (r+1)x(r+1) scaling matrix).
    ``dtype`` is the compute precision (float32 or float64). The other arguments are MONAI's; see
    :class:`Spacing`. ``memory_limit`` (bytes): refuse, with :class:`MemoryLimitError`, a result that
    would need more.
    """
    img, was_np = _to_tensor(image, "image")
    a = _as_affine(affine)
    nsp = _check_image(img, "image")
    if len(a) - 1 < nsp:
        raise ValueError(f"affine must be at least {nsp + 1}x{nsp + 1} for a {nsp}D image, got {a.shape}")
    out, new_aff, _ = _spacing_impl(img, a, pixdim, diagonal, mode, padding_mode, align_corners, dtype, scale_extent,
                                    recompute_affine, min_pixdim, max_pixdim, output_spatial_shape, memory_limit)
    if was_np:
        out = out.numpy()
    new_aff_out = torch.as_tensor(new_aff, dtype=torch.float64) if isinstance(affine, Tensor) else new_aff
    return out, new_aff_out


_REGISTERED = False


def _register_with_monai() -> None:
    """Make MONAI see :class:`Spacing` and :class:`Spacingd` as invertible transforms (and
    ``Spacingd`` as a ``MapTransform``), so that its ``Compose.inverse`` and ``Invertd`` invert them
    (MONAI skips, silently, the transforms of a Compose that are not
    ``InvertibleTransform``s). Done when one is built with MONAI imported, or first records a trace."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from monai.transforms import InvertibleTransform, MapTransform
    except ImportError:
        return
    InvertibleTransform.register(Spacing)
    InvertibleTransform.register(Spacingd)
    MapTransform.register(Spacingd)  # Invertd lets the keys it does not invert be missing through this
    _REGISTERED = True


class Spacing:
    """Drop-in for ``monai.transforms.Spacing`` (MONAI 1.6): resample a (C, *spatial) image to ``pixdim``.

    Same constructor arguments and defaults (``dtype=np.float64``: computed in float64, output float32),
    same ``__call__`` overrides, same output shape, affine and values. The input affine comes from a
    MONAI ``MetaTensor`` (``.affine``) or the ``affine=`` argument (else identity, with MONAI's
    warning). A MetaTensor comes back as one (meta copied, affine / pixdim updated as MONAI does); a
    plain tensor or ndarray comes back as a MONAI MetaTensor when MONAI is importable (as MONAI does),
    else as a plain tensor (``return_affine=True`` returns ``(out, new_affine)`` either way).

    The output records MONAI's trace in ``applied_operations``, so :meth:`inverse` and MONAI's
    ``Compose.inverse`` / ``Invertd`` resample it back as MONAI's. Not supported: ``lazy=True``,
    ``mode='bicubic'`` (grid_sample's Keys cubic), spline orders 2/4/5 and the periodic scipy modes
    (refused when used, as MONAI checks modes).
    """

    def __init__(self, pixdim, diagonal: bool = False, mode: Union[str, int] = "bilinear",
                 padding_mode: str = "border", align_corners: bool = False, dtype=np.float64,
                 scale_extent: bool = False, recompute_affine: bool = False, min_pixdim=None, max_pixdim=None,
                 lazy: bool = False, *, memory_limit: Optional[int] = None) -> None:
        if lazy:
            raise NotImplementedError("lazy=True: fastmed's Spacing resamples eagerly")
        self.pixdim = _pixdim_vec(pixdim)
        self.min_pixdim = _vec(min_pixdim, "min_pixdim")
        self.max_pixdim = _vec(max_pixdim, "max_pixdim")
        for mn, mx in zip(self.min_pixdim, self.max_pixdim):
            if (not np.isnan(mn)) and (not np.isnan(mx)) and ((mx < mn) or (mn < 0)):
                raise ValueError(f"min_pixdim {self.min_pixdim} must be positive, smaller than max {self.max_pixdim}.")
        self.diagonal = diagonal
        self.scale_extent = scale_extent
        self.recompute_affine = recompute_affine
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = align_corners
        self.dtype = dtype
        self.lazy = False
        self.memory_limit = memory_limit
        self.tracing = os.environ.get("MONAI_TRACE_TRANSFORM", "1") != "0"  # as MONAI's transforms
        if "monai" in sys.modules:
            _register_with_monai()
        # mode and padding_mode are checked when they are used, as MONAI does: a call may override them

    def __call__(self, data_array, mode=None, padding_mode=None, align_corners: Optional[bool] = None, dtype=None,
                 scale_extent: Optional[bool] = None, output_spatial_shape=None, lazy: Optional[bool] = None, *,
                 affine=None, return_affine: bool = False, memory_limit: Optional[int] = None):
        if lazy:
            raise NotImplementedError("lazy=True: fastmed's Spacing resamples eagerly")
        meta_affine, _ = _meta_of(data_array)
        img, _ = _to_tensor(data_array, "data_array")
        if img.ndim - 1 <= 0:
            raise ValueError(f"data_array must have at least one spatial dimension, got {tuple(img.shape[1:])}.")
        if affine is not None:
            a = _as_affine(affine)
        elif meta_affine is not None:
            a = _as_affine(meta_affine, "data_array.affine")
        else:
            warnings.warn("`data_array` is not of type MetaTensor, assuming affine to be identity.")
            a = np.eye(4)  # MONAI: a plain tensor gets MetaTensor's default 4x4 identity affine
        if not align_corners and scale_extent:  # MONAI warns on the call-time arguments only
            warnings.warn("align_corners=False is not compatible with scale_extent=True.")
        ac = self.align_corners if align_corners is None else align_corners
        mode = self.mode if mode is None else mode
        padding_mode = self.padding_mode if padding_mode is None else padding_mode
        out, new_aff, tracked = _spacing_impl(
            img, a, self.pixdim, self.diagonal, mode, padding_mode, ac,
            dtype or self.dtype, self.scale_extent if scale_extent is None else scale_extent, self.recompute_affine,
            self.min_pixdim, self.max_pixdim, output_spatial_shape,
            memory_limit if memory_limit is not None else self.memory_limit)
        op = self._trace(img, a, mode, padding_mode, ac, dtype or self.dtype)
        result = _wrap_output(out, data_array if meta_affine is not None else None, new_aff, tracked, op)
        if return_affine:
            if isinstance(affine, np.ndarray):
                return result, new_aff
            return result, torch.as_tensor(new_aff, dtype=torch.float64)
        return result

    def _trace(self, img: Tensor, affine: np.ndarray, mode, padding_mode, align_corners: bool, dtype) -> Optional[dict]:
        """The entry MONAI's Spacing appends to a MetaTensor's ``applied_operations`` (same keys and
        extra_info), under this transform's id; None when MONAI tracks no meta or traces nothing."""
        if not self.tracing or not _track_meta():
            return None
        from monai.utils import TraceKeys

        _register_with_monai()
        sr = img.ndim - 1
        dt = _torch_dtype(dtype) or img.dtype
        extra = {
            "dtype": str(dt)[6:],
            "mode": getattr(mode, "value", mode),
            "padding_mode": getattr(padding_mode, "value", padding_mode),
            "align_corners": align_corners,
            "src_affine": torch.as_tensor(_to_affine_nd(sr, affine), dtype=torch.float64),
        }
        return {TraceKeys.CLASS_NAME: type(self).__name__, TraceKeys.ID: id(self), TraceKeys.TRACING: True,
                TraceKeys.DO_TRANSFORM: True, TraceKeys.ORIG_SIZE: tuple(int(v) for v in img.shape[1:]),
                TraceKeys.LAZY: False, TraceKeys.EXTRA_INFO: extra}

    def _pop_trace(self, data) -> dict:
        """Remove and return this transform's most recent entry of ``data.applied_operations`` (as
        MONAI's ``pop_transform``: the last entry with this transform's id)."""
        ops = getattr(data, "applied_operations", None)
        if not isinstance(data, Tensor) or ops is None:
            raise ValueError(f"data: inverse needs the MetaTensor this transform returned, got {type(data).__name__}")
        if not ops:
            raise ValueError("data: its applied_operations are empty; nothing to invert")
        from monai.utils import TraceKeys

        for i in range(len(ops) - 1, -1, -1):
            if ops[i].get(TraceKeys.ID) in (id(self), TraceKeys.NONE):
                return ops.pop(i)
        # DataLoader workers started by spawn made the trace with a copy of this transform: matched
        # by class name, as MONAI does
        if (torch.multiprocessing.get_start_method(allow_none=True) == "spawn"
                and ops[-1].get(TraceKeys.CLASS_NAME) == type(self).__name__):
            return ops.pop()
        last = ops[-1]
        raise RuntimeError(f"data: the most recent invertible transform is {last.get(TraceKeys.CLASS_NAME)} "
                           f"{last.get(TraceKeys.ID)}, not this {type(self).__name__} {id(self)}")

    def inverse(self, data):
        """Resample ``data`` (a MetaTensor this transform returned, or a prediction carrying its
        ``applied_operations``, as MONAI's ``Invertd`` gives) back to the input's affine and shape,
        as MONAI's ``Spacing.inverse``: from ``data``'s current affine, with the recorded mode,
        padding, align_corners and dtype."""
        op = self._pop_trace(data)
        from monai.utils import TraceKeys

        extra = op[TraceKeys.EXTRA_INFO]
        ac = extra.get("align_corners")
        ac = False if ac == TraceKeys.NONE or ac is None else bool(ac)
        img, _ = _to_tensor(data, "data")
        dst = _as_affine(extra["src_affine"], "the recorded src_affine")
        src = _as_affine(data.affine, "data.affine")
        size = [int(v) for v in op[TraceKeys.ORIG_SIZE]]
        out, xform = _monai_resample(img, src, dst, size, extra["mode"], extra["padding_mode"], ac,
                                     extra.get("dtype"), self.memory_limit)
        tracked = None if xform is None else src @ _embed_affine(src, xform)
        return _wrap_output(out, data, src if tracked is None else tracked, tracked)


class Spacingd:
    """Drop-in for ``monai.transforms.Spacingd`` (MONAI 1.6): :class:`Spacing` on each key, with per-key
    ``mode`` / ``padding_mode`` / ``align_corners`` / ``dtype`` / ``scale_extent`` and MONAI's
    ``ensure_same_shape`` rule (a key with the first key's input shape and pixdim gets its output
    shape). ``{key}_meta_dict``-style entries are updated for NIfTI inputs, as MONAI does."""

    def __init__(self, keys, pixdim, diagonal: bool = False, mode="bilinear", padding_mode="border",
                 align_corners=False, dtype=np.float64, scale_extent=False, recompute_affine: bool = False,
                 min_pixdim=None, max_pixdim=None, ensure_same_shape: bool = True, allow_missing_keys: bool = False,
                 lazy: bool = False, *, memory_limit: Optional[int] = None) -> None:
        self.keys = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
        if not self.keys:
            raise ValueError("keys must be non empty")
        self.spacing_transform = Spacing(pixdim, diagonal=diagonal, recompute_affine=recompute_affine,
                                         min_pixdim=min_pixdim, max_pixdim=max_pixdim, lazy=lazy,
                                         memory_limit=memory_limit)
        n = len(self.keys)

        def rep(v, name):
            if isinstance(v, (list, tuple)):
                if len(v) != n:
                    raise ValueError(f"{name} must have one entry per key ({n}), got {len(v)}")
                return tuple(v)
            return (v,) * n

        self.mode = rep(mode, "mode")
        self.padding_mode = rep(padding_mode, "padding_mode")
        self.align_corners = rep(align_corners, "align_corners")
        self.dtype = rep(dtype, "dtype")
        self.scale_extent = rep(scale_extent, "scale_extent")
        self.ensure_same_shape = ensure_same_shape
        self.allow_missing_keys = allow_missing_keys
        if "monai" in sys.modules:
            _register_with_monai()

    def __call__(self, data: Mapping[Hashable, Any], lazy: Optional[bool] = None) -> dict:
        if lazy:
            raise NotImplementedError("lazy=True: fastmed's Spacingd resamples eagerly")
        d = dict(data)
        init_shape, init_pixdim, should_match, out_shape_k = None, None, False, None
        for i, key in enumerate(self.keys):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"Key `{key}` of transform `Spacingd` was missing in the data and allow_missing_keys "
                               "is False.")
            x = d[key]
            m_aff, _ = _meta_of(x)
            if self.ensure_same_shape and m_aff is not None:
                aff = _as_affine(m_aff, f"{key}.affine")
                sr = x.ndim - 1
                px = _affine_to_spacing(_to_affine_nd(sr, aff), sr)
                if init_shape is None and init_pixdim is None:
                    init_shape, init_pixdim = tuple(x.shape[1:]), px
                else:
                    should_match = (len(init_shape) == sr and np.allclose(init_shape, tuple(x.shape[1:]))
                                    and np.allclose(init_pixdim, px, atol=1e-3))
            d[key] = self.spacing_transform(
                x, mode=self.mode[i], padding_mode=self.padding_mode[i], align_corners=self.align_corners[i],
                dtype=self.dtype[i], scale_extent=self.scale_extent[i],
                output_spatial_shape=out_shape_k if should_match else None)
            if hasattr(d[key], "meta"):
                fn = str(d[key].meta.get("filename_or_obj", ""))
                if fn.endswith(".nii") or fn.endswith(".nii.gz"):
                    for mk in [k for k in d if isinstance(k, str) and isinstance(key, str) and k.startswith(f"{key}_")]:
                        if isinstance(d[mk], dict):
                            d[mk].update(d[key].meta)
            if out_shape_k is None:
                out_shape_k = tuple(d[key].shape[1:])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        """:meth:`Spacing.inverse` on each key (missing keys skipped with ``allow_missing_keys``), as
        MONAI's ``Spacingd.inverse``."""
        d = dict(data)
        for key in self.keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"Key `{key}` of transform `Spacingd` was missing in the data and allow_missing_keys "
                               "is False.")
            d[key] = self.spacing_transform.inverse(d[key])
        return d


# ------------------------------------------------------------------------------------------------
# scipy.ndimage.affine_transform


def affine_transform(input, matrix, offset=0.0, output_shape=None, output=None, order: int = 3,
                     mode: str = "constant", cval: float = 0.0, prefilter: bool = True, *,
                     compute_dtype=torch.float64, memory_limit: Optional[int] = None):
    """Drop-in for ``scipy.ndimage.affine_transform`` on a 2D or 3D array / tensor (no channel dim):
    ``output[o] = input(matrix @ o + offset)`` with spline ``order`` 0, 1 or 3 and scipy's ``mode``
    ('constant', 'grid-constant', 'nearest', 'reflect', 'grid-mirror', 'mirror'; not the periodic
    'wrap'/'grid-wrap') and ``cval``. ``matrix``: (ndim,), (ndim, ndim), (ndim, ndim + 1) or
    (ndim + 1, ndim + 1), as scipy. Returns float64 for float64 input, else float32 (scipy returns
    the input's dtype). ``output``: as scipy's, a dtype (integers rounded half away from zero and
    clipped, bool truncated, as scipy writes them) or an array / tensor to write into (then that
    is returned, as scipy's code does; its shape is the output shape). Order 0 rounds half up, as
    scipy; see the module notes for ties.
    """
    x, was_np = _to_tensor(input, "input")
    nsp = x.ndim
    if nsp not in (2, 3):
        raise ValueError(f"input must have 2 or 3 dims, got shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"input must not be empty, got shape {tuple(x.shape)}")
    target, out_dt = None, None
    if isinstance(output, (np.ndarray, Tensor)):
        target = output
        out_dt = _torch_dtype(output.dtype)
        if output_shape is None:
            output_shape = tuple(output.shape)
        elif tuple(output.shape) != tuple(int(v) for v in output_shape):
            raise ValueError(f"output: its shape {tuple(output.shape)} is not output_shape {tuple(output_shape)}")
    elif output is not None:
        try:
            out_dt = _torch_dtype(output)
        except TypeError as exc:
            raise TypeError(f"output: must be None, a dtype or an array, got {output!r}") from exc
    if out_dt is not None and out_dt.is_complex:
        raise TypeError(f"output: complex dtypes are not supported, got {out_dt}")
    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    m = m.astype(np.float64)
    if m.shape == (nsp + 1, nsp + 1) and not np.array_equal(m[nsp], np.eye(nsp + 1)[nsp]):
        raise ValueError(f"matrix: the last row of a homogeneous ({nsp + 1}, {nsp + 1}) matrix must be "
                         f"[0, ..., 0, 1], got {m[nsp].tolist()}")
    th = np.zeros((nsp, nsp + 1))
    if m.shape == (nsp,):
        th[:, :nsp] = np.diag(m)
    elif m.shape == (nsp, nsp):
        th[:, :nsp] = m
    elif m.shape in ((nsp, nsp + 1), (nsp + 1, nsp + 1)):
        th = m[:nsp].copy()
    else:
        raise ValueError(f"matrix must be ({nsp},), ({nsp}, {nsp}), ({nsp}, {nsp + 1}) or ({nsp + 1}, {nsp + 1}), "
                         f"got {tuple(m.shape)}")
    if m.shape in ((nsp,), (nsp, nsp)):
        off = np.broadcast_to(np.asarray(offset.detach().cpu() if isinstance(offset, Tensor) else offset,
                                         dtype=np.float64), (nsp,))
        th[:, -1] = off
    if not np.isfinite(th).all():
        raise ValueError("matrix and offset must be finite")
    out_shape = list(x.shape) if output_shape is None else [int(s) for s in output_shape]
    if len(out_shape) != nsp or any(s < 1 for s in out_shape):
        raise ValueError(f"output_shape must be {nsp} positive sizes, got {output_shape!r}")
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)):
        raise ValueError(f"order must be an integer 0-5, got {order!r}")
    if not math.isfinite(float(cval)):
        raise ValueError(f"cval must be finite, got {cval}")
    plan = _scipy_plan(int(order), mode, nsp)
    plan.cval = float(cval)
    if not prefilter:
        plan.boundary, plan.prepad = None, None
    compute = _torch_dtype(compute_dtype)
    if compute not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    # float64 for float64 input or output, and for integer / bool outputs (rounded from it)
    wide = out_dt is not None and (out_dt == torch.float64 or not out_dt.is_floating_point)
    od = torch.float64 if x.dtype == torch.float64 or wide else torch.float32
    src = _src_for_op(x, compute).unsqueeze(0)
    if not prefilter and any(o == 3 for o in plan.orders):
        plan.orders = list(plan.orders)
        _check_memory(memory_limit, _nbytes((1, *out_shape), od), 0,
                      f"affine_transform of {tuple(x.shape)} to {tuple(out_shape)}")
        src = src.to(compute)
        res = _sample(src.unsqueeze(0), torch.from_numpy(th), out_shape, plan.orders, plan.padding, plan.cval,
                      plan.half_up, od, compute)[0, 0]
    else:
        res = _run(src, th, out_shape, plan, compute, out_dtype=od, memory_limit=memory_limit,
                   what=f"affine_transform of {tuple(x.shape)} to {tuple(out_shape)}")[0]
    if out_dt is not None and res.dtype != out_dt:
        res = _cast_like_scipy(res, out_dt)
    if target is not None:  # scipy writes into the given array and returns it
        if isinstance(target, np.ndarray):
            target[...] = res.numpy()
        else:
            with torch.no_grad():
                target.copy_(res)
        return target
    return res.numpy() if was_np else res


# ------------------------------------------------------------------------------------------------
# logits -> labels


def resample_argmax(logits, out_shape: Sequence[int], src_affine=None, dst_affine=None, *, theta=None,
                    mode: Union[str, int] = "bilinear", padding_mode: str = "border", align_corners: bool = False,
                    dtype=torch.float32, out_dtype: Optional[torch.dtype] = None,
                    memory_limit: Optional[int] = None):
    """Resample C-channel ``logits`` (or probabilities), (C, *spatial) or (B, C, *spatial), to
    ``out_shape`` and return the argmax over channels, (1, *out_shape) or (B, 1, *out_shape), as
    uint8 (C <= 256) or int16 -- in one pass, without the resampled C-channel tensor. Equal to
    resampling each channel then ``argmax(dim=channel)`` (ties go to the lowest channel).

    Geometry, as MONAI's ``SpatialResample`` (e.g. back from a ``Spacing`` output to the original
    image): ``src_affine`` (the logits' voxel-to-world affine) and ``dst_affine`` (the output's),
    with MONAI's ``mode`` / ``padding_mode`` / ``align_corners`` conventions (``"nearest"``,
    ``"bilinear"``, or spline order 0/1/3 with scipy's modes). Or give ``theta`` directly: the
    (r, r+1) or (r+1, r+1) map from output voxel index to input voxel index (array index order),
    sampled with the same ``mode`` / ``padding_mode`` without MONAI's grid conventions. For
    nnU-Net's export (logits resampled with order 1 to the original shape, then argmax) use
    :func:`resample_nnunet` with ``out="argmax"``.
    """
    x, was_np = _to_tensor(logits, "logits")
    out_shape = [int(s) for s in out_shape]
    nsp = len(out_shape)
    if nsp not in (2, 3):
        raise ValueError(f"out_shape must have 2 or 3 entries, got {out_shape}")
    if any(s < 1 for s in out_shape):
        raise ValueError(f"out_shape must be positive, got {out_shape}")
    if x.ndim not in (nsp + 1, nsp + 2):
        raise ValueError(f"logits must be (C, *spatial) or (B, C, *spatial) with {nsp} spatial dims (len(out_shape)), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"logits must be floating point, got {x.dtype}")
    batched = x.ndim == nsp + 2
    C = x.shape[1] if batched else x.shape[0]
    if C < 1 or min(x.shape[-nsp:]) < 1:
        raise ValueError(f"logits must not be empty, got shape {tuple(x.shape)}")
    if out_dtype is None:
        out_dtype = torch.uint8 if C <= 256 else torch.int16
    if out_dtype not in _R.LABEL_DTYPES:
        raise TypeError(f"out_dtype must be an integer dtype, got {out_dtype}")
    if C > torch.iinfo(out_dtype).max + 1:
        raise ValueError(f"out_dtype {out_dtype} cannot hold {C} class indices (logits has {C} channels)")
    in_shape = list(x.shape[-nsp:])
    compute = torch.float64 if _torch_dtype(dtype) == torch.float64 else torch.float32
    if theta is not None:
        if src_affine is not None or dst_affine is not None:
            raise ValueError("give either theta or src_affine/dst_affine, not both")
        th = theta.detach().cpu().numpy() if isinstance(theta, Tensor) else np.asarray(theta)
        th = th.astype(np.float64)
        if th.shape not in ((nsp, nsp + 1), (nsp + 1, nsp + 1)):
            raise ValueError(f"theta must be ({nsp}, {nsp + 1}) or ({nsp + 1}, {nsp + 1}), got {tuple(th.shape)}")
        if not np.isfinite(th).all():
            raise ValueError("theta must be finite")
        plan = _monai_plan(mode, padding_mode, align_corners, nsp)
        theta_ = th[:nsp]
    else:
        if src_affine is None or dst_affine is None:
            raise ValueError("give src_affine and dst_affine (voxel-to-world affines of logits and output), or theta")
        sa, da = _as_affine(src_affine, "src_affine"), _as_affine(dst_affine, "dst_affine")
        sa, da = _to_affine_nd(nsp, sa), _to_affine_nd(nsp, da)
        _check_invertible(sa, "src_affine")
        _check_invertible(da, "dst_affine")
        plan = _monai_plan(mode, padding_mode, align_corners, nsp)
        theta_ = _monai_theta(np.linalg.solve(sa, da), in_shape, out_shape, plan, align_corners)
    res = _run(x, theta_, out_shape, plan, compute, out="argmax", out_dtype=out_dtype, memory_limit=memory_limit,
               what=f"argmax of {tuple(x.shape)} resampled to {tuple(out_shape)}")
    return res.numpy() if was_np else res


# ------------------------------------------------------------------------------------------------
# nnU-Net v2


def nnunet_new_shape(old_shape, old_spacing, new_spacing) -> list:
    """nnU-Net's ``compute_new_shape``: round(old_spacing / new_spacing * old_shape) (half to even)."""
    return [int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)]


def nnunet_separate_z(current_spacing, new_spacing, force_separate_z=None, separate_z_anisotropy_threshold=3):
    """nnU-Net's ``determine_do_sep_z_and_axis``: (do_separate_z, axis or None)."""
    def lowres_axis(sp):
        sp = np.asarray(sp, dtype=np.float64)
        return np.where(max(sp) / sp == 1)[0]

    def aniso(sp):
        return (np.max(sp) / np.min(sp)) > separate_z_anisotropy_threshold

    if force_separate_z is not None:
        do = bool(force_separate_z)
        axis = lowres_axis(current_spacing) if do else None
    elif aniso(current_spacing):
        do, axis = True, lowres_axis(current_spacing)
    elif aniso(new_spacing):
        do, axis = True, lowres_axis(new_spacing)
    else:
        do, axis = False, None
    if axis is not None:
        if len(axis) != 1:
            do, axis = False, None
        else:
            axis = int(axis[0])
    return do, axis


def _spacing_vec(v, name: str, n: int) -> np.ndarray:
    s = _vec(v, name)
    if s.size != n:
        raise ValueError(f"{name} must have {n} entries (one per spatial dim), got {s.tolist()}")
    if not np.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{name} must be finite and positive, got {s.tolist()}")
    return s


def _nanminmax(x: Tensor, dims) -> tuple:
    xf = x.to(torch.float64) if not x.is_floating_point() else x
    nan = torch.isnan(xf)
    if nan.any():
        lo = torch.where(nan, torch.full_like(xf, math.inf), xf).amin(dim=dims, keepdim=True)
        hi = torch.where(nan, torch.full_like(xf, -math.inf), xf).amax(dim=dims, keepdim=True)
    else:
        lo, hi = xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)
    return lo, hi


def resample_nnunet(data, current_spacing, new_spacing, is_seg: bool = False, order: int = 3, order_z: int = 0,
                    force_separate_z: Optional[bool] = None, separate_z_anisotropy_threshold: float = 3, *,
                    new_shape: Optional[Sequence[int]] = None, out: str = "values", compute_dtype=torch.float32,
                    memory_limit: Optional[int] = None):
    """nnU-Net v2's resampling (``resample_data_or_seg_to_spacing``; with ``new_shape``,
    ``resample_data_or_seg_to_shape``) of ``data`` (C, x, y, z), ndarray or tensor.

    Images: skimage ``resize(order, mode="edge", anti_aliasing=False, clip=True)``, i.e. sampling at
    (i + 0.5) * in / out - 0.5 with edge padding (cubic: scipy's 'nearest'-mode B-spline), the result
    clipped to the input's range (per channel; per slice of the anisotropic axis with separate z).
    Separate z (spacing anisotropy > threshold, or forced): in-plane ``order``, ``order_z`` along the
    anisotropic axis -- one pass with per-axis orders. Segmentations (``is_seg``): ``resize_segmentation``
    (each label's indicator interpolated, the last label reaching 0.5 wins, else 0). Output has
    ``data``'s dtype (as nnU-Net). ``out="argmax"`` (images only): the argmax over channels of the
    resampled values, uint8/int16 (nnU-Net's logits -> segmentation export, in one pass; with
    ``order=3`` and no separate z the argmax is of the unclipped values). ``compute_dtype``: float32 (fast) or float64
    (nnU-Net computes in float64); integer images are computed in float64 whatever it says, since their
    values are truncated (as nnU-Net's ``astype``; a value within 1e-9, relative, of an integer counts as
    that integer).
    """
    x, was_np = _to_tensor(data, "data")
    if x.ndim != 4:
        raise ValueError(f"data must be (C, x, y, z), got shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"data must not be empty, got shape {tuple(x.shape)}")
    cur = _spacing_vec(current_spacing, "current_spacing", 3)
    new = _spacing_vec(new_spacing, "new_spacing", 3)
    for nm, o in (("order", order), ("order_z", order_z)):
        if isinstance(o, bool) or not isinstance(o, (int, np.integer)) or o not in (0, 1, 2, 3, 4, 5):
            raise ValueError(f"{nm} must be a spline order 0-5, got {o!r}")
        if o in (2, 4, 5):
            raise NotImplementedError(f"{nm}={o}: fastmed's resample kernel supports spline orders 0, 1 and 3")
    if out not in ("values", "argmax"):
        raise ValueError(f"out must be 'values' or 'argmax', got {out!r}")
    if out == "argmax" and is_seg:
        raise ValueError("out='argmax' is for logits/probabilities, not is_seg=True")
    compute = _torch_dtype(compute_dtype)
    if compute not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    in_shape = list(x.shape[1:])
    if new_shape is None:
        new_shape = nnunet_new_shape(in_shape, cur, new)
    else:
        new_shape = [int(s) for s in new_shape]
        if len(new_shape) != 3:
            raise ValueError(f"new_shape must have 3 entries, got {new_shape}")
    if min(new_shape) < 1:
        raise ValueError(f"the new shape {new_shape} is empty (current_spacing {cur.tolist()}, new_spacing "
                         f"{new.tolist()}, shape {in_shape})")
    do_sep, axis = nnunet_separate_z(cur, new, force_separate_z, separate_z_anisotropy_threshold)
    if new_shape == in_shape:
        if out == "argmax":
            res = x.argmax(0, keepdim=True).to(torch.uint8 if x.shape[0] <= 256 else torch.int16)
            return res.numpy() if was_np else res
        return data
    orders = [order] * 3
    if do_sep:
        orders[axis] = order_z
    scale = [i / o for i, o in zip(in_shape, new_shape)]
    theta = np.zeros((3, 4))
    for d in range(3):  # (i + 0.5) * scale - 0.5 with the index offset of _edge_plan: scipy's rounding
        theta[d, d], theta[d, 3] = scale[d], -0.5
    what = f"resampling {tuple(x.shape)} to {tuple(new_shape)}"
    if is_seg:
        res = torch.stack([_nnunet_seg(x[c], theta, in_shape, new_shape, order, order_z, do_sep, axis, compute,
                                       memory_limit, what)[0] for c in range(x.shape[0])])
    else:
        res = _nnunet_data(x, theta, in_shape, new_shape, orders, do_sep, axis, compute, out, memory_limit, what)
    return res.numpy() if was_np else res


def _edge_plan(orders) -> _Plan:
    cubic = any(o == 3 for o in orders)
    return _Plan(list(orders), "border", True, "mirror" if cubic else None, "replicate" if cubic else None,
                 backend="scipy", index_offset=0.5)


def _axis_pass_theta(theta: np.ndarray, axis: int) -> tuple:
    """(in-plane theta with identity along axis, axis-only theta with identity in-plane)."""
    t1, t2 = theta.copy(), np.zeros_like(theta)
    t1[axis, :] = 0
    t1[axis, axis], t1[axis, 3] = 1, -0.5  # (i + 0.5) - 0.5 = i under _edge_plan's index offset
    for d in range(3):
        t2[d, d], t2[d, 3] = 1, -0.5
    t2[axis] = theta[axis]
    return t1, t2


def _astype_like_numpy(r: Tensor, dt: torch.dtype) -> Tensor:
    """nnU-Net's ``astype(data's dtype)``: integers truncated. A value within 1e-9 (relative) of an
    integer counts as that integer: cubic splines at the input's own grid points give the input back
    to about 1e-12 relative (the prefilter's rounding), and truncating that noise would take 1 off at
    random."""
    if dt.is_floating_point or dt == torch.bool:
        return r.to(dt)
    return (r + torch.sign(r) * 1e-9 * torch.clamp(r.abs(), min=1.0)).trunc().to(dt)


def _nnunet_data(x: Tensor, theta, in_shape, new_shape, orders, do_sep, axis, compute, out, memory_limit, what):
    out_dtype = x.dtype  # nnU-Net writes into an array of data's dtype
    if not out_dtype.is_floating_point and out == "values":
        compute = torch.float64  # truncated to integers: float32's error (1e-3 at 1000) would decide them
    src = x if x.dtype in _R.SRC_DTYPES else x.to(compute)
    clip = any(o == 3 for o in orders)
    if not clip:
        if out == "argmax":
            return _run(src, theta, new_shape, _edge_plan(orders), compute, out="argmax", memory_limit=memory_limit,
                        what=what)
        r = _run(src, theta, new_shape, _edge_plan(orders), compute, out_dtype=compute, memory_limit=memory_limit,
                 what=what)
        return _astype_like_numpy(r, out_dtype)
    if not do_sep:
        if out == "argmax":  # argmax of the unclipped values
            return _run(src, theta, new_shape, _edge_plan(orders), compute, out="argmax", memory_limit=memory_limit,
                        what=what)
        r = _run(src, theta, new_shape, _edge_plan(orders), compute, out_dtype=compute, memory_limit=memory_limit,
                 what=what)
        lo, hi = _nanminmax(x, (1, 2, 3))
        return _astype_like_numpy(torch.minimum(torch.maximum(r, lo.to(r)), hi.to(r)), out_dtype)
    # separate z, cubic in-plane: clip per input slice (skimage clips each 2D resize to that slice's range)
    inplane = [d for d in range(3) if d != axis]
    lo, hi = _nanminmax(x, tuple(1 + d for d in inplane))  # (C, ...) with size 1 in-plane
    if orders[axis] == 0 and out == "values":
        r = _run(src, theta, new_shape, _edge_plan(orders), compute, out_dtype=compute, memory_limit=memory_limit,
                 what=what)
        # the slice each output plane came from, picked by the kernel itself (same theta row, order 0)
        ext = torch.stack([lo, hi], 0).reshape(2 * x.shape[0], *lo.shape[1:]).to(compute)
        t = np.zeros((3, 4))
        t[axis] = theta[axis]
        osz = [new_shape[d] if d == axis else 1 for d in range(3)]
        pick = _run(ext, t, osz, _edge_plan([0, 0, 0]), compute, out_dtype=compute, what=what)
        pick = pick.reshape(2, x.shape[0], *osz)
        return _astype_like_numpy(torch.minimum(torch.maximum(r, pick[0]), pick[1]), out_dtype)
    # general: in-plane pass (clipped per slice), then the pass along the axis
    t1, t2 = _axis_pass_theta(theta, axis)
    mid_shape = [in_shape[d] if d == axis else new_shape[d] for d in range(3)]
    o1 = list(orders)
    o1[axis] = 0
    _check_memory(memory_limit, _nbytes((x.shape[0], *mid_shape), compute) +
                  _nbytes((x.shape[0], *new_shape), out_dtype), 0, what)
    mid = _run(src, t1, mid_shape, _edge_plan(o1), compute, out_dtype=compute, what=what)
    mid = torch.minimum(torch.maximum(mid, lo.to(mid)), hi.to(mid))
    o2 = [0, 0, 0]
    o2[axis] = orders[axis]
    if out == "argmax":
        return _run(mid, t2, new_shape, _edge_plan(o2), compute, out="argmax", memory_limit=memory_limit, what=what)
    return _astype_like_numpy(_run(mid, t2, new_shape, _edge_plan(o2), compute, out_dtype=compute,
                                   memory_limit=memory_limit, what=what), out_dtype)


def _seg_int(seg: Tensor) -> Tensor:
    if seg.is_floating_point():
        if not torch.equal(seg, seg.round()):
            raise ValueError("data: a segmentation (is_seg=True) must hold integer labels")
    elif seg.dtype in _R.SRC_DTYPES:
        return seg
    if seg.numel() and (seg.min() < -2 ** 31 or seg.max() >= 2 ** 31):  # the kernel's labels are int32
        raise ValueError(f"data: segmentation labels must fit int32, got labels from {seg.min().item()} "
                         f"to {seg.max().item()}")
    return seg.to(torch.int32)


def _labels_pass(seg: Tensor, theta, shape, orders, compute, rule: str, memory_limit, what) -> Tensor:
    """(1, *in) labels -> (1, *shape): per label, the interpolated indicator thresholded (rule "ge":
    >= 0.5, nnU-Net's resize_segmentation; "round": round() > 0.5, its separate-z pass), later labels
    win, else 0. One pass of the op for orders <= 1 with rule "ge"."""
    labels = torch.unique(seg).tolist()
    plan = _edge_plan(orders)
    if rule == "ge" and all(o <= 1 for o in orders):
        return _run(seg, theta, shape, plan, compute, out="labels", labels=labels, out_dtype=seg.dtype,
                    memory_limit=memory_limit, what=what)
    _check_memory(memory_limit, _nbytes((1, *shape), seg.dtype) + _nbytes((1, *shape), compute),
                  _nbytes(seg.shape, compute) * (3 if any(o == 3 for o in orders) else 1), what)
    res = torch.zeros((1, *shape), dtype=seg.dtype, device=seg.device)
    for lab in labels:
        ind = (seg == lab).to(compute)
        v = _run(ind, theta, shape, plan, compute, out_dtype=compute, what=what)
        hit = (v >= 0.5) if rule == "ge" else (torch.round(v) > 0.5)
        res[hit] = lab
    return res


def _nnunet_seg(seg_c: Tensor, theta, in_shape, new_shape, order, order_z, do_sep, axis, compute, memory_limit, what):
    seg = _seg_int(seg_c).unsqueeze(0)
    if not do_sep:
        if order == 0:  # resize(seg.astype(float), order 0) -> nearest label values
            return _run(seg, theta, new_shape, _edge_plan([0, 0, 0]), compute, out_dtype=seg_c.dtype,
                        memory_limit=memory_limit, what=what)
        return _labels_pass(seg, theta, new_shape, [order] * 3, compute, "ge", memory_limit, what).to(seg_c.dtype)
    orders = [order] * 3
    orders[axis] = order_z
    if order_z == 0:
        # in-plane resize_segmentation per slice, then nearest along the axis = one pass
        if order == 0:
            return _run(seg, theta, new_shape, _edge_plan(orders), compute, out_dtype=seg_c.dtype,
                        memory_limit=memory_limit, what=what)
        return _labels_pass(seg, theta, new_shape, orders, compute, "ge", memory_limit, what).to(seg_c.dtype)
    t1, t2 = _axis_pass_theta(theta, axis)
    mid_shape = [in_shape[d] if d == axis else new_shape[d] for d in range(3)]
    o1 = [order] * 3
    o1[axis] = 0
    if order == 0:
        mid = _run(seg, t1, mid_shape, _edge_plan(o1), compute, out_dtype=seg.dtype, memory_limit=memory_limit,
                   what=what)
    else:
        mid = _labels_pass(seg, t1, mid_shape, o1, compute, "ge", memory_limit, what)
    if in_shape[axis] == new_shape[axis]:
        return mid.to(seg_c.dtype)
    o2 = [0, 0, 0]
    o2[axis] = order_z
    return _labels_pass(mid, t2, new_shape, o2, compute, "round", memory_limit, what).to(seg_c.dtype)
