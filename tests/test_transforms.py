"""fastmed.transforms against MONAI 1.6's Spacing / Spacingd / SpatialResample, scipy.ndimage and a
transcription of nnU-Net v2's resampling (skimage ``resize`` = ``scipy.ndimage.zoom(grid_mode=True)``
plus clipping). Every test runs on the float64 reference backend and, once the package is built with
the resample kernel, on the kernel.

Where a result depends on float round-off in the *reference* implementation (an order-0 sample at an
exact .5 coordinate, a scipy 'constant' sample exactly on the input's edge), that voxel is excluded
from the exact comparison (``_fragile``) -- the fraction so excluded is asserted to be small.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmed import _ext
from fastmed import transforms as T

monai = pytest.importorskip("monai")
ndi = pytest.importorskip("scipy.ndimage")
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Spacing as MSpacing  # noqa: E402
from monai.transforms import Spacingd as MSpacingd  # noqa: E402
from monai.transforms import SpatialResample as MSpatialResample  # noqa: E402

HAS_KERNEL = _ext.cpu is not None and hasattr(_ext.cpu, "resample") and hasattr(_ext.cpu, "spline_prefilter")
BACKENDS = ["reference",
            pytest.param("kernel", marks=pytest.mark.skipif(not HAS_KERNEL, reason="fastmed._C has no resample yet"))]


_kernel_only = pytest.mark.skipif(not HAS_KERNEL, reason="fastmed._C has no resample yet")
# the big MONAI matrices: every affine kind on the kernel, the most general (oblique) on the slow reference
BACKEND_KIND = [("reference", "oblique")] + [pytest.param("kernel", k, marks=_kernel_only)
                                             for k in ("diag", "lps", "oblique")]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(T, "_FORCE_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------
# helpers


def _rot(axis, ang):
    c, s = math.cos(ang), math.sin(ang)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[j, j], r[i, j], r[j, i] = c, c, -s, s
    return r


def affine3(kind, spacing=(1.0, 1.2, 1.7), origin=(3.0, -7.0, 11.0)):
    a = np.eye(4)
    a[:3, :3] = np.diag(spacing)
    if kind == "lps":
        a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ a[:3, :3]
    elif kind == "oblique":
        a[:3, :3] = _rot(2, 0.3) @ _rot(0, 0.2) @ a[:3, :3]
    a[:3, 3] = origin
    return a


def affine2(kind, spacing=(0.9, 1.4), origin=(2.0, -5.0)):
    a = np.eye(3)
    a[:2, :2] = np.diag(spacing)
    if kind == "lps":
        a[:2, :2] = np.diag([-1.0, 1.0]) @ a[:2, :2]
    elif kind == "oblique":
        c, s = math.cos(0.35), math.sin(0.35)
        a[:2, :2] = np.array([[c, -s], [s, c]]) @ a[:2, :2]
    a[:2, 2] = origin
    return a


def image(shape, channels=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((channels, *shape), generator=g, dtype=torch.float64).to(dtype)


def _coords(theta, out_shape):
    g = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij")).reshape(len(out_shape), -1)
    return theta[:, :-1] @ g + theta[:, -1:]


def _fragile(theta, in_shape, out_shape, orders, constant_edges):
    """Voxels whose value flips with 1e-12 of coordinate round-off: order-0 ties, and with scipy's
    'constant' mode, coordinates exactly on the input's first/last voxel."""
    c = _coords(theta, out_shape)
    bad = np.zeros(c.shape[1], bool)
    for d, o in enumerate(orders):
        if o == 0:
            bad |= np.abs(c[d] - np.floor(c[d]) - 0.5) < 1e-6
        if constant_edges:
            bad |= (np.abs(c[d]) < 1e-6) | (np.abs(c[d] - (in_shape[d] - 1)) < 1e-6)
    return torch.from_numpy(bad.reshape(out_shape))


def _monai_fragile(img_shape, affine, pixdim, mode, padding_mode, align_corners, **kw):
    src, dst, osh = T.spacing_geometry(img_shape, affine, pixdim, kw.get("diagonal", False),
                                       kw.get("scale_extent", False), kw.get("min_pixdim"), kw.get("max_pixdim"))
    plan = T._monai_plan(mode, padding_mode, align_corners, len(img_shape))
    theta = T._monai_theta(np.linalg.solve(src, dst), list(img_shape), osh, plan, align_corners)
    return _fragile(theta, img_shape, osh, plan.orders, plan.padding == "constant")


def assert_values(ours, ref, fragile=None, atol=2e-6, rtol=2e-6, max_mismatch=0.05):
    """Equal to ``ref`` within tolerance; where ``fragile`` (a tie decided by round-off) they may differ,
    but on at most ``max_mismatch`` of the voxels."""
    ours = torch.as_tensor(np.asarray(ours) if isinstance(ours, np.ndarray) else ours.as_subclass(torch.Tensor))
    ref = torch.as_tensor(np.asarray(ref) if isinstance(ref, np.ndarray) else ref.as_subclass(torch.Tensor))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    ours, ref = ours.double(), ref.double()
    if fragile is not None:
        fragile = fragile.expand_as(ours)
        bad = ~torch.isclose(ours, ref, atol=atol, rtol=rtol)
        assert bad.double().mean() <= max_mismatch, f"{bad.double().mean():.3f} of voxels differ"
        ours, ref = ours[~fragile], ref[~fragile]
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)


def run_monai(x, affine, pixdim, call_kw=None, **kw):
    mt = MetaTensor(x.clone(), affine=torch.as_tensor(affine, dtype=torch.float64))
    return MSpacing(pixdim, **kw)(mt, **(call_kw or {}))


def run_ours(x, affine, pixdim, call_kw=None, **kw):
    mt = MetaTensor(x.clone(), affine=torch.as_tensor(affine, dtype=torch.float64))
    return T.Spacing(pixdim, **kw)(mt, **(call_kw or {}))


def check_spacing(x, affine, pixdim, atol=2e-6, call_kw=None, max_mismatch=0.05, **kw):
    ref = run_monai(x, affine, pixdim, call_kw, **kw)
    out = run_ours(x, affine, pixdim, call_kw, **kw)
    assert type(out) is MetaTensor and out.dtype == torch.float32 and ref.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out.affine, ref.affine, atol=1e-12, rtol=1e-12)
    ac = (call_kw or {}).get("align_corners", kw.get("align_corners", False))
    fr = None
    if call_kw is None or "output_spatial_shape" not in call_kw:
        geo = {k: kw[k] for k in ("diagonal", "scale_extent", "min_pixdim", "max_pixdim") if k in kw}
        geo.update({k: v for k, v in (call_kw or {}).items() if k == "scale_extent"})
        mode = (call_kw or {}).get("mode", kw.get("mode", "bilinear"))
        pad = (call_kw or {}).get("padding_mode", kw.get("padding_mode", "border"))
        fr = _monai_fragile(x.shape[1:], affine, pixdim, mode, pad, ac, **geo)
        if T._monai_plan(mode, pad, ac, x.ndim - 1).padding == "constant":
            # scipy 'constant': a face of the output lies exactly on the input's first voxel (MONAI puts the
            # output corner there); MONAI's round-off moves it inside or outside, we keep it inside
            max_mismatch = max(max_mismatch, 0.3)
    assert_values(out, ref, fr, atol=atol, rtol=atol, max_mismatch=max_mismatch)
    return out, ref


# ------------------------------------------------------------------------------------------------
# MONAI Spacing, 3D

MODES_3D = [
    ("bilinear", "border"), ("bilinear", "zeros"), ("bilinear", "reflection"),
    ("nearest", "border"), ("nearest", "zeros"), ("nearest", "reflection"),
    ("trilinear", "nearest"), ("bilinear", "constant"),  # MONAI maps scipy names onto grid_sample's
    (0, "border"), (1, "zeros"), (1, "reflect"), (3, "border"), (3, "zeros"), (3, "reflection"),
    (3, "mirror"), (3, "grid-constant"), (3, "grid-mirror"), (1, "mirror"), (0, "constant"),
]


@pytest.mark.parametrize("mode,padding_mode", MODES_3D)
@pytest.mark.parametrize("backend,kind", BACKEND_KIND, indirect=["backend"])
@pytest.mark.parametrize("pixdim", [(1.57, 2.05, 2.45), (0.73, 0.91, 1.3)], ids=["down", "up"])
def test_spacing_3d_matches_monai(backend, mode, padding_mode, kind, pixdim):
    x = image((11, 13, 9))
    for ac in (False, True):
        out, ref = check_spacing(x, affine3(kind), pixdim, mode=mode, padding_mode=padding_mode, align_corners=ac)
        assert out.abs().max() > 0.1  # real data, not an all-cval box


def test_spacing_3d_odd_size_and_mixed(backend):
    x = image((17, 20, 13), channels=1, seed=3)
    check_spacing(x, affine3("oblique", (0.8, 0.8, 2.5)), (1.1, 0.6, 1.5), mode=3, padding_mode="border")
    check_spacing(x, affine3("lps", (0.8, 0.8, 2.5)), (1.1, 0.6, 1.5), mode="bilinear", padding_mode="zeros")


@pytest.mark.parametrize("mode,padding_mode", [("bilinear", "border"), ("nearest", "zeros"), (1, "zeros"),
                                               (3, "reflect"), (3, "nearest"), (0, "mirror")])
def test_spacing_float32_compute(backend, mode, padding_mode):
    """dtype=float32: MONAI computes grid and samples in float32; agreement to float32 rounding."""
    x = image((11, 13, 9), seed=5)
    check_spacing(x, affine3("oblique"), (1.33, 0.83, 2.03), atol=2e-5, mode=mode, padding_mode=padding_mode,
                  dtype=np.float32)


def test_spacing_nearest_ties(backend):
    """2x upsampling with 'nearest': every other coordinate is an exact .5 tie. We round half to even
    (grid_sample's rule) on the exact coordinate; MONAI's float round-off in its normalised grid
    sends some ties either way (here 3.5 -> 3), so there it may take either neighbour."""
    idx = torch.arange(30.0).reshape(1, 6, 5)
    a = np.eye(4)
    a[:2, 3] = (3.0, 4.0)
    ref = run_monai(idx, a, (0.5, 0.5), mode="nearest")[0].as_tensor()
    out = run_ours(idx, a, (0.5, 0.5), mode="nearest")[0].as_tensor()
    i, j = torch.meshgrid(torch.arange(11.0), torch.arange(9.0), indexing="ij")
    want = 5 * torch.round(i / 2) + torch.round(j / 2)  # torch.round: half to even
    assert torch.equal(out, want)
    lo = 5 * torch.floor(i / 2) + torch.floor(j / 2)
    hi = 5 * torch.ceil(i / 2) + torch.ceil(j / 2)
    tie = (i % 2 == 1) | (j % 2 == 1)
    assert torch.equal(ref[~tie], out[~tie])
    assert bool(((ref == lo) | (ref == hi) | (ref == 5 * torch.floor(i / 2) + torch.ceil(j / 2)) |
                 (ref == 5 * torch.ceil(i / 2) + torch.floor(j / 2)))[tie].all())


# ------------------------------------------------------------------------------------------------
# MONAI Spacing, 2D

MODES_2D = [("bilinear", "border"), ("bilinear", "zeros"), ("bilinear", "reflection"), ("nearest", "border"),
            ("nearest", "reflection"), (0, "nearest"), (1, "constant"), (3, "reflect"), (3, "nearest"),
            (3, "grid-constant"), (3, "mirror")]


@pytest.mark.parametrize("mode,padding_mode", MODES_2D)
@pytest.mark.parametrize("backend,kind", BACKEND_KIND, indirect=["backend"])
def test_spacing_2d_matches_monai(backend, mode, padding_mode, kind):
    x = image((17, 20), channels=3, seed=1)
    a3 = affine2(kind)
    a4 = np.eye(4)  # NIfTI stores a 2D image's affine as 4x4
    a4[:2, :2], a4[:2, 3] = a3[:2, :2], a3[:2, 2]
    for ac in (False, True):
        for pixdim in ((1.7, 0.6), (2.0, 2.0)):
            check_spacing(x, a4, pixdim, mode=mode, padding_mode=padding_mode, align_corners=ac)
            check_spacing(x, a3, pixdim, mode=mode, padding_mode=padding_mode, align_corners=ac)


def test_bicubic_is_refused_not_approximated():
    x = image((8, 9), channels=1)
    assert run_monai(x, np.eye(3), (0.7, 0.7), mode="bicubic").shape[1:] == (11, 12)  # MONAI: Keys cubic, 2D only
    with pytest.raises(NotImplementedError, match="Keys"):
        T.Spacing((0.7, 0.7), mode="bicubic")(x)
    with pytest.raises(NotImplementedError, match="Keys"):
        T.Spacing((0.7, 0.7))(x, mode="bicubic")
    with pytest.raises(NotImplementedError, match="Keys"):
        T.Spacing((0.7, 0.7))(x, mode="3")  # MONAI maps the string "3" to grid_sample bicubic


# ------------------------------------------------------------------------------------------------
# Spacing options


@pytest.mark.parametrize("kind", ["diag", "oblique"])
@pytest.mark.parametrize("opts", [
    dict(scale_extent=True, align_corners=True),
    dict(scale_extent=True, align_corners=False),
    dict(diagonal=True),
    dict(diagonal=True, mode="nearest", padding_mode="zeros"),
    dict(min_pixdim=(0.9, 1.0, 1.0), max_pixdim=(1.1, 2.0, 1.8)),   # dims already within range are kept
    dict(min_pixdim=1.1),                                           # scalar: first dim only (MONAI)
    dict(max_pixdim=(1.5, 1.5, 1.5)),
    dict(recompute_affine=True),
    dict(recompute_affine=True, align_corners=True),
    dict(mode=3, padding_mode="nearest", scale_extent=True, align_corners=True),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_spacing_options_match_monai(backend, kind, opts):
    x = image((11, 13, 9), seed=4)
    check_spacing(x, affine3(kind), (1.4, 0.8, 2.2), **opts)


def test_spacing_pixdim_forms(backend):
    x = image((11, 13, 9), seed=6)
    a = affine3("lps")
    for pixdim in [(1.4, -1, 2.0), (0.0, 1.1, 0.0), 1.3, (1.3, 2.0), (1.0, 1.5, 2.0, 7.0)]:
        check_spacing(x, a, pixdim, mode="bilinear")


def test_spacing_call_overrides(backend):
    x = image((11, 13, 9), seed=7)
    a = affine3("oblique")
    for call in [dict(mode="nearest"), dict(padding_mode="zeros", align_corners=True), dict(mode=1, dtype=np.float32),
                 dict(scale_extent=True, align_corners=True), dict(output_spatial_shape=(9, -1, 12))]:
        check_spacing(x, a, (1.2, 1.7, 0.9), call_kw=call, atol=2e-5)
    # an int output_spatial_shape breaks MONAI (it infers a 1D rank); we apply it to every dim
    assert T.Spacing((1.2, 1.7, 0.9))(MetaTensor(x, affine=torch.as_tensor(a)),
                                      output_spatial_shape=10).shape == (2, 10, 10, 10)


def test_spacing_unchanged_returns_input(backend):
    """Same spacing: MONAI skips resampling (affine kept, values cast to float32); so do we."""
    x = image((11, 13, 9), seed=8, dtype=torch.float64)
    a = affine3("oblique", (1.0, 1.2, 1.7))
    ref = run_monai(x, a, (1.0, 1.2, 1.7))
    out = run_ours(x, a, (1.0, 1.2, 1.7))
    assert torch.equal(out.as_tensor(), ref.as_tensor()) and torch.equal(out.affine, ref.affine)
    assert torch.equal(out.as_tensor(), x.float())


def test_spacing_integer_and_label_input(backend):
    g = torch.Generator().manual_seed(9)
    lab = torch.randint(0, 5, (1, 11, 13, 9), generator=g).to(torch.uint8)
    out, ref = check_spacing(lab, affine3("oblique"), (1.3, 0.7, 2.1), mode="nearest")
    assert set(out.unique().tolist()) <= set(range(5))
    # a whole face lies exactly on the input's edge (scipy 'constant'): MONAI's round-off keeps it inside too
    out, ref = run_ours(lab, affine3("diag"), (1.3, 0.7, 2.1), mode=1, padding_mode="zeros"), \
        run_monai(lab, affine3("diag"), (1.3, 0.7, 2.1), mode=1, padding_mode="zeros")
    assert_values(out, ref)


def test_spacing_meta_plain_and_numpy_inputs(backend):
    x = image((11, 13, 9), seed=10)
    a = affine3("lps")
    mt = MetaTensor(x.clone(), affine=torch.as_tensor(a), meta={"pixdim": np.array([1.0, 1, 1.2, 1.7, 1, 1, 1, 1]),
                                                                "filename_or_obj": "x.nii.gz", "extra": 5})
    ref = MSpacing((1.5, 1.5, 1.5))(mt.clone())
    out = T.Spacing((1.5, 1.5, 1.5))(mt.clone())
    assert out.meta["extra"] == 5 and out.meta["filename_or_obj"] == "x.nii.gz"
    np.testing.assert_allclose(np.asarray(out.meta["pixdim"]), np.asarray(ref.meta["pixdim"]), rtol=1e-12)
    assert out.meta["pixdim"][1] == pytest.approx(1.5) and mt.meta["pixdim"][1] == 1.0  # input meta untouched
    # plain tensor (identity affine, MONAI warns) and ndarray: MONAI returns a MetaTensor, so do we
    ref = MSpacing((0.8, 1.3, 2.0))(x.clone())
    for inp in (x.clone(), x.numpy().copy()):
        out = T.Spacing((0.8, 1.3, 2.0))(inp)
        assert type(out) is MetaTensor
        torch.testing.assert_close(out.affine, ref.affine, atol=1e-12, rtol=0)
        assert_values(out, ref)
    # plain tensor with an explicit affine, and return_affine
    ref = run_monai(x, a, (0.8, 1.3, 2.0))
    out, aff = T.Spacing((0.8, 1.3, 2.0))(x.clone(), affine=a, return_affine=True)
    assert isinstance(aff, np.ndarray)
    np.testing.assert_allclose(aff, ref.affine.numpy(), atol=1e-12)
    assert_values(out, ref)


def test_resample_to_spacing(backend):
    x = image((11, 13, 9), seed=11)
    a = affine3("oblique")
    ref = run_monai(x, a, (1.2, 0.9, 2.0), mode=3, padding_mode="nearest", dtype=np.float32)
    out, aff = T.resample_to_spacing(x, torch.as_tensor(a), (1.2, 0.9, 2.0), mode=3, padding_mode="nearest")
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and aff.dtype == torch.float64
    torch.testing.assert_close(aff, ref.affine, atol=1e-12, rtol=0)
    assert_values(out, ref, atol=3e-5, rtol=3e-5)
    out_np, aff_np = T.resample_to_spacing(x.numpy(), a, (1.2, 0.9, 2.0), mode=3, padding_mode="nearest",
                                           dtype=torch.float64)
    assert isinstance(out_np, np.ndarray) and isinstance(aff_np, np.ndarray)
    assert_values(out_np, run_monai(x, a, (1.2, 0.9, 2.0), mode=3, padding_mode="nearest"))


def test_spacingd_matches_monai(backend):
    x = image((11, 13, 9), channels=1, seed=12)
    g = torch.Generator().manual_seed(13)
    lab = torch.randint(0, 4, (1, 11, 13, 9), generator=g).float()
    a = torch.as_tensor(affine3("oblique"))

    def data():
        return {"img": MetaTensor(x.clone(), affine=a.clone()), "seg": MetaTensor(lab.clone(), affine=a.clone()),
                "other": 7}

    kw = dict(keys=("img", "seg"), pixdim=(1.3, 0.8, 2.2), mode=("bilinear", "nearest"),
              padding_mode=("border", "zeros"))
    ref = MSpacingd(**kw)(data())
    out = T.Spacingd(**kw)(data())
    assert out["other"] == 7
    for k in ("img", "seg"):
        assert type(out[k]) is MetaTensor and out[k].shape == ref[k].shape
        torch.testing.assert_close(out[k].affine, ref[k].affine, atol=1e-12, rtol=0)
        assert_values(out[k], ref[k])
    with pytest.raises(KeyError):
        T.Spacingd(keys=("img", "nope"), pixdim=1.0)(data())
    assert set(T.Spacingd(keys=("img", "nope"), pixdim=1.0, allow_missing_keys=True)(data())) == {"img", "seg",
                                                                                                   "other"}


# ------------------------------------------------------------------------------------------------
# scipy.ndimage


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode", ["constant", "grid-constant", "nearest", "reflect", "grid-mirror", "mirror"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_transform_matches_scipy(backend, order, mode, ndim):
    rng = np.random.default_rng(order * 10 + ndim)
    shape = (13, 11, 9)[:ndim]
    x = rng.standard_normal(shape)
    m = np.eye(ndim) * 0.8 + rng.uniform(-0.15, 0.15, (ndim, ndim))
    off = rng.uniform(-2.0, 1.0, ndim)
    out_shape = (15, 12, 10)[:ndim]
    theta = np.concatenate([m, off[:, None]], 1)
    # scipy evaluated at exactly the coordinates the kernel gets
    coords = _coords(theta, out_shape)
    for prefilter in ((True, False) if order == 3 else (True,)):
        ref = ndi.map_coordinates(x, coords, order=order, mode=mode, cval=1.5, prefilter=prefilter).reshape(out_shape)
        out = T.affine_transform(x, m, off, output_shape=out_shape, order=order, mode=mode, cval=1.5,
                                 prefilter=prefilter)
        assert out.dtype == np.float64
        tol = 5e-9 if mode in ("reflect", "grid-mirror") and order == 3 and prefilter else 1e-12  # scipy approx.
        fr = _fragile(theta, shape, out_shape, [order] * ndim, mode == "constant")
        assert_values(out, ref, fr, atol=tol, rtol=tol)
        # scipy's own affine_transform agrees away from ties
        ref2 = ndi.affine_transform(x, m, off, output_shape=out_shape, order=order, mode=mode, cval=1.5,
                                    prefilter=prefilter)
        assert_values(out, ref2, fr, atol=tol, rtol=tol)
    # matrix forms: homogeneous and (ndim, ndim + 1)
    h = np.eye(ndim + 1)
    h[:ndim] = theta
    for mat in (h, theta):
        out2 = T.affine_transform(torch.from_numpy(x), torch.from_numpy(mat), output_shape=out_shape, order=order,
                                  mode=mode, cval=1.5)
        torch.testing.assert_close(out2, torch.from_numpy(T.affine_transform(x, m, off, output_shape=out_shape,
                                                                             order=order, mode=mode, cval=1.5)))


def test_affine_transform_float32_and_zoom(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 10, 8)).astype(np.float32)
    # a pure zoom with exactly representable scale: scipy's zoom(grid_mode) = our diagonal theta
    ref = ndi.zoom(x.astype(np.float64), 2.0, order=3, mode="nearest", grid_mode=True)
    out = T.affine_transform(x, [0.5, 0.5, 0.5], -0.25, output_shape=ref.shape, order=3, mode="nearest",
                             compute_dtype=torch.float32)
    assert out.dtype == np.float32
    assert_values(out, ref, atol=3e-5, rtol=3e-5)


# ------------------------------------------------------------------------------------------------
# nnU-Net v2 (transcribed with scipy; skimage.resize(order, mode='edge', anti_aliasing=False) is
# scipy.ndimage.zoom(grid_mode=True, mode='nearest') followed by clipping to the input's range)


def _sk_resize(img, new_shape, order):
    out = ndi.zoom(img.astype(np.float64), [n / o for n, o in zip(new_shape, img.shape)], order=order, mode="nearest",
                   grid_mode=True)
    assert out.shape == tuple(new_shape)
    return np.clip(out, img.min(), img.max())


def _resize_segmentation(seg, new_shape, order):
    if order == 0:
        return _sk_resize(seg.astype(float), new_shape, 0).astype(seg.dtype)
    res = np.zeros(new_shape, dtype=seg.dtype)
    for c in np.unique(seg):
        res[_sk_resize((seg == c).astype(float), new_shape, order) >= 0.5] = c
    return res


def nnunet_reference(data, new_shape, is_seg, axis, order, do_separate_z, order_z):
    """nnU-Net v2's resample_data_or_seg (the separate-z scheme as intended: slices along ``axis``)."""
    resize_fn = _resize_segmentation if is_seg else _sk_resize
    shape, new_shape = np.array(data[0].shape), np.array(new_shape)
    if not np.any(shape != new_shape):
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    data = data.astype(float)
    if not do_separate_z:
        for c in range(data.shape[0]):
            out[c] = resize_fn(data[c], new_shape, order)
        return out
    new_2d = [new_shape[d] for d in range(3) if d != axis]
    for c in range(data.shape[0]):
        here = np.stack([resize_fn(np.take(data[c], s, axis), new_2d, order) for s in range(shape[axis])], axis)
        if shape[axis] == new_shape[axis]:
            out[c] = here
            continue
        scale = [h / n for h, n in zip(here.shape, new_shape)]
        grid = np.mgrid[:new_shape[0], :new_shape[1], :new_shape[2]].astype(float)
        coords = np.array([scale[d] * (grid[d] + 0.5) - 0.5 for d in range(3)])
        if not is_seg or order_z == 0:
            out[c] = ndi.map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            for cl in np.sort(np.unique(here)):
                out[c][np.round(ndi.map_coordinates((here == cl).astype(float), coords, order=order_z,
                                                    mode="nearest")) > 0.5] = cl
    return out


NNUNET_CASES = [
    # (shape, current_spacing, new_spacing, order, order_z, force_separate_z)  -- ratios exact in binary
    ((12, 16, 10), (1.0, 1.0, 1.0), (2.0, 0.5, 1.25), 3, 0, None),     # isotropic: plain 3D resize
    ((12, 16, 10), (1.0, 1.0, 1.0), (0.5, 2.0, 1.0), 1, 0, None),
    ((6, 16, 12), (4.0, 1.0, 1.0), (2.0, 0.5, 2.0), 3, 0, None),      # anisotropic axis 0: separate z
    ((6, 16, 12), (4.0, 1.0, 1.0), (2.0, 0.5, 2.0), 3, 1, None),      # order_z 1: two passes
    ((16, 12, 6), (1.0, 1.0, 4.0), (0.5, 2.0, 2.0), 3, 0, None),      # axis 2
    ((16, 12, 6), (1.0, 1.0, 4.0), (0.5, 2.0, 4.0), 3, 0, None),      # axis kept: in-plane only
    ((12, 16, 10), (1.0, 1.0, 1.25), (2.0, 0.5, 1.0), 3, 0, True),    # forced
    ((8, 16, 12), (4.0, 1.0, 1.0), (2.0, 2.0, 0.5), 1, 0, False),     # forced off
]


@pytest.mark.parametrize("case", NNUNET_CASES)
def test_nnunet_data_matches_transcription(backend, case):
    shape, cur, new, order, order_z, force = case
    rng = np.random.default_rng(sum(shape))
    data = rng.standard_normal((2, *shape)).astype(np.float32)
    do_sep, axis = T.nnunet_separate_z(cur, new, force)
    new_shape = T.nnunet_new_shape(shape, cur, new)
    ref = nnunet_reference(data, new_shape, False, axis, order, do_sep, order_z)
    out = T.resample_nnunet(data, cur, new, order=order, order_z=order_z, force_separate_z=force,
                            compute_dtype=torch.float64)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
    out32 = T.resample_nnunet(torch.from_numpy(data), cur, new, order=order, order_z=order_z, force_separate_z=force)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, atol=3e-5, rtol=3e-5)
    # clipping is real: cubic overshoot exists before it
    if order == 3:
        assert out.max() <= data.max() and out.min() >= data.min()


@pytest.mark.parametrize("case", NNUNET_CASES)
@pytest.mark.parametrize("seg_order", [1, 0])
def test_nnunet_seg_matches_per_label_loop(backend, case, seg_order):
    """out='labels' (one pass, no one-hot) against resize_segmentation's one-hot loop."""
    shape, cur, new, _, order_z, force = case
    rng = np.random.default_rng(len(shape) + sum(shape))
    seg = ndi.zoom(rng.integers(0, 4, (1, 4, 4, 4)).astype(np.int16), [1, *(s / 4 for s in shape)], order=0,
                   grid_mode=True, mode="nearest")  # blobs, not salt-and-pepper
    seg[0, 0, 0, 0] = -1  # nnU-Net's ignore / negative labels survive
    do_sep, axis = T.nnunet_separate_z(cur, new, force)
    new_shape = T.nnunet_new_shape(shape, cur, new)
    ref = nnunet_reference(seg, new_shape, True, axis, seg_order, do_sep, order_z)
    out = T.resample_nnunet(seg, cur, new, is_seg=True, order=seg_order, order_z=order_z, force_separate_z=force)
    assert out.dtype == np.int16 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(out)) >= 3


TIE_CASES = [
    # ratios not exact in binary, where sample points fall exactly half-way between voxels (found by
    # review: folding (i + 0.5) * s - 0.5 into s * i + t rounded those ties the other way)
    ((2, 4, 6), (1.0, 1.0, 1.0), (1.0, 2 / 3, 1.0), 1, 0, None),
    ((12, 9, 10), (1.0, 1.0, 1.0), (4 / 3, 0.75, 10 / 13), 1, 0, None),
    ((10, 6, 9), (3.0, 1.0, 1.0), (3 * 10 / 13, 0.6, 1.5), 1, 1, None),   # separate z, order_z 1
    ((10, 6, 9), (3.0, 1.0, 1.0), (3 * 10 / 13, 0.6, 1.5), 0, 0, None),
]


@pytest.mark.parametrize("case", TIE_CASES)
def test_nnunet_exact_at_half_way_ties(backend, case):
    shape, cur, new, order, order_z, force = case
    rng = np.random.default_rng(7)
    seg = rng.integers(0, 3, (1, *shape)).astype(np.int16)
    img = rng.standard_normal((1, *shape)).astype(np.float32)
    do_sep, axis = T.nnunet_separate_z(cur, new, force)
    new_shape = T.nnunet_new_shape(shape, cur, new)
    for cd in (torch.float32, torch.float64):
        ref = nnunet_reference(seg, new_shape, True, axis, order, do_sep, order_z)
        out = T.resample_nnunet(seg, cur, new, is_seg=True, order=order, order_z=order_z, force_separate_z=force,
                                compute_dtype=cd)
        np.testing.assert_array_equal(out, ref)
    ref = nnunet_reference(img, new_shape, False, axis, order, do_sep, order_z)
    out = T.resample_nnunet(img, cur, new, order=order, order_z=order_z, force_separate_z=force,
                            compute_dtype=torch.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # the smallest case by hand: labels [0, 1] to 3 voxels, the middle one's indicator exactly 0.5
    two = np.array([0, 1], dtype=np.uint8).reshape(1, 1, 1, 2)
    got = T.resample_nnunet(two, (1, 1, 1), (1, 1, 1), is_seg=True, order=1, new_shape=(1, 1, 3))
    assert np.asarray(got).ravel().tolist() == [0, 1, 1]


def test_nnunet_labels_op_vs_one_hot_argmaxless_loop(backend):
    """The op's out='labels' directly, against interpolating each label's indicator and thresholding
    at 0.5 in label order (later labels win, else cval), for orders 0 and 1 in 2D and 3D."""
    from fastmed.ops import resample as R
    g = torch.Generator().manual_seed(3)
    for shape, theta in [((9, 11), torch.tensor([[0.71, 0.13, -0.31], [-0.07, 1.29, 0.43]], dtype=torch.float64)),
                         ((7, 9, 8), torch.tensor([[0.61, 0, 0, 0.13], [0, 0.83, 0.11, -0.23], [0, 0, 1.21, 0.37]],
                                                  dtype=torch.float64))]:
        seg = torch.randint(0, 3, (1, 1, *shape), generator=g).to(torch.int16) * 2 + 1
        out_shape = [s + 3 for s in shape]
        for orders in ([1] * len(shape), [1] * (len(shape) - 1) + [0]):
            for pad in ("border", "zeros"):
                labels = seg.unique().tolist()
                res = T._sample(seg, theta, out_shape, orders, pad, 0.0, True, torch.int16, torch.float64,
                                "labels", labels)
                ref = torch.zeros((1, 1, *out_shape), dtype=torch.int16)
                tie = torch.zeros((1, 1, *out_shape), dtype=torch.bool)
                for lab in labels:
                    ind = R.resample_reference((seg == lab).double(), theta, out_shape, orders, pad, 0.0, True)
                    ref[ind >= 0.5] = lab
                    tie |= (ind - 0.5).abs() < 1e-9  # an indicator of exactly 0.5: round-off decides
                assert tie.float().mean() < 0.02
                assert torch.equal(res.cpu()[~tie], ref[~tie])
                assert {0, 1, 3, 5} >= set(ref.unique().tolist()) >= {1, 3, 5}  # 0: no label reaches 0.5


def test_nnunet_shape_unchanged_and_new_shape(backend):
    data = np.random.default_rng(0).standard_normal((1, 8, 9, 10)).astype(np.float32)
    assert T.resample_nnunet(data, (1, 1, 1), (1, 1, 1)) is data
    ref = nnunet_reference(data, (16, 9, 5), False, None, 3, False, 0)
    out = T.resample_nnunet(data, (1, 1, 1), (1, 1, 1), new_shape=(16, 9, 5), compute_dtype=torch.float64)
    np.testing.assert_allclose(out, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# logits -> labels


def test_resample_argmax_equals_resample_then_argmax(backend):
    g = torch.Generator().manual_seed(21)
    logits = torch.randn((4, 9, 11, 8), generator=g)
    a_small = affine3("oblique", (1.6, 1.6, 2.0))
    a_big = affine3("oblique", (1.05, 1.23, 1.71))  # no exact .5 coordinates for "nearest"
    for mode, pad in (("bilinear", "border"), ("nearest", "zeros"), (1, "nearest"), (3, "reflect")):
        src = MetaTensor(logits.clone(), affine=torch.as_tensor(a_small))
        vals = MSpatialResample(mode=mode, padding_mode=pad)(src, dst_affine=torch.as_tensor(a_big),
                                                               spatial_size=(13, 15, 9))
        lab = T.resample_argmax(logits, (13, 15, 9), a_small, a_big, mode=mode, padding_mode=pad,
                                dtype=torch.float64)
        assert lab.dtype == torch.uint8 and lab.shape == (1, 13, 15, 9)
        ref = vals.as_tensor().argmax(0, keepdim=True)
        top2 = vals.as_tensor().topk(2, 0).values
        gap = top2[0] - top2[1]
        clear = (gap > 1e-5) | (gap == 0)  # skip near-ties between channels; exact ties go to the first
        assert clear.float().mean() > 0.97
        assert torch.equal(lab[clear[None]].long(), ref[clear[None]])
    # batched input with a theta, and our own values path then argmax
    th = np.array([[0.7, 0.05, 0, 0.2], [0, 0.8, 0.1, -0.4], [0.02, 0, 0.9, 0.3]])
    batch = torch.randn((2, 5, 9, 11, 8), generator=g)
    lab = T.resample_argmax(batch, (12, 14, 9), theta=th, mode="bilinear", padding_mode="zeros")
    assert lab.shape == (2, 1, 12, 14, 9)
    plan = T._monai_plan("bilinear", "zeros", False, 3)
    vals = T._run(batch, th, (12, 14, 9), plan, torch.float32)
    assert torch.equal(lab.long(), vals.argmax(1, keepdim=True))


def test_resample_argmax_many_classes_int16(backend):
    g = torch.Generator().manual_seed(22)
    logits = torch.randn((300, 5, 6), generator=g)
    th = np.array([[0.8, 0.0, 0.3], [0.0, 0.9, -0.2]])
    lab = T.resample_argmax(logits, (6, 7), theta=th)
    assert lab.dtype == torch.int16 and int(lab.max()) > 255
    vals = T._run(logits, th, (6, 7), T._monai_plan("bilinear", "border", False, 2), torch.float32)
    assert torch.equal(lab.long(), vals.argmax(0, keepdim=True))
    with pytest.raises(ValueError, match="cannot hold 300"):
        T.resample_argmax(logits, (6, 7), theta=th, out_dtype=torch.uint8)


def test_nnunet_logits_argmax(backend):
    """nnU-Net export: logits resampled with order 1 (order_z 0) to the original shape, then argmax."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 6, 16, 12)).astype(np.float32)
    new_shape = (24, 8, 12)
    vals = T.resample_nnunet(logits, (2.0, 0.5, 0.5), (4.0, 1.0, 0.5), order=1, new_shape=new_shape,
                             compute_dtype=torch.float64)
    ref = nnunet_reference(logits, new_shape, False, 0, 1, True, 0)
    np.testing.assert_allclose(vals, ref, atol=1e-6)
    lab = T.resample_nnunet(logits, (2.0, 0.5, 0.5), (4.0, 1.0, 0.5), order=1, new_shape=new_shape, out="argmax",
                            compute_dtype=torch.float64)
    assert lab.dtype == np.uint8 and lab.shape == (1, *new_shape)
    np.testing.assert_array_equal(lab[0], ref.argmax(0))


def test_fallback_to_reference_warns(monkeypatch):
    """A build without the kernel falls back to the float64 reference, once warned, with the same result."""
    x = image((7, 8, 6), seed=30)
    want = T.resample_to_spacing(x, affine3("oblique"), (1.3, 0.9, 2.0), mode=1, padding_mode="zeros")[0]
    monkeypatch.setattr(T, "_kernel_available", lambda device: False)
    monkeypatch.setattr(T, "_FORCE_BACKEND", None)
    monkeypatch.setattr(T, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="without the resample kernel"):
        got = T.resample_to_spacing(x, affine3("oblique"), (1.3, 0.9, 2.0), mode=1, padding_mode="zeros")[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kw", [{"mode": "bilinear"}, {"mode": "nearest"}, {"mode": "bilinear", "align_corners": True},
                                {"mode": "bilinear", "padding_mode": "zeros"}])
def test_spacing_gradient_equals_monai(kw):
    """MONAI's grid_sample path is differentiable in the image; fastmed's Spacing too (same gradient)."""
    torch.manual_seed(31)
    aff = torch.as_tensor(np.diag([1.5, 0.8, 2.5, 1.0]))
    x = torch.randn(2, 17, 15, 11)
    grads = []
    for cls in (MSpacing, T.Spacing):
        xx = x.clone().requires_grad_()
        y = cls((1.0, 1.2, 1.7), **kw)(MetaTensor(xx, affine=aff))
        (y.as_tensor() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append(xx.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_pixdim_and_affine():
    x = image((6, 7, 5))
    for bad in ((float("inf"), 1, 1), (1.0, -float("inf"), 1.0)):
        with pytest.raises(ValueError, match="pixdim"):
            T.Spacing(bad)
        with pytest.raises(ValueError, match="pixdim"):
            T.resample_to_spacing(x, np.eye(4), bad)
    # NaN (what MONAI makes of None) keeps the input spacing, as an entry <= 0 does
    assert T.resample_to_spacing(x, np.eye(4), (1.0, float("nan"), 0.5))[0].shape == \
        T.resample_to_spacing(x, np.eye(4), (1.0, 0.0, 0.5))[0].shape
    with pytest.raises(ValueError, match="min_pixdim"):
        T.Spacing(1.0, min_pixdim=2.0, max_pixdim=1.0)
    sing = np.eye(4)
    sing[1, 1] = 0.0
    with pytest.raises(ValueError, match="affine is singular"):
        T.resample_to_spacing(x, sing, 1.0)
    with pytest.raises(ValueError, match="affine must be finite"):
        T.resample_to_spacing(x, np.full((4, 4), np.nan), 1.0)
    with pytest.raises(ValueError, match="affine must be a square"):
        T.resample_to_spacing(x, np.eye(4)[:3], 1.0)
    with pytest.raises(ValueError, match="data_array.affine"):
        T.Spacing(1.0)(MetaTensor(x, affine=torch.full((4, 4), float("inf"))))
    with pytest.raises(ValueError, match="src_affine is singular"):
        T.resample_argmax(x, (4, 4, 4), np.zeros((4, 4)), np.eye(4))


def test_bad_dims_modes_and_channels():
    with pytest.raises(ValueError, match="image must be channel-first"):
        T.resample_to_spacing(torch.zeros(5, 6), np.eye(4), 1.0)  # one spatial dim
    with pytest.raises(ValueError, match="image must be channel-first"):
        T.resample_to_spacing(torch.zeros(1, 2, 3, 4, 5), np.eye(4), 1.0)
    with pytest.raises(ValueError, match="image must not be empty"):
        T.resample_to_spacing(torch.zeros(1, 0, 3, 4), np.eye(4), 1.0)
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        T.resample_to_spacing([[1.0]], np.eye(4), 1.0)
    x = MetaTensor(image((6, 7, 5)), affine=torch.eye(4, dtype=torch.float64))
    # refused when used (as MONAI checks them): a call may override them, and a call that resamples
    # nothing does not use them
    for order in (2, 4, 5):
        with pytest.raises(NotImplementedError, match=f"spline order {order}"):
            T.Spacing(0.5, mode=order)(x)
    for pm in ("wrap", "grid-wrap"):
        with pytest.raises(NotImplementedError, match="periodic"):
            T.Spacing(0.5, mode=1, padding_mode=pm)(x)
    with pytest.raises(ValueError, match="mode"):
        T.Spacing(0.5, mode="area")(x)
    with pytest.raises(ValueError, match="padding_mode"):
        T.Spacing(0.5, padding_mode="mirror")(x)  # not a grid_sample mode, and MONAI does not map it
    with pytest.raises(ValueError, match="spline order must be 0-5"):
        T.Spacing(0.5, mode=7)(x)
    with pytest.raises(ValueError, match="padding_mode"):
        T.Spacingd("a", 0.5, padding_mode=["mirror"])({"a": x})
    with pytest.raises(NotImplementedError, match="lazy"):
        T.Spacing(1.0, lazy=True)
    with pytest.raises(ValueError, match="logits must be"):
        T.resample_argmax(torch.zeros(2, 3, 4), (4, 4, 4), theta=np.eye(4))
    with pytest.raises(ValueError, match="logits must not be empty"):
        T.resample_argmax(torch.zeros(0, 3, 4, 5), (4, 4, 4), theta=np.eye(4))
    with pytest.raises(ValueError, match="theta must be"):
        T.resample_argmax(x, (4, 4, 4), theta=np.eye(3))
    with pytest.raises(ValueError, match="either theta or"):
        T.resample_argmax(x, (4, 4, 4), np.eye(4), np.eye(4), theta=np.eye(4))
    with pytest.raises(ValueError, match="data must be \\(C, x, y, z\\)"):
        T.resample_nnunet(np.zeros((4, 5, 6)), (1, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match="is_seg"):
        T.resample_nnunet(np.zeros((1, 4, 5, 6)), (1, 1, 1), (2, 2, 2), is_seg=True, out="argmax")
    with pytest.raises(ValueError, match="must hold integer labels"):
        T.resample_nnunet(np.full((1, 4, 5, 6), 0.5), (1, 1, 1), (2, 2, 2), is_seg=True)
    with pytest.raises(ValueError, match="output_spatial_shape"):
        T.Spacing(1.5)(x, output_spatial_shape=(3, 4))
    with pytest.raises(ValueError, match="matrix must be"):
        T.affine_transform(np.zeros((4, 5)), np.eye(4))


@pytest.mark.parametrize("bad", [(0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, float("nan"), 1.0), (1.0, 1.0),
                                 (1.0, float("inf"), 2.0)])
def test_bad_nnunet_spacing(bad):
    data = np.zeros((1, 4, 5, 6), np.float32)
    with pytest.raises(ValueError, match="current_spacing"):
        T.resample_nnunet(data, bad, (1, 1, 1))
    with pytest.raises(ValueError, match="new_spacing"):
        T.resample_nnunet(data, (1, 1, 1), bad)


def test_memory_limit_refuses_with_bytes():
    x = image((6, 7, 5), channels=2)
    # 1mm -> 0.1mm: (2, 51, 61, 41) float32 output
    need = 2 * 51 * 61 * 41 * 4
    with pytest.raises(MemoryError, match=f"would need {need} bytes"):
        T.resample_to_spacing(x, np.eye(4), 0.1, memory_limit=need - 1)
    with pytest.raises(ValueError, match="memory_limit=1000 bytes"):
        T.Spacing(0.1, memory_limit=1000)(x)
    with pytest.raises(T.MemoryLimitError, match="workspace"):  # cubic: coefficients count too
        T.resample_to_spacing(x, np.eye(4), 0.1, mode=3, memory_limit=need + 10)
    with pytest.raises(MemoryError, match="bytes"):
        T.resample_nnunet(np.zeros((1, 8, 8, 8), np.float32), (1, 1, 1), (0.1, 0.1, 0.1), memory_limit=10 ** 5)
    with pytest.raises(MemoryError, match="bytes"):
        T.resample_argmax(torch.zeros(3, 8, 8, 8), (100, 100, 100), theta=np.eye(4), memory_limit=10 ** 5)
    with pytest.raises(ValueError, match="memory_limit must be"):
        T.resample_to_spacing(x, np.eye(4), 1.5, memory_limit=-5)


# ------------------------------------------------------------------------------------------------
# cases a differential fuzz against MONAI 1.6.1 and scipy found (18th session)


@pytest.mark.parametrize("dt", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("mode", [1, 3])
def test_spacing_integer_image_with_dtype_none_rounds_as_monai(dt, mode):
    """dtype=None on an integer image: MONAI resamples in the image's dtype (scipy rounds the
    integer output), and returns float32. Values equal except at exact .5 ties, which the two
    float64 computations may break apart."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 120, (1, 9, 8, 7), generator=g).to(dt)
    A = torch.diag(torch.tensor([1.0, 0.9, 1.3, 1.0], dtype=torch.float64))
    kw = dict(pixdim=(0.7, 1.1, 0.8), mode=mode, padding_mode="border", dtype=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MSpacing(**kw)(MetaTensor(x.clone(), affine=A)).as_tensor()
    f = T.Spacing(**kw)(MetaTensor(x.clone(), affine=A)).as_tensor()
    assert f.dtype == m.dtype == torch.float32 and f.shape == m.shape
    assert torch.equal(f, f.round())  # integer values
    assert (f != m).sum() <= 0.01 * f.numel() and (f - m).abs().max() <= 1
    f32 = T.Spacing(**dict(kw, dtype=np.float32))(MetaTensor(x.clone(), affine=A)).as_tensor()
    assert not torch.equal(f32, f32.round())  # with a float dtype nothing is rounded


def test_spacing_pixdim_none_entries_keep_the_input_spacing_as_monai():
    A = torch.diag(torch.tensor([0.7, 0.7, 5.0, 1.0], dtype=torch.float64))
    x = torch.rand(1, 10, 10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MSpacing(pixdim=(1.5, None, None))(MetaTensor(x.clone(), affine=A))
    f = T.Spacing(pixdim=(1.5, None, None))(MetaTensor(x.clone(), affine=A))
    assert f.shape == m.shape == (1, 5, 10, 4)
    np.testing.assert_allclose(np.asarray(f.affine), np.asarray(m.affine), atol=1e-12)
    torch.testing.assert_close(f.as_tensor(), m.as_tensor(), rtol=1e-5, atol=1e-5)
    for make in (lambda: T.Spacing(pixdim=(1.5, float("inf"), 1.0)),
                 lambda: T.spacing_geometry((4, 4, 4), np.eye(4), (1.5, float("inf"), 1.0))):
        with pytest.raises(ValueError, match="pixdim must not be infinite"):
            make()
    with pytest.raises(ValueError, match="pixdim.*too small|pixdim.*cannot be sampled"):
        T.Spacing(pixdim=1e-300)(torch.rand(1, 4, 4, 4), affine=torch.eye(4))


def test_complex_input_and_wide_labels_are_refused():
    z = np.array([[1 + 2j, 3 + 4j], [5 + 6j, 7 + 8j]])
    with pytest.raises(TypeError, match="input: complex"):
        T.affine_transform(z, np.eye(2), order=1)
    seg = np.array([0, 2 ** 40]).repeat(32).reshape(1, 4, 4, 4)
    with pytest.raises(ValueError, match="data: segmentation labels must fit int32"):
        T.resample_nnunet(seg, [1, 1, 1], [0.5, 0.5, 0.5], is_seg=True, order=1)
    seg = np.array([0, 7]).repeat(32).reshape(1, 4, 4, 4)  # int64 labels that fit: fine
    assert set(np.unique(T.resample_nnunet(seg, [1, 1, 1], [0.5, 0.5, 0.5], is_seg=True, order=1))) == {0, 7}


# ------------------------------------------------------------------------------------------------
# cases a differential fuzz against MONAI 1.6.1 found (23rd session)


def _monai_quiet(tr, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr(*a, **k)


@pytest.mark.parametrize("dt", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool])
@pytest.mark.parametrize("mode", [0, 1, 3])
def test_spacing_integer_dtype_casts_the_image_first_as_monai(dt, mode):
    """dtype= an integer type on a float image: MONAI casts the image to it before resampling (and
    scipy writes that dtype); fastmed resampled the float values and returned them uncast."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 8, 7, generator=g, dtype=torch.float64).mul(3).add(4).float()
    A = torch.diag(torch.tensor([1.0, 0.9, 1.3, 1.0], dtype=torch.float64))
    kw = dict(pixdim=(0.7, 1.1, 0.8), mode=mode, padding_mode="border", dtype=dt)
    m = _monai_quiet(MSpacing(**kw), MetaTensor(x.clone(), affine=A)).as_tensor()
    f = T.Spacing(**kw)(MetaTensor(x.clone(), affine=A)).as_tensor()
    assert f.dtype == m.dtype == torch.float32 and f.shape == m.shape
    assert torch.equal(f, f.round())
    d = f != m
    if dt == torch.bool:  # MONAI's holes only (see the next test)
        assert set(f.unique().tolist()) <= {0.0, 1.0}
        assert ((m[d] == 0) & (f[d] == 1)).all() and d.sum() <= 0.03 * f.numel()
    else:
        assert d.sum() <= 0.01 * f.numel() and (f - m).abs().max() <= 1  # .5 ties only
    if mode == 0:
        assert not d.any()


@pytest.mark.parametrize("mode", [0, 1, 3])
def test_spacing_bool_mask_with_dtype_none_truncates_as_monai(mode):
    """A bool mask, dtype=None, a spline order: scipy writes the interpolated value into a bool
    output (truncated: 0.9 is False). fastmed returned the interpolated values (0.5, 0.53, -0.2).
    Now equal to MONAI except where MONAI's float64 sum of a value of 1 lands below 1 (holes inside
    the mask), which fastmed counts as 1."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 21, 17, 14, generator=g) > 0.3
    x = (F.avg_pool3d(x.float(), 3, 1, 1) > 0.5)[0]
    A = torch.diag(torch.tensor([0.8, 1.1, 2.5, 1.0], dtype=torch.float64))
    kw = dict(pixdim=(0.55, 0.9, 1.2), mode=mode, padding_mode="nearest", dtype=None)
    m = _monai_quiet(MSpacing(**kw), MetaTensor(x.clone(), affine=A)).as_tensor()
    f = T.Spacing(**kw)(MetaTensor(x.clone(), affine=A)).as_tensor()
    v = T.Spacing(**dict(kw, dtype=np.float64))(MetaTensor(x.double(), affine=A)).as_tensor()
    assert f.dtype == torch.float32 and f.shape == m.shape
    # the truncation of the interpolated value (v is float32: within 1e-6 of 1 either way)
    assert (f[v >= 1 + 1e-6] == 1).all() and (f[v < 1 - 1e-6] == 0).all()
    d = f != m
    assert ((m[d] == 0) & (f[d] == 1) & (v[d] >= 1 - 1e-6)).all()  # MONAI's holes only
    assert d.sum() <= 0.03 * f.numel()
    if mode == 0:
        assert not d.any()


def test_spacing_mode_and_padding_are_checked_when_used():
    """MONAI checks mode / padding_mode when it resamples, so a call may override them; fastmed
    refused them when the transform was built."""
    x = MetaTensor(torch.rand(1, 6, 7, 5), affine=torch.eye(4, dtype=torch.float64))
    for kw in (dict(mode=7), dict(mode="area"), dict(mode="bilinear", padding_mode="mirror"), dict(mode=2)):
        m = _monai_quiet(MSpacing(0.5, **kw), x, mode=1, padding_mode="border")
        f = T.Spacing(0.5, **kw)(x, mode=1, padding_mode="border")
        assert f.shape == m.shape == (1, 11, 13, 9)
        torch.testing.assert_close(f.as_tensor(), m.as_tensor(), rtol=1e-5, atol=1e-5)
        same = T.Spacing(1.0, **kw)(x)  # nothing to resample: the mode is not used (MONAI's too)
        torch.testing.assert_close(same.as_tensor(), x.as_tensor())
        d = T.Spacingd("a", 0.5, **kw)  # built; used with its own mode it is refused
        with pytest.raises((ValueError, NotImplementedError), match="mode|order"):
            d({"a": x})


def _rot_affine(angle: float, spacing, origin) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(4)
    r[:2, :2] = [[c, -s], [s, c]]
    a = r @ np.diag(list(spacing) + [1.0])
    a[:3, 3] = origin
    return a


_INV_CASES = [  # (spatial shape, affine, Spacing kwargs)
    ((9, 8, 5), _rot_affine(0.0, (0.7, 0.7, 2.5), (1.0, -2.0, 3.0)), dict(pixdim=(1.0, 1.0, 1.2))),
    ((9, 8, 5), _rot_affine(0.3, (0.8, 1.1, 2.0), (4.0, 2.0, -1.0)), dict(pixdim=(1.1, 0.6, 1.3), mode="nearest")),
    ((7, 9, 6), _rot_affine(0.0, (1.2, 0.9, 1.5), (0.0, 0.0, 0.0)),
     dict(pixdim=(0.6, 1.4, 1.0), mode=3, padding_mode="reflect", dtype=np.float32)),
    ((7, 9, 6), _rot_affine(-0.2, (1.2, 0.9, 1.5), (2.0, 1.0, 0.0)),
     dict(pixdim=(0.9, 0.9, 0.9), mode=1, padding_mode="nearest", align_corners=True, diagonal=True)),
    ((10, 7), _rot_affine(0.0, (0.5, 1.5, 1.0), (0.0, 3.0, 0.0)), dict(pixdim=(0.8, 0.8), mode="bilinear",
                                                                       padding_mode="zeros")),
    ((9, 8, 5), _rot_affine(0.0, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0)), dict(pixdim=(0.7, 0.7, 2.5))),  # no-op
]


@pytest.mark.parametrize("case", range(len(_INV_CASES)))
def test_spacing_trace_and_inverse_as_monai(case):
    """fastmed's Spacing records MONAI's trace (orig_size, mode, padding_mode, align_corners, dtype,
    src_affine) in applied_operations, and its inverse resamples back as MONAI's does: shape,
    affine and values. Before, inverse raised and MONAI's Compose.inverse skipped it silently."""
    shape, affine, kw = _INV_CASES[case]
    g = torch.Generator().manual_seed(case)
    x = MetaTensor(torch.randn((2, *shape), generator=g), affine=torch.as_tensor(affine))
    ms, fs = MSpacing(**kw), T.Spacing(**kw)
    my, fy = _monai_quiet(ms, x.clone()), fs(x.clone())
    assert len(fy.applied_operations) == len(my.applied_operations) == 1
    mo, fo = my.applied_operations[-1], fy.applied_operations[-1]
    assert fo["id"] == id(fs) and fo["class"] == "Spacing"
    for k in ("orig_size", "tracing", "do_transforms", "lazy"):
        assert fo[k] == mo[k]
    me, fe = mo["extra_info"], fo["extra_info"]
    assert set(fe) == set(me)
    for k in me:
        if k == "src_affine":
            torch.testing.assert_close(fe[k], me[k], rtol=0, atol=1e-12)
        else:
            assert fe[k] == me[k], k
    mi, fi = _monai_quiet(ms.inverse, my), fs.inverse(fy)
    assert type(fi) is type(mi) and fi.shape == mi.shape == x.shape and fi.dtype == mi.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(fi.affine), np.asarray(mi.affine), atol=1e-6)
    torch.testing.assert_close(fi.as_tensor(), mi.as_tensor(), rtol=1e-4, atol=1e-4)
    assert fi.applied_operations == [] and fy.applied_operations == []  # popped, as MONAI pops
    with pytest.raises(ValueError, match="applied_operations are empty"):
        fs.inverse(fi)
    with pytest.raises(RuntimeError, match="not this Spacing"):
        fs.inverse(_monai_quiet(ms, x.clone()))
    with pytest.raises(ValueError, match="inverse needs the MetaTensor"):
        fs.inverse(torch.zeros(1, 4, 4, 4))


def test_monai_compose_and_invertd_invert_fastmed_spacingd():
    """MONAI's Compose.inverse and Invertd (nearest_interp on a prediction) run fastmed's Spacingd
    inverse, as they do MONAI's: same shapes, affines and values through Orientationd."""
    from monai.transforms import Compose, Invertd, Orientationd

    A = _rot_affine(0.0, (-0.73, 0.71, 5.0), (10.0, -4.0, 2.0))  # no exact nearest ties
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 20, 18, 6, generator=g)
    lab = (torch.rand(1, 20, 18, 6, generator=g) * 3).floor()
    results = {}
    for name, SpD in (("monai", MSpacingd), ("fastmed", T.Spacingd)):
        pre = Compose([Orientationd(("image", "label"), axcodes="RAS"),
                       SpD(("image", "label"), pixdim=(1.0, 1.0, 2.0), mode=("bilinear", "nearest"))])
        d = _monai_quiet(pre, {"image": MetaTensor(img.clone(), affine=torch.as_tensor(A)),
                               "label": MetaTensor(lab.clone(), affine=torch.as_tensor(A))})
        back = _monai_quiet(pre.inverse, {k: v.clone() for k, v in d.items()})
        d["pred"] = d["image"] * 2.0  # a "prediction" on the resampled grid
        post = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)
        inv = _monai_quiet(post, d)
        results[name] = (d["image"], back, inv["pred"])
    (mf, mb, mp), (ff, fb, fp) = results["monai"], results["fastmed"]
    assert ff.shape == mf.shape and fb["image"].shape == mb["image"].shape == img.shape
    for a, b in ((fb["image"], mb["image"]), (fb["label"], mb["label"]), (fp, mp)):
        assert a.shape == b.shape == img.shape
        np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-6)
        np.testing.assert_allclose(np.asarray(a.affine), A, atol=1e-6)
        torch.testing.assert_close(a.as_tensor(), b.as_tensor(), rtol=1e-4, atol=1e-4)
    assert set(fb["label"].unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest there and back
    assert set(fp.unique().tolist()) <= set((2 * ff).unique().tolist())  # nearest_interp: no new values


def test_spacing_follows_monai_set_track_meta():
    """With MONAI's set_track_meta(False), MONAI's Spacing returns a plain tensor (no trace)."""
    from monai.data import set_track_meta

    x = MetaTensor(torch.rand(1, 6, 6, 4), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    set_track_meta(False)
    try:
        m, f = _monai_quiet(MSpacing((1.0, 1.0, 1.0)), x), T.Spacing((1.0, 1.0, 1.0))(x)
    finally:
        set_track_meta(True)
    assert type(m) is type(f) is torch.Tensor and f.shape == m.shape == (1, 6, 6, 7)
    torch.testing.assert_close(f, m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out", [np.float32, np.float64, np.int16, np.uint8, np.int32, np.bool_, "array", "tensor"])
@pytest.mark.parametrize("order", [0, 1, 3])
def test_affine_transform_output_argument_as_scipy(out, order):
    """scipy's ``output`` (a dtype, or an array written in place and returned) at its
    position, so positional calls mean what they mean in scipy; fastmed had no such argument."""
    g = np.random.default_rng(order)
    x = g.normal(size=(9, 8, 7)) * 40 + 60
    if out is np.bool_:
        x = (x > 60).astype(np.float64)
    mat = np.array([[0.8, 0.1, 0.0], [0.0, 1.1, 0.05], [0.02, 0.0, 0.9]])
    off = [0.3, -0.2, 0.4]
    if out in ("array", "tensor"):
        ref = np.zeros((7, 8, 6), dtype=np.int16)
        ndi.affine_transform(x, mat, off, None, ref, order, "nearest")
        dst = np.zeros((7, 8, 6), dtype=np.int16) if out == "array" else torch.zeros((7, 8, 6), dtype=torch.int16)
        assert T.affine_transform(x, mat, off, None, dst, order, "nearest") is dst  # as scipy's code returns it
        got = dst if out == "array" else dst.numpy()
    else:
        ref = ndi.affine_transform(x, mat, off, (7, 8, 6), out, order, "nearest")
        got = T.affine_transform(x, mat, off, (7, 8, 6), out, order, "nearest")
        assert got.dtype == ref.dtype
    if np.dtype(ref.dtype).kind == "f":
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)
    else:  # rounded / truncated: equal but at exact ties
        assert (got != ref).mean() <= 0.01 and np.abs(got.astype(float) - ref.astype(float)).max() <= 1


def test_affine_transform_bad_output_and_homogeneous_matrix():
    x = np.zeros((4, 5))
    with pytest.raises(ValueError, match="output: its shape"):
        T.affine_transform(x, np.eye(2), output_shape=(3, 3), output=np.zeros((4, 5)))
    with pytest.raises(TypeError, match="output: must be"):
        T.affine_transform(x, np.eye(2), output="not a dtype")
    bad = np.eye(3)
    bad[2] = [0.5, 0.0, 1.0]
    with pytest.raises(ValueError):
        ndi.affine_transform(x, bad)
    with pytest.raises(ValueError, match="matrix: the last row"):
        T.affine_transform(x, bad)
    # bool output as scipy writes it: the truncated value's low byte (-1 and 300 True, 256 False)
    v = np.array([[-1.0, 0.3, 0.7, 2.0, -256.25, -0.4, 256.0, 300.0, -70000.0, 255.6, 1.0 - 1e-12]])
    want = ndi.affine_transform(v, np.eye(2), order=0, output=bool, mode="nearest")
    np.testing.assert_array_equal(want[0, :10], [1, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    got = T.affine_transform(v, np.eye(2), order=0, output=bool, mode="nearest")
    np.testing.assert_array_equal(got[0, :10], want[0, :10])
    assert got[0, 10]  # within 1e-9 of 1: 1 (scipy: 0)


def test_spacing_empty_output_names_scale_extent():
    """scale_extent on an axis of one voxel gives an empty output (MONAI: NaN values or affine);
    the refusal says why."""
    with pytest.raises(ValueError, match=r"pixdim \[2.0, 1.0, 1.0\] gives an empty output shape.*scale_extent"):
        T.Spacing((2.0, 1.0, 1.0), scale_extent=True, align_corners=True)(torch.rand(1, 1, 8, 8), affine=np.eye(4))


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("force_separate_z", [None, True])
def test_nnunet_integer_image_keeps_exact_integers(order, force_separate_z):
    """An integer image is truncated to its dtype, as nnU-Net's astype. Downsampling by 3 samples the
    input's own voxels (skimage's (i + 0.5) * 3 - 0.5 = 3i + 1), where the exact value is the input:
    float32 computing (the default) was 1e-3 off at 1000 and float64's cubic prefilter 1e-12, and
    truncating that took 1 off at random (15 of 560 voxels here; nnU-Net's own float64 noise does
    the same at other voxels)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 24, 21, 30, generator=g) * 800 + 1000).to(torch.int16).numpy()
    r = T.resample_nnunet(x, [1, 1, 1], [3, 3, 3], order=order, order_z=order, force_separate_z=force_separate_z)
    assert r.dtype == np.int16
    np.testing.assert_array_equal(r, x[:, 1::3, 1::3, 1::3])


def test_invertd_after_dataloader_and_decollate():
    """The usual inference pipeline: Dataset + DataLoader (batched), decollate_batch, Invertd on a
    prediction: fastmed's Spacingd gives MONAI's result."""
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.transforms import Compose, Invertd

    A = torch.as_tensor(np.diag([0.73, 0.71, 3.0, 1.0]))
    g = torch.Generator().manual_seed(1)
    data = [{"image": MetaTensor(torch.randn(1, 20, 18, 6, generator=g), affine=A)} for _ in range(2)]
    outs = {}
    for name, SpD in (("monai", MSpacingd), ("fastmed", T.Spacingd)):
        pre = Compose([SpD("image", pixdim=(1.0, 1.0, 1.5))])
        batch = _monai_quiet(lambda: next(iter(DataLoader(Dataset(data, pre), batch_size=2, num_workers=0))))
        batch["pred"] = batch["image"] * 3.0
        post = Invertd("pred", transform=pre, orig_keys="image")
        outs[name] = [_monai_quiet(post, item)["pred"] for item in decollate_batch(batch)]
    for f, m in zip(outs["fastmed"], outs["monai"]):
        assert f.shape == m.shape == (1, 20, 18, 6)
        np.testing.assert_allclose(np.asarray(f.affine), np.asarray(A), atol=1e-6)
        torch.testing.assert_close(f.as_tensor(), m.as_tensor(), rtol=1e-5, atol=1e-5)
