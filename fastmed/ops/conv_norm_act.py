"""``fastmed::conv_norm_act_fwd``: convolution -> instance norm -> activation as one op (nnU-Net's
``Conv3d -> InstanceNorm3d(affine) -> LeakyReLU``), forward and backward.

``conv_norm_act(x, weight, conv_bias, norm_weight, norm_bias, stride, padding, dilation, eps, act,
slope)`` returns ``act(instance_norm(conv(x)))``. On CUDA, with ``FASTMED_TRITON_CONV=1``, the
convolution is fastmed's Triton implicit GEMM (``fastmed/kernels/conv_triton.py``) whose epilogue
also writes the norm's per-tile statistics, so the norm reads the convolution's output once (its
elementwise pass) instead of twice; the merge and elementwise pass are norm_act's Triton kernels.
Everywhere else (the default on CUDA until the Triton convolution is measured on a GPU; CPUs;
groups > 1; float64) the convolution is PyTorch's (cuDNN / oneDNN) followed by ``fastmed::norm_act``.

``fastmed::conv_norm_act2_infer``: two such layers in a row for inference; with the Triton
convolution the first layer's norm + activation are applied in the second convolution's prologue
(the first normalised activation is never stored), elsewhere two ``conv_norm_act_infer`` calls.

``fastmed::conv_norm_act2_fwd``: the same two layers in training, with autograd. With the Triton
convolution the first norm + activation run in the second convolution's prologue (z1 never
written); everywhere the backward keeps y1 and y2 but not z1, which it recomputes from y1 and the
saved statistics (``norm_act_apply``: the same bits). fastmed.optimize uses it on the Triton route
only (see ``fastmed.nn._train_pair`` for why not on the CPU).

``norm_act_keep_source`` (``keep_source`` for the fused group and batch norms of fastmed.nn): on
the CPU in training, a fused norm's output that a convolution through ``conv_nd`` takes is not kept
by that convolution: it keeps the norm's input and statistics instead and recomputes its input in
its own backward (``_ConvOfNormAct``).

Backward: where the forward ran the Triton convolution, fastmed's Triton backward
(``fastmed/kernels/conv_bwd_triton.py``): norm_act's backward sums, then the convolution's data and
weight gradients as implicit GEMMs that compute the norm + activation backward while they load
(the gradient of y is never stored); in ``conv_norm_act2_fwd`` the second weight gradient reads z1
through the first norm + activation, so z1 is not written in the backward either. Elsewhere
``fastmed::norm_act_bwd`` (the pre-activation recomputed from the saved convolution output), then
PyTorch's ``convolution_backward`` (cuDNN / oneDNN).
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import norm_act as NA

__all__ = ["conv_norm_act", "conv_norm_act_reference", "triton_conv_enabled", "onednn_suits", "conv_nd"]

# PyTorch sends a float32 CPU convolution to oneDNN only when the batch has more than one sample or
# C * D * H of the input exceeds this (a threshold made for 2D images); below it, a batch-1 3D input
# (a network's first layer, its deep layers, patches) takes a generic loop that is up to 4x slower
# here and returns contiguous output for channels-last input (one more copy per layer).
_ATEN_ONEDNN_MIN = 20480
# below this many multiply-adds (or for 1x1x1 kernels) the generic loop is as fast or faster
_ONEDNN_MIN_MACS = 2_000_000


def onednn_suits(x: Tensor, weight: Tensor, stride=(1, 1, 1), groups: int = 1) -> bool:
    """True where fastmed calls oneDNN's convolution directly for this float32 CPU 3D convolution
    because PyTorch would not (batch 1, small C * D * H) and oneDNN is the faster choice: kernels
    larger than 1x1x1 with at least 2M multiply-adds, or channels-last data or weights (which the
    other loop would turn contiguous; a weight with one input channel is channels last when its
    channel stride is 1). Never under CPU autocast or torch.compile. Same numbers to float32
    rounding (another summation order)."""
    if torch.compiler.is_compiling():
        return False  # the compiler picks its own kernels (and checked first: torch.backends calls
        # below would break its graph at every convolution)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.ndim != 5
            or weight.ndim != 5 or x.is_mkldnn or weight.is_mkldnn or x.numel() == 0):
        return False
    if x.shape[0] != 1 or x.shape[1] * x.shape[2] * x.shape[3] > _ATEN_ONEDNN_MIN:
        return False  # PyTorch already runs oneDNN here
    if any(st < 1 for st in stride):
        return False  # PyTorch's convolution says what is wrong
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast casts F.conv3d's inputs
    kvol = weight.shape[2] * weight.shape[3] * weight.shape[4]
    cl = torch.channels_last_3d
    if (x.is_contiguous(memory_format=cl) and not x.is_contiguous()) or (kvol > 1 and weight.stride(1) == 1):
        return True  # channels-last data, or a channels-last weight (1 input channel: its strides say so)
    out_vox = math.prod(max(1, s // st) for s, st in zip(x.shape[2:], stride))
    return kvol > 1 and out_vox * weight.shape[0] * weight.shape[1] * kvol >= _ONEDNN_MIN_MACS


class _OneDNNConv(torch.autograd.Function):
    """oneDNN's convolution forward; backward by PyTorch's ``convolution_backward`` (itself
    differentiable, so double backward works as through F.conv3d)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), list(dilation), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), list(dilation), groups, bias is not None)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        nx, nw, nb = ctx.needs_input_grad[:3]
        dx, dw, db = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
            [0] * (x.ndim - 2), groups, [nx, nw, nb and has_bias])
        if dx is not None and x.is_contiguous() and not dx.is_contiguous():
            # a planar input with a channels-last weight (optimize(channels_last=True)) gets its
            # gradient channels last; PyTorch 2.13's CPU instance_norm backward at batch 1 returns
            # wrong gradients for such a grad_output, so it goes back in the input's layout
            dx = dx.contiguous()
        return dx, dw, db, None, None, None, None


def conv_nd(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int = 1,
            autograd: bool = True) -> Tensor:
    """F.conv2d / F.conv3d (zero padding given as numbers), with oneDNN called directly where
    ``onednn_suits``; autograd as F.conv3d's (``autograd=False``: inside an op with its own). With
    autograd, an input that a fused norm made (``norm_act_keep_source``, ``keep_source``) is not
    kept for the backward: the convolution keeps the norm's input and statistics instead and
    recomputes x."""
    nd = weight.ndim - 2
    stride, padding, dilation = (_ints(v, nd) for v in (stride, padding, dilation))
    tracing = torch.jit.is_tracing()  # a traced graph records aten ops, not Python autograd functions
    if _ext.functorch_active():  # torch.func transforms: PyTorch's own convolution
        fn = F.conv3d if weight.ndim == 5 else F.conv2d
        return fn(x, weight, bias, stride, padding, dilation, groups)
    if autograd and torch.is_grad_enabled() and not tracing:
        src = _norm_source(x, weight, bias)
        if src is not None:
            return _ConvOfNormAct.apply(x, *src[:6], weight, bias, (stride, padding, dilation, groups) + src[6:])
    if onednn_suits(x, weight, stride, groups):
        if autograd and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                     or (bias is not None and bias.requires_grad)):
            if not tracing:
                return _OneDNNConv.apply(x, weight, bias, stride, padding, dilation, groups)
            fn = F.conv3d if weight.ndim == 5 else F.conv2d
            return fn(x, weight, bias, stride, padding, dilation, groups)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), list(dilation), groups)
    fn = F.conv3d if weight.ndim == 5 else F.conv2d  # x may be unbatched
    return fn(x, weight, bias, stride, padding, dilation, groups)


# ------------------------------------------------------------------------------------------------
# training on the CPU: a convolution whose input is a fused norm's output keeps the norm's
# input for its backward instead of its own


def norm_act_keep_source(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: str,
                         slope: float, prelu: Optional[Tensor] = None) -> Tensor:
    """``norm_act(x, weight, bias, eps, act, slope, prelu)`` (instance norm) whose result z
    remembers where it came from: x (weakly), the per-plane statistics and the parameters. A 3D / 2D
    convolution through ``conv_nd`` with autograd (``OneDNNConv3d`` / ``FastConv2d``, the optimized
    models' and ``ConvNormAct``'s convolutions) that then takes z keeps those for its backward
    instead of z and recomputes z there (``norm_act_apply``: the same bits). The norm's own
    backward keeps x anyway, so each conv -> norm -> act layer of a chain holds one activation for
    the backward where eager PyTorch holds two (the convolution's input and the norm's input).
    Nothing is kept longer than in eager: the reference to x is weak (once the norm's backward has
    freed x, z is an ordinary tensor). z, x or the norm's parameters modified in place before the
    convolution make z an ordinary tensor too; not while compiling, tracing or with compiled
    autograd on.

    Two differences from eager remain, both outside autograd's usual rules: z's values changed
    through ``z.data`` (no version bump) before the convolution are not seen by its backward, which
    recomputes the norm's output; and x or the norm's parameters modified in place after the
    convolution make its backward raise autograd's "modified by an inplace operation" error (eager
    raises it too, but only once the backward reaches the norm)."""
    code = NA._check(x, weight, bias, eps, act, prelu)
    prelu = prelu if code == NA.ACTS["prelu"] else None
    if not x.is_contiguous() and NA._cl_format(x) is None:
        x = x.contiguous()
    z, mean, rstd = NA.norm_act_fwd(x, weight, bias, float(eps), float(slope), code, prelu)
    return keep_source(z, x, mean, rstd, weight, bias, prelu, eps, slope, code, ("instance",))


def keep_source(z: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                prelu: Optional[Tensor], eps: float, slope: float, act: int, norm: tuple) -> Tensor:
    """Records z = fastmed::norm_act_fwd(x, ...)[0] (per-plane ``mean`` / ``rstd`` its other outputs;
    ``act`` its code, ``prelu`` None unless it is PReLU) as norm_act_keep_source does, and returns z.
    ``norm`` says how a double backward recomputes z with eager ops: ("instance",), ("group",
    num_groups), ("batch",) (batch statistics) or ("given",) (constant statistics: batch norm in
    eval). Only on the CPU, with autograd recording z."""
    if z.device.type == "cpu" and torch.is_grad_enabled() and z.requires_grad and _recompute_allowed():
        key = id(z)
        ref = weakref.ref(z, lambda r: _SOURCES.pop(key) if _SOURCES.get(key, (None,))[0] is r else None)
        _SOURCES[key] = (ref, z._version, weakref.ref(x), _versions(x, weight, bias, prelu), mean, rstd, weight,
                         bias, prelu, float(eps), float(slope), act, norm)
    return z


def _versions(*ts) -> tuple:
    return tuple(None if t is None else t._version for t in ts)


def _recompute_allowed() -> bool:
    """Not while compiling or tracing (the graph would hold Python functions), and not with compiled
    autograd switched on (it cannot take the None gradients _ConvOfNormAct gives its inputs that
    only carry values)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    try:
        import torch._dynamo.compiled_autograd as ca
        import torch._dynamo.config as dc
    except Exception:  # noqa: BLE001 - no dynamo here: nothing of it is on
        return True
    return not (getattr(dc, "compiled_autograd", False) or getattr(ca, "compiled_autograd_enabled", False))


# id(z) -> (weak z, z's version, weak x, versions of x / weight / bias / prelu, mean, rstd, weight, bias,
# prelu, eps, slope, act, norm) for the outputs of keep_source that are alive. A table, not an
# attribute of z, so that z pickles (torch.save) as any tensor; an entry goes with its z.
_SOURCES: dict = {}


def _norm_source(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[tuple]:
    """(y, mean, rstd, norm weight, norm bias, prelu, eps, slope, act, norm) when x is keep_source's
    unmodified output, its input y is alive and unmodified, and this convolution runs x as it is
    (CPU, x's dtype, batched, no autocast, not compiling); else None."""
    src = _SOURCES.get(id(x))
    if src is None or src[0]() is not x or src[1] != x._version or not _recompute_allowed():
        return None
    y = src[2]()
    if y is None or _versions(y, src[6], src[7], src[8]) != src[3]:
        return None  # gone, or it or the norm's parameters changed in place since
    if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or weight.dtype != x.dtype
            or weight.device != x.device or weight.ndim != x.ndim or (bias is not None and bias.dtype != x.dtype)):
        return None
    return (y,) + src[4:]


class _ConvOfNormAct(torch.autograd.Function):
    """conv(z) for z = norm_act_keep_source(y): the forward is conv_nd's; the backward recomputes z
    from y and the saved statistics, then runs PyTorch's ``convolution_backward`` (the gradient eager
    autograd computes, bit for bit). y, the statistics and the norm's parameters are inputs only so
    that they are saved (and a double backward reaches them); the output depends on them only through
    z, so their gradients here are zero (None)."""

    @staticmethod
    def forward(z, y, mean, rstd, nw, nb, prelu, weight, bias, conf):
        stride, padding, dilation, groups = conf[:4]
        return conv_nd(z, weight, bias, stride, padding, dilation, groups, autograd=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, y, mean, rstd, nw, nb, prelu, weight, bias, conf = inputs
        ctx.save_for_backward(y, mean, rstd, nw, nb, prelu, weight, bias)
        ctx.conf = conf

    @staticmethod
    def backward(ctx, g):
        y, mean, rstd, nw, nb, prelu, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups, eps, slope, act, norm = ctx.conf
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # backward(create_graph=True)
            return _conv_of_norm_act_graph(ctx, g, y, nw, nb, prelu, weight, bias)
        z = NA.norm_act_apply(y, nw, nb, mean, rstd, slope, act, prelu)
        dz, dw, db = torch.ops.aten.convolution_backward(
            g, z, weight, None if bias is None else list(bias.shape), stride, padding, dilation, False,
            [0] * (z.ndim - 2), groups, [need[0], need[7], need[8] and bias is not None])
        return dz, None, None, None, None, None, None, dw, db, None


def _conv_of_norm_act_graph(ctx, g, y, nw, nb, prelu, weight, bias):
    """_ConvOfNormAct's backward as PyTorch ops that autograd records: z recomputed from y by eager
    PyTorch's norm and activation (statistics included, in y's dtype), so the gradient's own graph
    reaches y and the norm's parameters as eager autograd's reaches them through z, at eager's
    cost."""
    stride, padding, dilation, groups, eps, slope, act, norm = ctx.conf
    need = ctx.needs_input_grad
    with torch.enable_grad():
        if norm[0] == "instance":
            z = F.instance_norm(y, weight=nw, bias=nb, eps=eps)
        elif norm[0] == "group":
            z = F.group_norm(y, norm[1], nw, nb, eps)
        elif norm[0] == "batch":
            z = F.batch_norm(y, None, None, nw, nb, True, 0.0, eps)
        else:  # "given": constant statistics (batch norm in eval), saved per plane
            C = y.shape[1]
            mean, rstd = ctx.saved_tensors[1][:C], ctx.saved_tensors[2][:C]  # the running ones, per plane
            z = F.batch_norm(y, mean.to(y.dtype), (1.0 / rstd.square() - eps).to(y.dtype), nw, nb, False, 0.0, eps)
        if act == NA.ACTS["leaky_relu"]:
            z = F.leaky_relu(z, slope)
        elif act == NA.ACTS["relu"]:
            z = F.relu(z)
        elif act == NA.ACTS["prelu"]:
            z = F.prelu(z, prelu)
        if not z.requires_grad:
            z.requires_grad_()
        out = conv_nd(z, weight, bias, stride, padding, dilation, groups)
        wrt = [(i, t) for i, t in ((0, z), (7, weight), (8, bias)) if t is not None and need[i]]
        gs = torch.autograd.grad(out, [t for _, t in wrt], g, create_graph=True, allow_unused=True)
    res = [None] * 10
    for (i, _), gr in zip(wrt, gs):
        res[i] = gr
    return tuple(res)


def _ints(v, nd: int) -> list:
    """stride / padding / dilation as a list of nd ints (an int for every dim as F.conv3d takes it)."""
    return [int(v)] * nd if isinstance(v, int) else [int(i) for i in v]


def triton_conv_enabled() -> bool:
    """FASTMED_TRITON_CONV=1: CUDA convolutions of conv_norm_act by the Triton implicit GEMM where it
    is suited (conv_triton.suited), cuDNN elsewhere; ``force``: wherever it runs at all (tests)."""
    return os.environ.get("FASTMED_TRITON_CONV", "0") in ("1", "force")


_TRITON_CONV = []


def _out_shape(x, weight, stride, padding, dilation) -> tuple:
    sp, ks = x.shape[2:], weight.shape[2:]
    return (x.shape[0], weight.shape[0]) + tuple(
        (sp[i] + 2 * padding[i] - dilation[i] * (ks[i] - 1) - 1) // stride[i] + 1 for i in range(len(sp)))


def _triton_conv():
    """fastmed.kernels.conv_triton when Triton imports, else None."""
    if not _TRITON_CONV:
        mod = None
        try:
            from ..kernels import conv_triton as mod
        except Exception:  # no triton, or one that cannot load here
            mod = None
        _TRITON_CONV.append(mod)
    return _TRITON_CONV[0]


def _conv(x, weight, bias, stride, padding, dilation):
    return conv_nd(x, weight, bias, stride, padding, dilation, autograd=False)


def _cl(nd: int):
    return torch.channels_last_3d if nd == 5 else torch.channels_last


def _out_format(x, weight):
    """y and z are channels last when x or the weight is, and for 1-channel inputs (a network's
    first layer: there the two layouts of x are the same memory, and a channels-last output keeps
    the layers after it NDHWC); else contiguous. The same on every path, so the fake function knows it."""
    if NA._cl_format(x) is not None or NA._cl_format(weight) is not None or x.shape[1] == 1:
        return _cl(x.ndim)
    return torch.contiguous_format


def _conv_with_stats(kc, kn, x, weight, bias, stride, padding, dilation, prologue=None):
    """(y, psum, pm2, tile, mean, rstd): the Triton convolution with the norm's per-tile statistics in
    its epilogue (mean / rstd allocated, to be filled); ``prologue``: see conv_triton.conv_fwd."""
    shape = kc.out_shape(x, weight, stride, padding, dilation)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x, weight))
    N, C = shape[0], shape[1]
    M = math.prod(shape[2:])
    bm = kc.block_m(M)
    psum = torch.empty((N, -(-M // bm), C), dtype=kc.stats_dtype(x.dtype), device=x.device)
    pm2 = torch.empty_like(psum)
    with kn._guard(x.device):
        kc.conv_fwd(x, weight, bias, stride, padding, dilation, y, psum, pm2,
                    tf32=torch.backends.cudnn.allow_tf32, prologue=prologue)
    mean = torch.empty(N * C, dtype=torch.float64, device=x.device)
    return y, psum, pm2, bm, mean, torch.empty_like(mean)


def _triton_fwd(kc, kn, x, weight, bias, nw, nb, stride, padding, dilation, eps, slope, act, inplace=False,
                prologue=None):
    """(z, y, mean, rstd) by the Triton convolution (statistics in its epilogue) and norm_act's
    merge + elementwise kernels; y and z laid out as _out_format says (channels last is the fast one)."""
    y, psum, pm2, bm, mean, rstd = _conv_with_stats(kc, kn, x, weight, bias, stride, padding, dilation, prologue)
    z = y if inplace else torch.empty_like(y)  # in place: each element is read, then written once
    kn.finish_fwd(y, psum, pm2, bm, NA._affine_arg(nw, y), NA._affine_arg(nb, y), eps, slope, act, z, mean, rstd)
    return z, y, mean, rstd


_SMS: dict = {}


def _sms(device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _use_triton(x, weight, stride, padding, dilation, groups: int = 1, device=None):
    """(conv_triton, norm_act_triton) when the Triton convolution runs this call, else None:
    CUDA, FASTMED_TRITON_CONV=1, a layer the kernel takes and is suited to (see conv_triton.suited).
    ``device``: x's device when x is a meta-tensor stand-in (shape and dtype only)."""
    device = device if device is not None else x.device
    if device.type != "cuda" or not triton_conv_enabled():
        return None
    kc, kn = _triton_conv(), NA._triton()
    if kc is None or kn is None or not kc.supports(x, weight, groups):
        return None
    shape = kc.out_shape(x, weight, stride, padding, dilation)
    if os.environ.get("FASTMED_TRITON_CONV") != "force" and not kc.suited(
            x, weight, shape, torch.backends.cudnn.allow_tf32, _sms(device)):
        return None
    return kc, kn


@torch.library.custom_op("fastmed::conv_norm_act_fwd", mutates_args=())
def conv_norm_act_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                      norm_bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                      eps: float, slope: float, act: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = _try_triton(x, weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act, False)
    if out is not None:
        return out
    y = _conv(x, weight, bias, stride, padding, dilation).contiguous(memory_format=_out_format(x, weight))
    z, mean, rstd = NA.norm_act_fwd(y, norm_weight, norm_bias, eps, slope, act)
    return z, y, mean, rstd


# exceptions that are bugs of ours or the caller's, never a GPU's compile / launch failure
_OUR_BUGS = (torch.cuda.OutOfMemoryError, IndexError, KeyError, AttributeError, NameError, TypeError, ValueError,
             AssertionError, ZeroDivisionError)


def _triton_failed(exc: Exception) -> None:
    """The Triton convolution failed to compile or launch on this GPU: one warning, and PyTorch's
    convolution from then on."""
    import warnings

    warnings.warn(f"fastmed: the Triton convolution failed on this GPU ({type(exc).__name__}: {exc}); "
                  f"using PyTorch's convolution from now on", RuntimeWarning, stacklevel=5)
    _TRITON_CONV[:] = [None]


def _try_triton(x, weight, bias, nw, nb, stride, padding, dilation, eps, slope, act, inplace):
    """_triton_fwd's result where the Triton convolution runs this call, else None. Should it fail to
    compile or launch on this GPU, one warning, and PyTorch's convolution from then on."""
    use = _use_triton(x, weight, stride, padding, dilation)
    if use is None:
        return None
    try:
        return _triton_fwd(*use, x, weight, bias, nw, nb, stride, padding, dilation, eps, slope, act, inplace)
    except _OUR_BUGS:
        raise
    except Exception as exc:  # noqa: BLE001 - a compile / launch failure: cuDNN from now on
        _triton_failed(exc)
        return None


@conv_norm_act_fwd.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act):
    shape = _out_shape(x, weight, stride, padding, dilation)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x, weight))
    planes = shape[0] * shape[1]
    return torch.empty_like(y), y, x.new_empty(planes, dtype=torch.float64), x.new_empty(planes, dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    x, weight, bias, nw, nb, stride, padding, dilation, eps, slope, act = inputs
    _, y, mean, rstd = output
    ctx.save_for_backward(x, weight, y, nw, nb, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # y's gradient None when y is not used (not a tensor of zeros)
    # the Triton backward where the forward ran the Triton convolution: decided now, under the
    # forward's FASTMED_TRITON_CONV (the backward may run outside it); never in a compiled graph
    ctx.tri = not torch.compiler.is_compiling() and _use_triton(x, weight, stride, padding, dilation) is not None
    ctx.conf = (stride, padding, dilation, slope, act)
    ctx.bias_shape = None if bias is None else list(bias.shape)
    ctx.has = (bias is not None, nw is not None, nb is not None)


_TRITON_BWD = []


def _triton_conv_bwd():
    """fastmed.kernels.conv_bwd_triton when Triton imports, else None."""
    if not _TRITON_BWD:
        try:
            from ..kernels import conv_bwd_triton as mod
        except Exception:  # no triton, or one that cannot load here
            mod = None
        _TRITON_BWD.append(mod)
    return _TRITON_BWD[0]


def _triton_bwd(kn, kb, dz, x, weight, y, nw, nb, mean, rstd, conf, bias_shape, need, prologue=None,
                partials=None, prev_stats=None):
    """One layer's backward by the Triton kernels: (dx, dweight, dbias, dnorm_weight, dnorm_bias,
    prev_partials), the norm + activation backward inside the convolution's data and weight
    gradients (dy never stored; see conv_bwd_triton). ``prologue``: the weight gradient reads x
    through it (x is then the previous layer's raw output y1, as in the chained forward).

    The norm's backward sums over dz and y: from ``partials`` when given (the (ps0, ps1) another
    layer's data gradient produced in its epilogue), else a pass of their own (norm_act's
    statistics kernel). ``prev_stats`` = (mean1, rstd1) of the layer whose raw output x is (with
    ``prologue``): the data gradient's epilogue then produces that layer's partials, returned as
    ``prev_partials`` (else None), so that layer's backward needs no such pass."""
    stride, padding, dilation, slope, act = conf
    N, C = y.shape[0], y.shape[1]
    S = math.prod(y.shape[2:])
    dzp = dz.to(y.dtype)
    if not kb._same_layout(dzp, y):  # dz read with y's strides (strides of size-1 dims aside)
        dzp = torch.empty_like(y).copy_(dzp)
    nwa, nba = NA._affine_arg(nw, y), NA._affine_arg(nb, y)
    dnw = torch.zeros(N * C, dtype=torch.float64, device=y.device)
    dnb = torch.zeros_like(dnw)
    c = tuple(torch.zeros_like(dnw) for _ in range(3))
    dx = dw = db = prev = None
    with kn._guard(y.device):
        a, beta, sh = kn._coefs(mean, rstd, nwa, nba, N, C, y.dtype)
        if y.numel():
            prm = kn._scalars(0.0, slope, y.device)
            for n0, n1 in kn._slices(N):  # the grid's sample axis holds 65535 at most
                p0, p1 = n0 * C, n1 * C
                if partials is not None:
                    part = kn.finish_sums(partials[0][n0:n1], partials[1][n0:n1], S, nwa, rstd[p0:p1], dnw[p0:p1],
                                          dnb[p0:p1])
                else:
                    part = kn._bwd_sums(dzp[n0:n1], y[n0:n1], a[p0:p1], beta[p0:p1], sh[p0:p1], mean[p0:p1],
                                        rstd[p0:p1], nwa, prm, act, None, dnw[p0:p1], dnb[p0:p1], None)
                for t, v in zip(c, part):
                    t[p0:p1] = v
        cf = kb.coefficients(a, beta, sh, mean, rstd, *c)
        if need[0]:
            dx = torch.empty_like(x, memory_format=NA._cl_format(x) or torch.contiguous_format)
            st = None
            if prev_stats is not None and prologue is not None:
                pa, pb, psh, pact, pslope = prologue
                st = (x, pa, pb, psh, prev_stats[0], prev_stats[1], kn._scalars(0.0, pslope, y.device), pact)
            prev = kb.conv_dgrad(dzp, y, weight, cf, act, slope, dx, stride, padding, dilation, stats=st)
        if need[1]:
            dw = kb.conv_wgrad(dzp, y, x, weight, cf, act, slope, stride, padding, dilation,
                               sms=_sms(y.device) if y.device.type == "cuda" else 4, prologue=prologue)
            dw = dw.to(weight.dtype).contiguous(
                memory_format=_cl(weight.ndim) if NA._cl_format(weight) else torch.contiguous_format)
    if need[2] and bias_shape is not None:
        db = torch.zeros(bias_shape, dtype=weight.dtype, device=y.device)  # instance norm: exactly 0
    return dx, dw, db, dnw.view(N, C).sum(0), dnb.view(N, C).sum(0), prev


def _use_triton_bwd(tri: bool):
    """(norm_act_triton, conv_bwd_triton) where the layer's forward ran the Triton convolution
    (``tri``, decided in setup_context) and the kernels load, else None. Never while torch.compile
    traces the backward (fake tensors: the ops' unfused backward is what it records)."""
    if not tri or torch.compiler.is_compiling():
        return None
    kn, kb = NA._triton(), _triton_conv_bwd()
    return None if kn is None or kb is None else (kn, kb)


def _try_triton_bwd(use, *args, **kw):
    """_triton_bwd's result, or None when its kernels failed to compile or launch on this GPU (one
    warning; PyTorch's convolution backward from then on)."""
    if use is None or _triton_conv_bwd() is None:  # None: failed earlier in this process
        return None
    try:
        return _triton_bwd(*use, *args, **kw)
    except _OUR_BUGS:
        raise
    except Exception as exc:  # noqa: BLE001 - a compile / launch failure
        import warnings

        warnings.warn(f"fastmed: the Triton convolution backward failed on this GPU ({type(exc).__name__}: {exc}); "
                      f"using PyTorch's convolution backward from now on", RuntimeWarning, stacklevel=4)
        _TRITON_BWD[:] = [None]
        return None


def _backward(ctx, dz, dy_, dmean, drstd):
    if torch.is_grad_enabled():
        raise RuntimeError("fastmed conv_norm_act: double backward (create_graph=True) is not supported")
    x, weight, y, nw, nb, mean, rstd = ctx.saved_tensors
    stride, padding, dilation, slope, act = ctx.conf
    need = ctx.needs_input_grad
    if dz is None:  # only y was used
        dz = torch.zeros_like(y)
    out = None if dy_ is not None else _try_triton_bwd(
        _use_triton_bwd(ctx.tri), dz, x, weight, y, nw, nb, mean, rstd, ctx.conf, ctx.bias_shape, need[:3])
    if out is not None:
        dx, dw, db, dnw, dnb, _ = out
        return (dx, dw, db if ctx.has[0] else None,
                dnw.to(nw.dtype) if ctx.has[1] and need[3] else None,
                dnb.to(nb.dtype) if ctx.has[2] and need[4] else None,
                None, None, None, None, None, None)
    dy, dnw, dnb, _ = NA.norm_act_bwd(dz, y, nw, nb, mean, rstd, slope, act)
    if dy_ is not None:  # y is an output too (rarely used): its gradient adds
        dy = dy + dy_
    dx = dw = db = None
    if need[0] or need[1] or need[2]:
        nd = x.ndim - 2
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy.to(x.dtype), x, weight, ctx.bias_shape, stride, padding, dilation, False, [0] * nd, 1,
            [need[0], need[1], need[2] and ctx.has[0]])
    return (dx, dw, db if ctx.has[0] else None,
            dnw.to(nw.dtype) if ctx.has[1] and need[3] else None,
            dnb.to(nb.dtype) if ctx.has[2] and need[4] else None,
            None, None, None, None, None, None)


conv_norm_act_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastmed::conv_norm_act_infer", mutates_args=())
def conv_norm_act_infer(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                        norm_bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                        eps: float, slope: float, act: int) -> Tensor:
    """conv_norm_act_fwd's z without autograd, normalised in place in the convolution's output (one
    activation buffer per layer instead of two), for inference."""
    out = _try_triton(x, weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act, True)
    if out is not None:
        return out[0]
    y = _conv(x, weight, bias, stride, padding, dilation).contiguous(memory_format=_out_format(x, weight))
    NA.norm_act_inplace_op(y, norm_weight, norm_bias, eps, slope, act)
    return y


@conv_norm_act_infer.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act):
    return torch.empty(_out_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=_out_format(x, weight))


@torch.library.custom_op("fastmed::conv_norm_act2_infer", mutates_args=())
def conv_norm_act2_infer(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                         norm_bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                         eps: float, slope: float, act: int, weight2: Tensor, bias2: Optional[Tensor],
                         norm_weight2: Optional[Tensor], norm_bias2: Optional[Tensor], stride2: list[int],
                         padding2: list[int], dilation2: list[int], eps2: float, slope2: float,
                         act2: int) -> Tensor:
    """Two conv -> instance norm -> activation layers in a row (nnU-Net's and DynUNet's blocks), for
    inference. Where the Triton convolution runs both, the first layer's norm + activation are
    applied in the second convolution's prologue: its normalised activation is never written or
    read back (the same values: the prologue rounds as norm_act's elementwise pass does). Elsewhere
    two conv_norm_act_infer calls."""
    l1 = (weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act)
    l2 = (weight2, bias2, norm_weight2, norm_bias2, stride2, padding2, dilation2, eps2, slope2, act2)
    out = _try_chain(x, l1, l2)
    if out is not None:
        return out
    return conv_norm_act_infer(conv_norm_act_infer(x, *l1), *l2)


def _try_chain(x, l1, l2, train: bool = False):
    """conv_norm_act2_infer's result with the prologue (``train``: conv_norm_act2_fwd's, y2 kept
    apart from z2), or None where the Triton convolution does not run both layers (then, should it
    fail to compile or launch, one warning as in _try_triton)."""
    w1, b1, nw1, nb1, st1, pd1, dl1, eps1, slope1, act1 = l1
    w2, b2, nw2, nb2, st2, pd2, dl2, eps2, slope2, act2 = l2
    use = _use_triton(x, w1, st1, pd1, dl1)
    if use is None:
        return None
    kc, kn = use
    probe = torch.empty(kc.out_shape(x, w1, st1, pd1, dl1), dtype=x.dtype, device="meta")
    if _use_triton(probe, w2.to("meta"), st2, pd2, dl2, device=x.device) is None:
        return None
    try:
        y1, psum, pm2, bm, m1, r1 = _conv_with_stats(kc, kn, x, w1, b1, st1, pd1, dl1)
        a, beta, sh = kn.finish_stats(y1, psum, pm2, bm, NA._affine_arg(nw1, y1), NA._affine_arg(nb1, y1), eps1, m1,
                                      r1)
        z2, y2, m2, r2 = _triton_fwd(kc, kn, y1, w2, b2, nw2, nb2, st2, pd2, dl2, eps2, slope2, act2, not train,
                                     prologue=(a, beta, sh, act1, slope1))
        return (z2, y1, m1, r1, y2, m2, r2) if train else z2
    except _OUR_BUGS:
        raise
    except Exception as exc:  # noqa: BLE001 - a compile / launch failure: cuDNN from now on
        _triton_failed(exc)
        return None


@conv_norm_act2_infer.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act, weight2, bias2,
      norm_weight2, norm_bias2, stride2, padding2, dilation2, eps2, slope2, act2):
    y1 = torch.empty(_out_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                     memory_format=_out_format(x, weight))
    return torch.empty(_out_shape(y1, weight2, stride2, padding2, dilation2), dtype=x.dtype, device=x.device,
                       memory_format=_out_format(y1, weight2))


# ------------------------------------------------------------------------------------------------
# two layers in training: the first normalised activation is not kept for the backward


@torch.library.custom_op("fastmed::conv_norm_act2_fwd", mutates_args=())
def conv_norm_act2_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                       norm_bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                       eps: float, slope: float, act: int, weight2: Tensor, bias2: Optional[Tensor],
                       norm_weight2: Optional[Tensor], norm_bias2: Optional[Tensor], stride2: list[int],
                       padding2: list[int], dilation2: list[int], eps2: float, slope2: float,
                       act2: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Two conv -> instance norm -> activation layers in a row with autograd: (z2, y1, mean1, rstd1,
    y2, mean2, rstd2). The backward keeps x, y1 and y2 (the raw convolution outputs the norms'
    backward needs) but not the first layer's normalised activation z1, the second convolution's
    input: the backward recomputes it from y1 and the saved statistics (norm_act_apply, the same
    bits), so a block's training memory holds one activation less (eager keeps y1, z1, y2 and z2).
    Where the Triton convolution runs both layers, z1 is never written at all (the first norm +
    activation in the second convolution's prologue, as conv_norm_act2_infer)."""
    l1 = (weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act)
    l2 = (weight2, bias2, norm_weight2, norm_bias2, stride2, padding2, dilation2, eps2, slope2, act2)
    out = _try_chain(x, l1, l2, train=True)
    if out is not None:
        return out
    z1, y1, m1, r1 = _layer_fwd(x, *l1)
    z2, y2, m2, r2 = _layer_fwd(z1, *l2)
    return z2, y1, m1, r1, y2, m2, r2


def _chain_format(x, weight):
    """conv_norm_act2_fwd's y1 / y2 / z2 layout: as conv_norm_act_fwd's on CUDA (where the Triton
    convolution writes channels last); on the CPU channels last only when x or the weight already
    is (a 1-channel planar input stays planar: training runs planar there)."""
    if x.device.type == "cuda":
        return _out_format(x, weight)
    if NA._cl_format(x) is not None or NA._cl_format(weight) is not None:
        return _cl(x.ndim)
    return torch.contiguous_format


def _layer_fwd(x, weight, bias, nw, nb, stride, padding, dilation, eps, slope, act):
    """(z, y, mean, rstd) of one layer by PyTorch's convolution and norm_act, laid out as _chain_format."""
    if x.device.type == "cuda":
        out = _try_triton(x, weight, bias, nw, nb, stride, padding, dilation, eps, slope, act, False)
        if out is not None:
            return out
    y = _conv(x, weight, bias, stride, padding, dilation).contiguous(memory_format=_chain_format(x, weight))
    z, mean, rstd = NA.norm_act_fwd(y, nw, nb, eps, slope, act)
    return z, y, mean, rstd


@conv_norm_act2_fwd.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, padding, dilation, eps, slope, act, weight2, bias2,
      norm_weight2, norm_bias2, stride2, padding2, dilation2, eps2, slope2, act2):
    fmt1 = _chain_format(x, weight)
    y1 = torch.empty(_out_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                     memory_format=fmt1)
    y2 = torch.empty(_out_shape(y1, weight2, stride2, padding2, dilation2), dtype=x.dtype, device=x.device,
                     memory_format=_chain_format(y1, weight2))
    p1, p2 = y1.shape[0] * y1.shape[1], y2.shape[0] * y2.shape[1]
    st = lambda n: x.new_empty(n, dtype=torch.float64)  # noqa: E731
    return torch.empty_like(y2), y1, st(p1), st(p1), y2, st(p2), st(p2)


def _setup_chain(ctx, inputs, output):
    x, w1, b1, nw1, nb1, st1, pd1, dl1, eps1, slope1, act1, w2, b2, nw2, nb2, st2, pd2, dl2, eps2, slope2, act2 = inputs
    _, y1, m1, r1, y2, m2, r2 = output
    ctx.save_for_backward(x, w1, y1, nw1, nb1, m1, r1, w2, y2, nw2, nb2, m2, r2, b1, b2)
    ctx.mark_non_differentiable(m1, r1, m2, r2)
    ctx.set_materialize_grads(False)  # y1's and y2's gradients None when unused (not tensors of zeros)
    compiling = torch.compiler.is_compiling()  # a compiled graph: never (see _setup_context)
    ctx.tri = (not compiling and _use_triton(x, w1, st1, pd1, dl1) is not None,
               not compiling and _use_triton(y1, w2, st2, pd2, dl2) is not None)
    ctx.conf = ((st1, pd1, dl1, slope1, act1), (st2, pd2, dl2, slope2, act2))
    ctx.eps = (eps1, eps2)
    ctx.bias_shapes = (None if b1 is None else list(b1.shape), None if b2 is None else list(b2.shape))
    ctx.has = (b1 is not None, nw1 is not None, nb1 is not None, b2 is not None, nw2 is not None, nb2 is not None)


def _layer_bwd(dz, dy_, x, weight, y, nw, nb, mean, rstd, conf, bias_shape, need):
    """One layer's backward: (dx, dweight, dbias, dnorm_weight, dnorm_bias) as conv_norm_act_fwd's."""
    stride, padding, dilation, slope, act = conf
    dy, dnw, dnb, _ = NA.norm_act_bwd(dz, y, nw, nb, mean, rstd, slope, act)
    if dy_ is not None:
        dy = dy + dy_
    nd = x.ndim - 2
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy.to(x.dtype), x, weight, bias_shape, stride, padding, dilation, False, [0] * nd, 1,
        [need[0], need[1], need[2] and bias_shape is not None])
    return dx, dw, db, dnw, dnb


def _chain_graph_backward(ctx, dz2, dy1_, dy2_):
    """The backward as PyTorch ops that autograd records (create_graph=True: a gradient penalty):
    both layers recomputed in float64 plain PyTorch and differentiated, as norm_act's own graph
    backward does, so the gradient is itself differentiable."""
    x, w1, _, nw1, nb1, _, _, w2, _, nw2, nb2, _, _, b1, b2 = ctx.saved_tensors
    (st1, pd1, dl1, slope1, act1), (st2, pd2, dl2, slope2, act2) = ctx.conf
    ins = (x, w1, b1, nw1, nb1, w2, b2, nw2, nb2)
    at = (0, 1, 2, 3, 4, 11, 12, 13, 14)  # their places among the op's inputs
    with torch.enable_grad():
        d = [None if t is None else t.double() for t in ins]
        y1 = _conv(d[0], d[1], d[2], st1, pd1, dl1)
        z1 = NA._reference_fwd(y1, d[3], d[4], ctx.eps[0], slope1, act1)[0]
        y2 = _conv(z1, d[5], d[6], st2, pd2, dl2)
        z2 = NA._reference_fwd(y2, d[7], d[8], ctx.eps[1], slope2, act2)[0]
        outs, grads = [z2], [dz2.double()]
        for y, dy_ in ((y1, dy1_), (y2, dy2_)):  # y1 / y2 are outputs too (rarely used)
            if dy_ is not None:
                outs.append(y)
                grads.append(dy_.double())
        wrt = [(i, t) for i, t in zip(at, ins) if t is not None and ctx.needs_input_grad[i]]
        gs = torch.autograd.grad(outs, [t for _, t in wrt], grads, create_graph=True, allow_unused=True)
    out = [None] * 21
    for (i, t), gr in zip(wrt, gs):
        out[i] = None if gr is None else gr.to(t.dtype)
    return tuple(out)


def _chain_backward(ctx, dz2, dy1_, dm1, dr1, dy2_, dm2, dr2):
    x, w1, y1, nw1, nb1, m1, r1, w2, y2, nw2, nb2, m2, r2, _, _ = ctx.saved_tensors
    if dz2 is None:  # only y1 / y2 were used
        dz2 = torch.zeros_like(y2)
    if torch.is_grad_enabled():  # backward(create_graph=True)
        return _chain_graph_backward(ctx, dz2, dy1_, dy2_)
    c1, c2 = ctx.conf
    need = ctx.needs_input_grad
    use = _use_triton_bwd(ctx.tri[0]) if dy1_ is None and dy2_ is None else None
    out2 = None
    if use is not None and ctx.tri[1]:
        # the second layer's weight gradient reads z1 through the first norm + activation (z1 is not
        # written in the backward either)
        N, C = y1.shape[0], y1.shape[1]
        a1, beta1, sh1 = use[0]._coefs(m1, r1, NA._affine_arg(nw1, y1), NA._affine_arg(nb1, y1), N, C, y1.dtype)
        # and its data gradient's epilogue sums the first layer's backward sums over the dz1 it stores
        out2 = _try_triton_bwd(use, dz2, y1, w2, y2, nw2, nb2, m2, r2, c2, ctx.bias_shapes[1],
                               (True, need[11], need[12]),
                               prologue=(a1.float(), beta1.float(), sh1.float(), c1[4], c1[3]), prev_stats=(m1, r1))
    parts1 = None
    if out2 is not None:
        dz1, dw2, db2, dnw2, dnb2, parts1 = out2
    else:
        z1 = NA.norm_act_apply(y1, nw1, nb1, m1, r1, c1[3], c1[4])  # the second convolution's input again
        dz1, dw2, db2, dnw2, dnb2 = _layer_bwd(dz2, dy2_, z1, w2, y2, nw2, nb2, m2, r2, c2, ctx.bias_shapes[1],
                                               (True, need[11], need[12]))
        del z1
    need1 = (need[0], need[1], need[2])
    out1 = _try_triton_bwd(use, dz1, x, w1, y1, nw1, nb1, m1, r1, c1, ctx.bias_shapes[0], need1,
                           partials=parts1) if use is not None and dy1_ is None else None
    if out1 is None:
        out1 = _layer_bwd(dz1, dy1_, x, w1, y1, nw1, nb1, m1, r1, c1, ctx.bias_shapes[0], need1)
    dx, dw1, db1, dnw1, dnb1 = out1[:5]
    has = ctx.has

    def g(t, ok, ref):
        return t.to(ref.dtype) if ok and t is not None else None

    return (dx, dw1, db1 if has[0] else None, g(dnw1, has[1] and need[3], nw1), g(dnb1, has[2] and need[4], nb1),
            None, None, None, None, None, None,
            dw2 if need[11] else None, db2 if has[3] and need[12] else None, g(dnw2, has[4] and need[13], nw2),
            g(dnb2, has[5] and need[14], nb2), None, None, None, None, None, None)


conv_norm_act2_fwd.register_autograd(_chain_backward, setup_context=_setup_chain)


def _triple(v, nd: int, name: str) -> list[int]:
    t = [v] * nd if isinstance(v, int) else list(v)
    if len(t) != nd or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or {nd} ints, got {v!r}")
    return t


def conv_norm_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                  norm_bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1, eps: float = 1e-5,
                  act="leaky_relu", slope: float = 0.01) -> Tensor:
    """``act(instance_norm(conv(x, weight, bias), norm_weight, norm_bias, eps))`` for 2D (x 4D) or
    3D (x 5D) convolutions with groups 1 and zero padding; see the module docstring."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("x and weight must be torch.Tensors")
    if x.ndim not in (4, 5) or weight.ndim != x.ndim:
        raise ValueError(f"x must be 4D or 5D and weight of the same rank, got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels, x has {x.shape[1]}")
    nd = x.ndim - 2
    st, pd, dl = _triple(stride, nd, "stride"), _triple(padding, nd, "padding"), _triple(dilation, nd, "dilation")
    if min(st) < 1 or min(dl) < 1 or min(pd) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {st}, {dl}, {pd}")
    if x.dtype not in (torch.float32, torch.float64) and not (
            x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"x must be float32 or float64 (float16 / bfloat16 too on CUDA), got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"{weight.dtype}, {weight.device}")
    cout = weight.shape[0]
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.shape != (cout,) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape ({cout},), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")
    out = [(x.shape[2 + i] + 2 * pd[i] - dl[i] * (weight.shape[2 + i] - 1) - 1) // st[i] + 1 for i in range(nd)]
    if min(out) < 1:
        raise ValueError(f"the convolution's output would be empty (spatial size {out}): kernel larger than the "
                         f"padded input")
    if math.prod(out) < 2:
        raise ValueError(f"instance norm needs more than 1 spatial element per plane, the convolution gives {out}")
    code = NA._act_code(act)
    if code == NA.ACTS["prelu"]:
        raise ValueError("act='prelu' is not taken by conv_norm_act (use norm_act(conv(x), ..., act='prelu', "
                         "prelu=weight))")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, weight, bias, norm_weight, norm_bias)):
        return conv_norm_act_infer(x, weight, bias, norm_weight, norm_bias, st, pd, dl, float(eps), float(slope), code)
    return conv_norm_act_fwd(x, weight, bias, norm_weight, norm_bias, st, pd, dl, float(eps), float(slope), code)[0]


def conv_norm_act_reference(x, weight, bias=None, norm_weight=None, norm_bias=None, stride=1, padding=0,
                            dilation=1, eps: float = 1e-5, act="leaky_relu", slope: float = 0.01) -> Tensor:
    """float64 plain PyTorch (differentiable)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = _conv(x.double(), weight.double(), d(bias), stride, padding, dilation)
    return NA.norm_act_reference(y, d(norm_weight), d(norm_bias), eps, act, slope)
