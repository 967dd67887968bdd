"""fastmed::resample and fastmed::spline_prefilter against the float64 reference and scipy.ndimage."""
import itertools

import numpy as np
import pytest
import torch

from fastmed.ops import resample as R

ndi = pytest.importorskip("scipy.ndimage")


def _theta(nsp, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.diag(torch.rand(nsp, generator=g, dtype=torch.float64) * 1.5 + 0.4)
    if kind == "oblique":
        a = a + 0.3 * torch.randn(nsp, nsp, generator=g, dtype=torch.float64)
    elif kind == "zy-rotation" and nsp == 3:  # rows stay rows: the row path
        c, s = np.cos(0.4), np.sin(0.4)
        a[:2, :2] = a[:2, :2] @ torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    elif kind == "flip":
        a[-1, -1] = -a[-1, -1]
    t = torch.randn(nsp, 1, generator=g, dtype=torch.float64) * 2
    if kind == "flip":
        t[-1] += 6
    return torch.cat([a, t], 1)


SIZES = {2: (9, 6), 3: (7, 9, 6)}
OUT = {2: (8, 7), 3: (5, 8, 7)}


@pytest.mark.parametrize("nsp", [2, 3])
@pytest.mark.parametrize("kind", ["diagonal", "flip", "zy-rotation", "oblique"])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("padding", list(R.PADDINGS))
def test_values_equal_reference_float64(nsp, kind, order, padding):
    x = torch.randn(2, 3, *SIZES[nsp], dtype=torch.float64)
    th = _theta(nsp, kind)
    got = R.resample(x, th, OUT[nsp], order=order, padding=padding, cval=0.7, compute_dtype=torch.float64,
                     prefilter=False)
    ref = R.resample_reference(x, th, OUT[nsp], order=order, padding=padding, cval=0.7)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["diagonal", "oblique"])
@pytest.mark.parametrize("order", [(0, 1, 3), (3, 3, 0), (1, 0, 1)])
def test_mixed_orders_per_dim(kind, order):
    x = torch.randn(1, 2, 7, 9, 6, dtype=torch.float64)
    th = _theta(3, kind, seed=3)
    got = R.resample(x, th, (6, 5, 9), order=order, padding="border", compute_dtype=torch.float64, prefilter=False)
    ref = R.resample_reference(x, th, (6, 5, 9), order=order, padding="border")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_batched_theta():
    x = torch.randn(3, 2, 7, 9, 6, dtype=torch.float64)
    th = torch.stack([_theta(3, k, seed=i) for i, k in enumerate(["diagonal", "oblique", "zy-rotation"])])
    got = R.resample(x, th, (5, 8, 7), order=1, padding="zeros", compute_dtype=torch.float64)
    ref = R.resample_reference(x, th, (5, 8, 7), order=1, padding="zeros")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["diagonal", "oblique"])
@pytest.mark.parametrize("order", [0, 1, 3])
def test_float32_error_is_float32_rounding(kind, order):
    """float32 kernel error against the float64 reference, compared with PyTorch's own float32 error
    on the same sums (the values themselves rounded to float32)."""
    x64 = torch.randn(1, 4, 17, 20, 13, dtype=torch.float64) * 100
    th = _theta(3, kind, seed=5)
    ref = R.resample_reference(x64.float().double(), th, (11, 23, 14), order=order, padding="reflect")
    got = R.resample(x64.float(), th, (11, 23, 14), order=order, padding="reflect", prefilter=False)
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    scale = x64.abs().max().item()
    assert err <= 16 * torch.finfo(torch.float32).eps * scale * (1 if order == 0 else 4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16])
def test_input_dtypes_cast_fused(dtype):
    if dtype.is_floating_point:
        x = torch.randn(1, 2, 9, 10, 7).to(dtype)
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(max(info.min, -1000), min(info.max, 1000), (1, 2, 9, 10, 7), dtype=dtype)
    th = _theta(3, "diagonal", seed=1)
    got = R.resample(x, th, (6, 7, 8), order=1, padding="border")
    ref = R.resample_reference(x.double(), th, (6, 7, 8), order=1, padding="border")
    assert got.dtype == (dtype if dtype.is_floating_point else torch.float32)
    tol = 1e-2 * ref.abs().max().item() if dtype in (torch.float16, torch.bfloat16) else 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int16, torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes_round_and_saturate(out_dtype):
    x = torch.randn(1, 1, 8, 9, 7, dtype=torch.float64) * 400
    th = _theta(3, "oblique", seed=2)
    got = R.resample(x, th, (5, 6, 7), order=1, padding="border", out_dtype=out_dtype, compute_dtype=torch.float64)
    ref = R.resample_reference(x, th, (5, 6, 7), order=1, padding="border")
    if out_dtype.is_floating_point:
        torch.testing.assert_close(got, ref.to(out_dtype))
    else:
        info = torch.iinfo(out_dtype)
        assert torch.equal(got, torch.round(ref).clamp(info.min, info.max).to(out_dtype))


def test_strided_and_channels_last_input():
    x = torch.randn(2, 3, 9, 10, 8)
    th = _theta(3, "zy-rotation", seed=4)
    want = R.resample(x, th, (6, 7, 9), order=1)
    cl = x.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(R.resample(cl, th, (6, 7, 9), order=1), want, rtol=0, atol=0)
    sliced = torch.randn(2, 3, 9, 10, 16)[..., ::2]
    torch.testing.assert_close(R.resample(sliced, th, (6, 7, 9), order=1),
                               R.resample(sliced.contiguous(), th, (6, 7, 9), order=1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["diagonal", "oblique"])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("C", [1, 5, 14])
def test_argmax_equals_resample_then_argmax(kind, order, C):
    x = torch.randn(2, C, 7, 9, 6, dtype=torch.float64)
    th = _theta(3, kind, seed=6)
    lab = R.resample(x, th, (5, 8, 7), order=order, padding="border", out="argmax", compute_dtype=torch.float64)
    vals = R.resample(x, th, (5, 8, 7), order=order, padding="border", compute_dtype=torch.float64)
    assert lab.dtype == torch.uint8 and lab.shape == (2, 1, 5, 8, 7)
    assert torch.equal(lab.long(), vals.argmax(1, keepdim=True))


def test_argmax_many_classes_int16_and_nan():
    x = torch.randn(1, 300, 4, 5, 6)
    th = _theta(3, "diagonal", seed=7)
    lab = R.resample(x, th, (3, 4, 5), order=1, padding="border", out="argmax")
    assert lab.dtype == torch.int16
    assert torch.equal(lab.long(), R.resample(x, th, (3, 4, 5), order=1, padding="border").argmax(1, keepdim=True))
    x[0, 7] = float("nan")
    assert (R.resample(x, th, (3, 4, 5), order=1, padding="border", out="argmax") == 7).all()


@pytest.mark.parametrize("kind", ["diagonal", "oblique"])
@pytest.mark.parametrize("order", [0, 1])
def test_label_interpolation_without_one_hot(kind, order):
    seg = torch.randint(0, 4, (1, 1, 7, 9, 6), dtype=torch.int16)
    th = _theta(3, kind, seed=8)
    got = R.resample(seg, th, (5, 8, 7), order=order, padding="border", out="labels")
    # the one-hot way: interpolate each label's indicator, last label reaching 0.5 wins
    want = torch.zeros((1, 1, 5, 8, 7), dtype=torch.int64)
    for lab in torch.unique(seg).tolist():
        ind = R.resample_reference((seg == lab).double(), th, (5, 8, 7), order=order, padding="border")
        want[ind >= 0.5] = lab
    assert got.dtype == torch.int16
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("boundary", ["mirror", "reflect"])
@pytest.mark.parametrize("n", [2, 3, 5, 17, 64])
def test_prefilter_equals_exact_solve(boundary, n):
    x = torch.randn(2, 2, n, 4, 5, dtype=torch.float64)
    for d in range(3):
        if x.shape[2 + d] < 2:
            continue
        got = R.spline_prefilter(x, [d], boundary)
        torch.testing.assert_close(got, R.spline_prefilter_reference(x, [d], boundary), rtol=0, atol=1e-11)
    got32 = R.spline_prefilter(x.float(), None, boundary)
    torch.testing.assert_close(got32.double(), R.spline_prefilter_reference(x, None, boundary), rtol=0, atol=1e-5)


SCIPY_MODES = [("nearest", "border"), ("reflect", "reflect"), ("mirror", "mirror"), ("grid-constant", "zeros"),
               ("constant", "constant")]


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode,padding", SCIPY_MODES)
def test_equals_scipy_affine_transform(order, mode, padding):
    rng = np.random.default_rng(order)
    x = rng.standard_normal((9, 11, 7))
    a = np.diag([0.8, 1.3, 0.7]) + 0.2 * rng.standard_normal((3, 3))
    off = np.array([-1.0, 0.5, 1.2])
    want = ndi.affine_transform(x, a, off, output_shape=(8, 10, 9), order=order, mode=mode, cval=0.3)
    th = torch.tensor(np.concatenate([a, off[:, None]], 1))
    got = R.resample(torch.tensor(x)[None, None], th, (8, 10, 9), order=order, padding=padding, cval=0.3,
                     nearest_half_up=True, compute_dtype=torch.float64)[0, 0].numpy()
    # scipy's half-sample ("reflect") prefilter initialises with a truncated sum: ~1e-8
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 if (order, mode) == (3, "reflect") else 1e-12)


@pytest.mark.parametrize("mode,padding", [("nearest", "border"), ("mirror", "mirror")])
def test_equals_scipy_map_coordinates_2d_zoom(mode, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((13, 10))
    for order in (0, 1, 3):
        want = ndi.zoom(x, (1.7, 0.6), order=order, mode=mode, grid_mode=False)
        sy, sx = (13 - 1) / (want.shape[0] - 1), (10 - 1) / (want.shape[1] - 1)
        th = torch.tensor([[sy, 0, 0], [0, sx, 0]], dtype=torch.float64)
        got = R.resample(torch.tensor(x)[None, None], th, want.shape, order=order, padding=padding,
                         nearest_half_up=True, compute_dtype=torch.float64)[0, 0].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_far_outside_and_huge_coordinates_do_not_crash():
    x = torch.randn(1, 1, 5, 6, 7)
    th = torch.tensor([[1e20, 0, 0, 0], [0, 1.0, 0, -1e18], [0, 0, 1.0, 3]], dtype=torch.float64)
    for pad in R.PADDINGS:
        y = R.resample(x, th, (3, 4, 5), order=1, padding=pad, cval=2.0)
        assert torch.isfinite(y).all()
    y = R.resample(x, th, (3, 4, 5), order=1, padding="zeros", cval=2.0)
    assert torch.equal(y[:, :, 1:], torch.full_like(y[:, :, 1:], 2.0))


@pytest.mark.parametrize("order, padding", [(1, "zeros"), (1, "border"), (0, "reflect"), (1, "mirror"),
                                            (1, "constant"), (0, "zeros"), ((0, 1, 1), "reflect")])
def test_gradient_is_the_adjoint(order, padding):
    """The values mode is differentiable in src (as MONAI's grid_sample path is): gradcheck in
    float64, and the same gradient as autograd through the float64 reference, batched theta too."""
    torch.manual_seed(3)
    th = torch.tensor([[0.9, 0.1, 0.0, -0.3], [0.05, 1.1, 0.0, 0.4], [0.0, 0.2, 0.7, 0.1]], dtype=torch.float64)
    small = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: R.resample(s, th, (3, 4, 3), order, padding, cval=0.5, compute_dtype=torch.float64), (small,))
    src = torch.randn(2, 3, 7, 6, 5, dtype=torch.float64, requires_grad=True)
    thb = torch.stack([th, th * 0.9])
    out = R.resample(src, thb, (6, 8, 5), order, padding, compute_dtype=torch.float64)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, src, g)
    (ref,) = torch.autograd.grad(R.resample_reference(src, thb, (6, 8, 5), order, padding), src, g)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # float32 in, float32 gradient; integer outputs (argmax) carry no gradient
    x = src.detach().float().requires_grad_()
    R.resample(x, th, (6, 8, 5), order, padding).sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().max() > 0
    assert not R.resample(x, th, (6, 8, 5), order, padding, out="argmax").requires_grad


def test_no_gradient_through_the_spline_prefilter():
    th = torch.cat([torch.eye(3, dtype=torch.float64) * 0.8, torch.zeros(3, 1, dtype=torch.float64)], 1)
    x = torch.randn(1, 1, 6, 6, 6, requires_grad=True)
    y = R.resample(x, th, (5, 5, 5), order=3, padding="mirror")
    with pytest.raises(NotImplementedError, match="prefilter"):
        y.sum().backward()


def test_identity_is_exact_and_empty_output():
    x = torch.randn(2, 3, 5, 6, 7)
    th = torch.cat([torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)], 1)
    for order in (0, 1, 3):
        torch.testing.assert_close(R.resample(x, th, (5, 6, 7), order=order, padding="mirror"), x,
                                   rtol=0, atol=2e-6 if order == 3 else 0)
    assert R.resample(x, th, (0, 6, 7)).shape == (2, 3, 0, 6, 7)


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 1, 5, 6, 7)
    th = _theta(3, "diagonal")
    with pytest.raises(ValueError, match="theta"):
        R.resample(x, th[:2], (3, 4, 5))
    with pytest.raises(ValueError, match="theta"):
        R.resample(x, th * float("nan"), (3, 4, 5))
    with pytest.raises(ValueError, match="out_size"):
        R.resample(x, th, (3, 4))
    with pytest.raises(ValueError, match="order"):
        R.resample(x, th, (3, 4, 5), order=2)
    with pytest.raises(ValueError, match="padding"):
        R.resample(x, th, (3, 4, 5), padding="wrap")
    with pytest.raises(ValueError, match="labels"):
        R.resample(x, th, (3, 4, 5), out="labels")
    with pytest.raises(TypeError, match="out_dtype"):
        R.resample(x, th, (3, 4, 5), out="argmax", out_dtype=torch.float32)
    with pytest.raises(ValueError, match="src"):
        R.resample(torch.randn(5, 6, 7), th, (3, 4, 5))
    with pytest.raises(TypeError, match="src"):
        R.resample(x.to(torch.complex64), th, (3, 4, 5))
    with pytest.raises(ValueError, match="cval"):
        R.resample(x, th, (3, 4, 5), cval=float("inf"))
    with pytest.raises(ValueError, match="boundary"):
        R.spline_prefilter(x, None, "nearest")


def test_opcheck():
    x = torch.randn(1, 2, 5, 6, 7)
    th = _theta(3, "oblique")
    torch.library.opcheck(R._resample_op, (x, th, [3, 4, 5], [1, 1, 1], 0, 0.0, False, torch.float32, False, 0, None))
    torch.library.opcheck(R._prefilter_op, (x, [0, 2], 3))
    xg = x.double().requires_grad_()  # with its autograd formula
    torch.library.opcheck(R._resample_op, (xg, th, [3, 4, 5], [1, 0, 1], 0, 0.0, False, torch.float64, True, 0, None))


def test_torch_compile():
    x = torch.randn(1, 2, 5, 6, 7)
    th = _theta(3, "diagonal")

    def f(x):
        return R.resample(x * 2, th, (3, 4, 5), order=1) + 1

    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))
    xg = x.clone().requires_grad_()
    torch.compile(f, backend="aot_eager", fullgraph=True)(xg).sum().backward()
    xe = x.clone().requires_grad_()
    f(xe).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


@pytest.mark.parametrize("scale", [0.37, 0.6, 1.0, 1.3, 1.55, 1.9, 2.5])
@pytest.mark.parametrize("order", [0, 1, 3])
def test_row_path_long_rows_every_span_kind(scale, order):
    """Rows long enough for the vector blocks: spans within one register (upsampling), two registers
    (downsampling up to ~1.9x) and gathers (beyond), against the float64 reference."""
    x = torch.randn(2, 3, 5, 6, 101, dtype=torch.float64)
    nx = int(100 / scale)
    th = torch.tensor([[0.8, 0.0, 0.0, 0.3], [0.0, 1.1, 0.0, -0.2], [0.0, 0.0, scale, 0.37]], dtype=torch.float64)
    ref = R.resample_reference(x, th, (4, 5, nx), order=order, padding="border")
    got = R.resample(x.float(), th, (4, 5, nx), order=order, padding="border", prefilter=False)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    lab = R.resample(x.float(), th, (4, 5, nx), order=order, padding="border", out="argmax", prefilter=False)
    vals = R.resample(x.float(), th, (4, 5, nx), order=order, padding="border", prefilter=False)
    assert torch.equal(lab.long(), vals.argmax(1, keepdim=True))


def test_labels_mode_refuses_cubic_and_bad_background():
    seg = torch.randint(0, 4, (1, 1, 7, 9, 6), dtype=torch.uint8)
    th = _theta(3, "diagonal")
    with pytest.raises(NotImplementedError, match="order 3"):
        R.resample(seg, th, (5, 8, 7), order=3, out="labels")
    with pytest.raises(ValueError, match="cval"):
        R.resample(seg, th, (5, 8, 7), order=1, out="labels", cval=-1)
    with pytest.raises(ValueError, match="cval"):
        R.resample(seg, th, (5, 8, 7), order=1, out="labels", cval=2.7)
    with pytest.raises(ValueError, match="labels"):
        R.resample(seg, th, (5, 8, 7), order=1, out="labels", labels=[])
    with pytest.raises(ValueError, match="labels"):
        R.resample(seg, th, (5, 8, 7), order=1, out="labels", labels=[1, 300])
    with pytest.raises(TypeError, match="out_dtype"):
        R.resample(seg, th, (5, 8, 7), order=1, out="labels", out_dtype=torch.float32)
    got = R.resample(seg, th * 1.0, (5, 8, 7), order=1, padding="zeros", out="labels", cval=9)
    assert (got == 9).any() and got.dtype == torch.uint8


def test_more_bad_arguments():
    x = torch.randn(1, 2, 5, 6, 7)
    th = _theta(3, "diagonal")
    with pytest.raises(TypeError, match="out_dtype"):
        R.resample(x, th, (3, 4, 5), out_dtype=torch.bool)
    with pytest.raises(ValueError, match="out_size"):
        R.resample(x, th, (3.7, 4, 5))
    with pytest.raises(ValueError, match="channel"):
        R.resample(torch.randn(1, 0, 5, 6, 7), th, (3, 4, 5), out="argmax")


@pytest.mark.parametrize("shape", [(1, 6, 5), (6, 1, 5), (6, 5, 1)])
@pytest.mark.parametrize("mode,padding", [("grid-constant", "zeros"), ("nearest", "border"), ("mirror", "mirror")])
def test_cubic_with_a_size_one_axis_equals_scipy(shape, mode, padding):
    x = np.random.default_rng(0).standard_normal(shape)
    want = ndi.affine_transform(x, np.eye(3), order=3, mode=mode, cval=0.0)
    th = torch.cat([torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)], 1)
    got = R.resample(torch.tensor(x)[None, None], th, shape, order=3, padding=padding,
                     compute_dtype=torch.float64)[0, 0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_voxel_choice_does_not_depend_on_compute_precision():
    """The coordinate stays in float64: 2.5 + 1e-9 rounds to 3 in float32 compute too."""
    x = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 1, 8)
    th = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.5 + 1e-9]], dtype=torch.float64)
    for cd in (torch.float32, torch.float64):
        got = R.resample(x, th, (1, 1, 3), order=0, padding="border", compute_dtype=cd)
        assert got.flatten().tolist() == [3.0, 4.0, 5.0]


def test_nearest_ties_outside_under_reflecting_padding_fold_before_rounding():
    """A point exactly half-way between two voxels outside the input, under a reflecting padding:
    scipy (order 0, half up) and grid_sample ("nearest", half to even) fold the coordinate into
    the input and then round; rounding first sent the tie to the other neighbour (a differential
    fuzz found whole Spacing planes so). Every half-integer and some others, against both."""
    import numpy as np
    import torch.nn.functional as F

    ndi = pytest.importorskip("scipy.ndimage")
    from fastmed.transforms import affine_transform

    for n in range(1, 8):
        a = (np.arange(n, dtype=np.float64) * 10 + 1)[:, None] * np.ones((1, 2))
        cs = np.concatenate([np.arange(-3 * n - 2, 4 * n + 2, 0.5), np.arange(-2 * n, 3 * n, 0.25) + 0.01])
        for mode in ("mirror", "reflect", "grid-mirror", "nearest", "constant"):
            want = [ndi.affine_transform(a, [1.0, 1.0], [c, 0], output_shape=(1, 1), order=0, mode=mode)[0, 0]
                    for c in cs]
            got = [affine_transform(a, [1.0, 1.0], [c, 0], output_shape=(1, 1), order=0, mode=mode)[0, 0]
                   for c in cs]
            assert got == want, (n, mode)
    for n in (1, 2, 3, 4, 5, 8, 9):  # normalised coordinates exact for these sizes
        src = (torch.arange(n, dtype=torch.float64) * 10 + 1).view(1, 1, 1, 1, n)
        for ac in (False, True):
            if (n - 1 if ac else n) not in (1, 2, 4, 8):
                continue
            cs = torch.arange(-3 * n - 2, 4 * n + 2, 0.5, dtype=torch.float64)
            th = torch.zeros(len(cs), 3, 4, dtype=torch.float64)
            th[:, 2, 3] = cs
            srcb = src.expand(len(cs), 1, 1, 1, n)
            got = R.resample(srcb, th, (1, 1, 1), order=0, padding="mirror" if ac else "reflect")
            ref = R.resample_reference(srcb, th, (1, 1, 1), order=0, padding="mirror" if ac else "reflect")
            g = (2 * cs / (n - 1) - 1) if ac else ((2 * cs + 1) / n - 1)
            grid = torch.stack([g, torch.zeros_like(g), torch.zeros_like(g)], -1).view(len(cs), 1, 1, 1, 3)
            want = F.grid_sample(srcb, grid, mode="nearest", padding_mode="reflection", align_corners=ac)
            assert torch.equal(got, want) and torch.equal(ref, want), (n, ac)
