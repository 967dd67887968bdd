"""fastmed::upconv_fwd (kernel == stride transposed convolution, optionally written into the skip
concatenation) against PyTorch's ConvTranspose in float64, with gradients, and its bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmed.ops import upconv as U

CASES = [  # (x shape, kernel)
    ((1, 64, 12, 12, 12), (2, 2, 2)),
    ((2, 13, 5, 7, 37), (2, 2, 2)),  # odd sizes, channels no multiple of the register block
    ((1, 3, 4, 5, 50), (1, 2, 2)),  # anisotropic (nnU-Net's (1, 2, 2))
    ((1, 4, 3, 4, 19), (2, 2, 1)),
    ((2, 5, 3, 2, 3), (3, 1, 2)),
    ((1, 1, 2, 2, 2), (2, 2, 2)),  # one input channel
    ((2, 6, 9, 53), (2, 2)),  # 2D
    ((1, 3, 5, 48), (3, 1)),
]


def _data(shape, k, cout, bias, g):
    x = torch.randn(shape, generator=g) * 2
    w = torch.randn((shape[1], cout) + k, generator=g) / shape[1] ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    return x, w, b


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("shape,k", CASES)
@pytest.mark.parametrize("cout", [1, 7, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_as_well_as_pytorch(shape, k, cout, bias):
    g = torch.Generator().manual_seed(len(shape) * 100 + cout)
    x, w, b = _data(shape, k, cout, bias, g)
    assert U.upconv_suits(x, w, k)
    y = U.upconv(x, w, b)
    ref = U.upconv_reference(x, w, b)
    fn = F.conv_transpose3d if x.ndim == 5 else F.conv_transpose2d
    torch_y = fn(x, w, b, stride=k)
    assert y.shape == torch_y.shape and y.dtype == torch.float32 and y.is_contiguous()
    # each output is a dot product over the input channels: as close to float64 as PyTorch's
    assert _err(y, ref) <= 3 * _err(torch_y, ref) + 1e-6
    assert _err(y, ref) <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("skip_first", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_concatenation_with_skip_and_gradients(skip_first, n):
    g = torch.Generator().manual_seed(n)
    x, w, b = _data((n, 10, 3, 5, 6), (2, 2, 2), 9, True, g)
    skip = torch.randn(n, 4, 6, 10, 12, generator=g)
    ins = [t.clone().requires_grad_(True) for t in (x, w, b, skip)]
    refs = [t.double().requires_grad_(True) for t in (x, w, b, skip)]
    y = U.upconv(*ins, skip_first=skip_first)
    up = F.conv_transpose3d(refs[0], refs[1], refs[2], stride=2)
    ref = torch.cat((refs[3], up) if skip_first else (up, refs[3]), 1)
    assert y.shape == ref.shape
    assert _err(y, ref.detach()) < 1e-5
    cs = 4
    sk = y[:, :cs] if skip_first else y[:, 9:]
    assert torch.equal(sk, skip)  # the skip is copied exactly
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref.backward(dy.double())
    for a, r, name in zip(ins, refs, ("x", "weight", "bias", "skip")):
        scale = r.grad.abs().max().item()
        assert _err(a.grad, r.grad) <= 1e-5 * scale, name


CL_CASES = CASES + [
    ((1, 5, 3, 4, 7), (2, 3, 3)),  # last kernel size 3: channels last takes any kernel == stride
    ((2, 3, 2, 2, 2), (1, 1, 1)),
]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last_3d if t.ndim == 5 else torch.channels_last)


@pytest.mark.parametrize("shape,k", CL_CASES)
@pytest.mark.parametrize("cout", [1, 7, 32, 40])  # 40: column vectors no multiple of the register block
@pytest.mark.parametrize("skip_layout", ["channels_last", "planar", "first"])
def test_channels_last_concatenation(shape, k, cout, skip_layout):
    # channels-last x with a skip: the kernel writes the upsampled channels into their slice of a
    # channels-last concatenation buffer (and copies a channels-last skip in the same pass)
    g = torch.Generator().manual_seed(len(shape) * 100 + cout + sum(k))
    x, w, b = _data(shape, k, cout, cout != 7, g)
    x = _cl(x)
    out_sp = [s * kk for s, kk in zip(shape[2:], k)]
    skip = torch.randn([shape[0], 6] + out_sp, generator=g)
    if skip_layout != "planar":
        skip = _cl(skip)
    first = skip_layout == "first"
    if shape[1] > 1:
        assert U.upconv_suits(x, w, k, concat=True) and not U.upconv_suits(x, w, k)
    y = U.upconv(x, w, b, skip, first)
    ref = U.upconv_reference(x, w, b, skip, first)
    fn = F.conv_transpose3d if x.ndim == 5 else F.conv_transpose2d
    up = fn(x, w, b, stride=k)
    torch_y = torch.cat((skip, up) if first else (up, skip), 1)
    assert y.shape == torch_y.shape and y.dtype == torch.float32
    if shape[1] > 1:  # (one input channel: x is contiguous too, and planar is the path)
        assert y.is_contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    assert _err(y, ref) <= 3 * _err(torch_y, ref) + 1e-6
    assert _err(y, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    assert torch.equal(y[:, :6] if first else y[:, cout:], skip)  # the skip is copied exactly


@pytest.mark.parametrize("skip_first", [False, True])
def test_channels_last_concatenation_gradients(skip_first):
    g = torch.Generator().manual_seed(11)
    x, w, b = _data((2, 10, 3, 5, 6), (2, 2, 2), 9, True, g)
    skip = torch.randn(2, 4, 6, 10, 12, generator=g)
    ins = [t.clone().requires_grad_(True) for t in (_cl(x), w, b, _cl(skip))]
    refs = [t.double().requires_grad_(True) for t in (x, w, b, skip)]
    y = U.upconv(*ins, skip_first=skip_first)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    up = F.conv_transpose3d(refs[0], refs[1], refs[2], stride=2)
    ref = torch.cat((refs[3], up) if skip_first else (up, refs[3]), 1)
    assert _err(y, ref.detach()) < 1e-5
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref.backward(dy.double())
    for a, r, name in zip(ins, refs, ("x", "weight", "bias", "skip")):
        assert _err(a.grad, r.grad) <= 1e-5 * r.grad.abs().max().item(), name


def test_double_backward_and_gradcheck_through_the_op():
    # float64 takes PyTorch's path inside the op; float32 the kernel. gradcheck on the op itself.
    x = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 2, 4, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: U.upconv_fwd(*a, False), (x, w, b, s))
    assert torch.autograd.gradgradcheck(lambda *a: U.upconv_fwd(*a, True), (x, w, b, s))


def test_opcheck():
    x, w, b = _data((2, 5, 3, 4, 6), (2, 2, 2), 3, True, torch.Generator().manual_seed(1))
    skip = torch.randn(2, 2, 6, 8, 12)
    for args in ((x, w, b, None, False), (x, w, None, skip, True), (x.double(), w.double(), None, None, False),
                 (_cl(x), w, b, _cl(skip), False), (_cl(x), w, None, skip, True),
                 (_cl(x).double(), w.double(), None, skip.double(), False)):  # the last: PyTorch's path
        torch.library.opcheck(torch.ops.fastmed.upconv_fwd.default, args)


def test_paths_pytorch_keeps():
    x = torch.randn(1, 4, 6, 6, 6)
    w = torch.randn(4, 3, 2, 2, 2)
    assert U.upconv_suits(x, w, 2) and U.upconv_suits(x, w, (2, 2, 2))
    assert not U.upconv_suits(x, w, 1)  # stride != kernel: overlapping windows
    assert not U.upconv_suits(x, w, 2, padding=1)
    assert not U.upconv_suits(x, w, 2, output_padding=1)
    assert not U.upconv_suits(x, w, 2, groups=2)
    assert not U.upconv_suits(x.double(), w.double(), 2)
    # channels last alone: PyTorch's oneDNN path; with a concatenation: the kernel
    assert not U.upconv_suits(x.contiguous(memory_format=torch.channels_last_3d), w, 2)
    assert U.upconv_suits(x.contiguous(memory_format=torch.channels_last_3d), w, 2, concat=True)
    assert not U.upconv_suits(x.permute(0, 1, 3, 2, 4), w, 2, concat=True)  # other strides
    assert not U.upconv_suits(x, torch.randn(4, 3, 3, 3, 3), 3)  # last kernel size 3
    assert not U.upconv_suits(x[0], w, 2)  # unbatched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not U.upconv_suits(x, w, 2)
    # where it does not suit, upconv is PyTorch's own result
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(U.upconv(xc, w), F.conv_transpose3d(xc, w, stride=2))
    assert torch.equal(U.upconv(x.double(), w.double()), F.conv_transpose3d(x.double(), w.double(), stride=2))


def test_compile():
    x = torch.randn(1, 4, 6, 6, 6)
    w = torch.randn(4, 3, 2, 2, 2)
    s = torch.randn(1, 2, 12, 12, 12)

    def f(x, s):
        return U.upconv_fwd(x, w, None, s, False) * 2

    got = torch.compile(f, backend="eager", fullgraph=True)(x, s)
    torch.testing.assert_close(got, f(x, s))


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 4, 3, 3, 3)
    w = torch.randn(4, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="x must be"):
        U.upconv(torch.randn(4, 3), w)
    with pytest.raises(ValueError, match="weight must be"):
        U.upconv(x, torch.randn(5, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="weight must be"):
        U.upconv(x, torch.randn(4, 2, 2, 2))
    with pytest.raises(ValueError, match="bias must have shape"):
        U.upconv(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="share a dtype"):
        U.upconv(x, w.double())
    with pytest.raises(ValueError, match="skip must be"):
        U.upconv(x, w, skip=torch.randn(1, 2, 6, 6, 5))
    with pytest.raises(ValueError, match="skip must be"):
        U.upconv(x, w, skip=torch.randn(2, 2, 6, 6, 6))
    with pytest.raises(ValueError, match="output channels"):
        U.upconv(x, torch.randn(4, 0, 2, 2, 2))
    with pytest.raises(TypeError, match="skip_first"):
        U.upconv(x, w, None, torch.randn(1, 3, 6, 6, 6), "yes")


def test_direct_op_calls_and_modules_check_shapes():
    """Found by review: the registered op trusted its shapes (a too-small channels-last skip
    crashed, a short bias was read past its end), and FastConvTranspose took an input with the
    wrong channel count to the kernel (garbage, or a crash). Now the op checks, and the module
    leaves a wrong input to PyTorch's own error."""
    from fastmed.nn import FastConvTranspose2d, FastConvTranspose3d

    op = torch.ops.fastmed.upconv_fwd
    x = torch.randn(1, 4, 3, 3, 3)
    w = torch.randn(4, 6, 2, 2, 2)
    xcl = x.contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="skip must be"):
        op(xcl, w, None, torch.randn(1, 5, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d), False)
    with pytest.raises(ValueError, match="skip must be"):
        op(torch.randn(2, 4, 3, 3, 3), w, None, torch.randn(1, 5, 6, 6, 6), False)
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, w, torch.randn(1), None, False)
    with pytest.raises(ValueError, match="weight must be"):
        op(x, torch.randn(9, 6, 2, 2, 2), None, None, False)
    with pytest.raises(TypeError, match="skip must have x's dtype"):
        op(x, w, None, torch.randn(1, 5, 6, 6, 6, dtype=torch.float64), False)
    # upconv() itself promotes as torch.cat does
    assert U.upconv(x, w, None, torch.randn(1, 5, 6, 6, 6, dtype=torch.float64)).dtype == torch.float64
    for mod, shape in ((FastConvTranspose3d(4, 6, 2, stride=2), (1, 2, 8, 8, 8)),
                       (FastConvTranspose2d(4, 6, 2, stride=2), (1, 64, 8, 8))):
        with pytest.raises(RuntimeError, match="channels"):
            mod(torch.randn(shape))


def test_import_fastmed_registers_every_op():
    import subprocess
    import sys

    code = ("import fastmed, torch; ops = ['upconv_fwd', 'norm_act_fwd', 'conv_norm_act_fwd', 'dice_ce_fwd', "
            "'resample', 'sliding_window_stitch']; print([o for o in ops if not hasattr(torch.ops.fastmed, o)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_large_output_streaming_stores():
    # outputs over 16 MB are written with non-temporal stores (AVX-512 build), the rest normally
    g = torch.Generator().manual_seed(7)
    x, w, b = _data((1, 8, 32, 32, 48), (2, 2, 2), 16, True, g)
    skip = torch.randn(1, 3, 64, 64, 96, generator=g)
    for xx, s in ((x, None), (x, skip), (_cl(x), _cl(skip))):
        y = U.upconv(xx, w, b, s)
        ref = U.upconv_reference(x, w, b, s)
        assert y.numel() * 4 > 16e6
        assert _err(y, ref) <= 1e-5 * ref.abs().max().item()
