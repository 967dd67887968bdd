"""``fastmed::upconv_fwd``: a transposed convolution whose kernel equals its stride (a U-Net
decoder's upsampling: DynUNet's and nnU-Net's ``ConvTranspose3d(k=2, s=2)``, ``(1, 2, 2)`` on
anisotropic data), optionally written straight into the concatenation with a skip connection.

``upconv(x, weight, bias, skip=None, skip_first=False)`` returns
``conv_transpose(x, weight, bias, stride=kernel_size)`` and, given ``skip``,
``torch.cat((up, skip), 1)`` (``(skip, up)`` with ``skip_first``) without the intermediate
upsampled tensor: the kernel writes its channels of the concatenation directly and only the skip
is copied. Kernel sizes with no overlap have no input/output ambiguity, so no ``output_size``.

Why: on planar (NCDHW) float32 data PyTorch's CPU path computes the transposed convolution in
channels-last order and then transposes the whole output; for 64 -> 32 channels at 48^3 -> 96^3
that copy alone took longer (150 ms) than the convolution on our 2-core CPU. The C++ kernel
(``csrc/upconv/``) writes planar rows directly. On channels-last (NDHWC) data, the default layout
of ``fastmed.optimize`` on the CPU, PyTorch's transposed convolution is fast, but ``torch.cat``
then reads its whole output back and writes it again: there the kernel writes the upsampled
channels straight into their slice of a channels-last concatenation buffer (a GEMM of the input
voxels by the packed weights), and the op returns a channels-last tensor. Float32 on the CPU only:
planar data with ``kernel_size[-1]`` 1 or 2, or channels-last data with a skip; everywhere else
(CUDA, float64, channels-last data without a skip, other kernels) the same op is PyTorch's
``conv_transpose`` + ``cat`` (``upconv_suits`` says which).

Backward: PyTorch's ``convolution_backward`` (transposed) on the upsampled part of the gradient;
the skip's gradient is its slice of the incoming one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext

__all__ = ["upconv", "upconv_reference", "upconv_suits"]


def _kernel(weight: Tensor) -> list:
    return list(weight.shape[2:])


def _channels_last(x: Tensor) -> bool:
    """x is dense channels last (NDHWC / NHWC) and not also contiguous (one channel, size-1 dims)."""
    cl = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    return x.is_contiguous(memory_format=cl) and not x.is_contiguous()


def _kernel_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor], concat: bool = False) -> bool:
    """Whether the C++ kernel computes this one (else conv_transpose + cat inside the op): float32
    CPU; planar x with the kernel's last size 1 or 2, or channels-last x concatenated with a skip
    (any kernel: the upsampled channels are written into the concatenation, see _run_kernel)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.ndim in (4, 5)
            and _ext.cpu is not None and hasattr(_ext.cpu, "upconv")):
        return False
    if _channels_last(x):
        return concat and hasattr(_ext.cpu.UpConvParams(), "channels_last")
    return weight.shape[-1] in (1, 2)


def _out_format(x: Tensor):
    """The op's output layout: channels last for channels-last x, else contiguous (its fake says so)."""
    if _channels_last(x):
        return torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    return torch.contiguous_format


def upconv_suits(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int] = 0,
                 output_padding: Sequence[int] = 0, dilation: Sequence[int] = 1, groups: int = 1,
                 concat: bool = False) -> bool:
    """True where fastmed's kernel computes ``conv_transpose{2,3}d(x, weight, stride=...)`` itself:
    batched float32 CPU input, kernel == stride, no padding, output padding or dilation, one group;
    planar x with the kernel's last size 1 or 2, or (``concat``: the result is to be concatenated
    with a skip) channels-last x with any such kernel; not under torch.compile or CPU autocast (they
    pick their own kernels). Channels-last x alone keeps PyTorch's own path (oneDNN, as fast)."""
    nd = x.ndim - 2
    if (nd not in (2, 3) or weight.ndim != x.ndim or x.numel() == 0 or weight.numel() == 0 or x.is_mkldnn
            or weight.is_mkldnn or x.shape[1] != weight.shape[0] or _ext.functorch_active()):
        return False  # (wrong channel counts: PyTorch's own error; torch.func: PyTorch's ops)

    def tup(v):
        return [v] * nd if isinstance(v, int) else list(v)

    if (tup(stride) != _kernel(weight) or any(tup(padding)) or any(tup(output_padding))
            or any(d != 1 for d in tup(dilation)) or groups != 1):
        return False
    if not _kernel_ok(x, weight, None, concat):
        return False
    if not (x.is_contiguous() or (concat and _channels_last(x))):
        return False  # other strides (channels last without a concatenation: oneDNN is as fast)
    return not (torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"))


def _out_shape(x: Tensor, weight: Tensor) -> list:
    k = _kernel(weight)
    return [x.shape[0], weight.shape[1]] + [s * kk for s, kk in zip(x.shape[2:], k)]


def _composite(x, weight, bias, skip, skip_first, in_op=False):
    """PyTorch's conv_transpose (+ cat); laid out as _out_format says inside the op (its fake
    function says so)."""
    fn = F.conv_transpose3d if x.ndim == 5 else F.conv_transpose2d
    y = fn(x, weight, bias, stride=_kernel(weight))
    if skip is not None:
        y = torch.cat((skip, y) if skip_first else (y, skip), 1)
    return y.contiguous(memory_format=_out_format(x)) if in_op else y


def _run_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, skip: Optional[Tensor] = None,
                skip_at: Optional[Tensor] = None) -> None:
    """The C++ kernel: conv_transpose(x) into y (y: (N, Cout, ...), a channel slice of a
    concatenation buffer laid out as x: planar, its samples further apart; or channels last, its
    voxels further apart). Channels last: ``skip`` (dense channels last) is copied into
    ``skip_at`` (its slice of the same buffer) in the same pass."""
    cl = _channels_last(x)
    if not cl:
        x = x.contiguous()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    mod = _ext.require(x.device, "upconv")
    p = mod.UpConvParams()
    sp = list(x.shape[2:])
    k = _kernel(w)
    if x.ndim == 4:
        sp, k = [1] + sp, [1] + k
    p.N, p.Cin, p.Cout = x.shape[0], x.shape[1], w.shape[1]
    p.D, p.H, p.W = sp
    p.kD, p.kH, p.kW = k
    p.dtype = _ext.DTYPE_CODES[x.dtype]
    p.x, p.weight = x.data_ptr(), w.data_ptr()
    p.bias = b.data_ptr() if b is not None else 0
    p.y = y.data_ptr()
    p.y_batch_stride = y.stride(0)
    if cl:
        p.channels_last = 1
        p.y_voxel_stride = y.stride(-1)  # the channels of the whole concatenation
        if skip is not None:
            p.skip = skip.data_ptr()
            p.skip_channels = skip.shape[1]
            p.skip_y_offset = (skip_at.data_ptr() - y.data_ptr()) // y.element_size()
    p.num_threads = _ext.num_threads()
    mod.upconv(p)


@torch.library.custom_op("fastmed::upconv_fwd", mutates_args=())
def upconv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], skip: Optional[Tensor],
               skip_first: bool) -> Tensor:
    _check(x, weight, bias, skip)  # the kernel trusts the shapes: a direct call of the op gets them checked
    if skip is not None and skip.dtype != x.dtype:
        raise TypeError(f"upconv_fwd: skip must have x's dtype {x.dtype}, got {skip.dtype} (upconv() promotes)")
    if not _kernel_ok(x, weight, bias, skip is not None):
        return _composite(x, weight, bias, skip, skip_first, in_op=True)
    shape = _out_shape(x, weight)
    cup = shape[1]
    cs = 0 if skip is None else skip.shape[1]
    y = torch.empty([shape[0], cup + cs] + shape[2:], dtype=x.dtype, device=x.device,
                    memory_format=_out_format(x))
    up = y[:, cs:] if skip_first else y[:, :cup]
    at = None if skip is None else (y[:, :cs] if skip_first else y[:, cup:])
    if at is not None and _channels_last(x) and _channels_last(skip):
        _run_kernel(x, weight, bias, up, skip, at)  # the skip copied in the kernel's pass
    else:
        _run_kernel(x, weight, bias, up)
        if at is not None:
            at.copy_(skip)
    return y


@upconv_fwd.register_fake
def _(x, weight, bias, skip, skip_first):
    shape = _out_shape(x, weight)
    if skip is not None:
        shape[1] += skip.shape[1]
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, skip, skip_first = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.cs = 0 if skip is None else skip.shape[1]
    ctx.skip_first = skip_first


def _backward(ctx, g):
    x, weight = ctx.saved_tensors
    cup, cs = weight.shape[1], ctx.cs
    if cs:
        gup, gskip = (g[:, cs:], g[:, :cs]) if ctx.skip_first else (g[:, :cup], g[:, cup:])
    else:
        gup, gskip = g, None
    nd = x.ndim - 2
    nx, nw, nb = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.aten.convolution_backward(
        gup, x, weight, [cup] if ctx.has_bias else None, _kernel(weight), [0] * nd, [1] * nd, True, [0] * nd, 1,
        [nx, nw, nb and ctx.has_bias])
    return dx, dw, db, gskip, None


upconv_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], skip: Optional[Tensor]) -> None:
    if not isinstance(x, Tensor) or x.ndim not in (4, 5):
        raise ValueError(f"upconv: x must be a (N, C, H, W) or (N, C, D, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.ndim != x.ndim or weight.shape[0] != x.shape[1]:
        raise ValueError(f"upconv: weight must be (C_in={x.shape[1]}, C_out, *kernel) with {x.ndim - 2} kernel "
                         f"sizes (torch.nn.ConvTranspose layout), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.shape[1] == 0 or any(k < 1 for k in weight.shape[2:]):
        raise ValueError(f"upconv: weight must have output channels and a kernel, got shape {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[1],)):
        raise ValueError(f"upconv: bias must have shape ({weight.shape[1]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"upconv: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"upconv: x, weight and bias must be on one device, got {x.device}, {weight.device}")
    if skip is not None:
        shape = _out_shape(x, weight)
        if (not isinstance(skip, Tensor) or skip.ndim != x.ndim or skip.shape[0] != x.shape[0]
                or list(skip.shape[2:]) != shape[2:]):
            raise ValueError(f"upconv: skip must be (N={shape[0]}, C, {', '.join(map(str, shape[2:]))}) to be "
                             f"concatenated with the upsampled x, got "
                             f"{tuple(skip.shape) if isinstance(skip, Tensor) else type(skip).__name__}")
        if skip.device != x.device:
            raise ValueError(f"upconv: skip is on {skip.device}, x on {x.device}")


def upconv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, skip: Optional[Tensor] = None,
           skip_first: bool = False) -> Tensor:
    """``conv_transpose(x, weight, bias, stride=kernel_size)``, concatenated with ``skip`` along the
    channels when given (after it with ``skip_first``). Same values as PyTorch to float32
    rounding (each output sums its input channels in order)."""
    _check(x, weight, bias, skip)
    if not isinstance(skip_first, bool):
        raise TypeError(f"upconv: skip_first must be a bool, got {skip_first!r}")
    if not upconv_suits(x, weight, _kernel(weight), concat=skip is not None) or (
            skip is not None and skip.dtype != x.dtype):
        return _composite(x, weight, bias, skip, skip_first)  # (a dtype mismatch: cat's type promotion)
    return upconv_fwd(x, weight, bias, skip, skip_first)


def upconv_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, skip: Optional[Tensor] = None,
                     skip_first: bool = False) -> Tensor:
    """The same in float64 with PyTorch's transposed convolution (the tests' oracle)."""
    d = torch.float64
    return _composite(x.to(d), weight.to(d), None if bias is None else bias.to(d),
                      None if skip is None else skip.to(d), skip_first)
