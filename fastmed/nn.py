"""Fused convolution blocks, and ``fastmed.optimize(model)`` for existing models.

``ConvNormAct`` is convolution -> normalisation -> activation with its parts named ``conv``, ``norm``
and ``act`` (plain ``torch.nn`` modules, so a state_dict of
``nn.Sequential(OrderedDict(conv=..., norm=..., act=...))`` loads unchanged). Where the norm is an
``InstanceNorm`` without running statistics, a ``BatchNorm`` or a ``GroupNorm`` and the activation is
``LeakyReLU`` / ``ReLU`` / ``PReLU`` / none, norm and activation run as one call of
``fastmed::norm_act_fwd`` (statistics, then one write pass; the backward recomputes the
pre-activation and gives PReLU's weight its gradient). Batch norm keeps ``nn.BatchNorm``'s train /
eval semantics (batch or running statistics, momentum or cumulative average, num_batches_tracked).
On CUDA the batch and group norm kernels are Triton's (checked under TRITON_INTERPRET=1, not yet on
a GPU); group norm under CUDA autocast runs the eager modules (autocast gives it a float32 result).
Instance norm with running statistics always runs the eager modules.

``optimize(model)`` finds norm -> activation pairs in existing models and fuses them the same way,
keeping every module, parameter and state_dict key:
- MONAI's DynUNet blocks (``UnetBasicBlock``: both pairs; ``UnetResBlock``: the first pair, the
  second is followed by the residual addition) get a subclass with a fused ``forward``; without
  autograd (inference) the norm + activation overwrite the convolution's output in place instead of
  filling a new buffer (a forward hook on such a convolution would see its output normalised);
- in any ``nn.Sequential`` (MONAI's ``Convolution`` / ``ADN`` as used by ``UNet`` and ``BasicUNet``,
  nnU-Net's ``ConvDropoutNormReLU`` in ``PlainConvUNet`` and ``ResidualEncoderUNet``) an
  ``InstanceNorm`` / ``GroupNorm`` directly followed by ``LeakyReLU`` / ``ReLU`` / ``PReLU`` (a
  ``Dropout`` with p = 0 between them is allowed) becomes a fused norm (the same object, its class
  swapped, e.g. ``FusedInstanceNorm3d``). ``BatchNorm`` there is left alone: DDP code calls
  ``nn.SyncBatchNorm.convert_sync_batchnorm``, which would replace the fused norm by a plain one and
  lose the activation it applies (in DynUNet blocks and ``ConvNormAct``, which run their own
  forward, batch norm is fused, and a SyncBatchNorm put there later runs eagerly). A LeakyReLU's / ReLU's slot then
  holds ``nn.Identity`` (no parameters: the state_dict is unchanged); a PReLU stays in its slot
  with its weight (same state_dict key, same optimizer parameter) as ``_AppliedPReLU``, whose
  forward passes its input through because the fused norm already applied it (MONAI's default
  ``UNet``: InstanceNorm -> Dropout(0) -> PReLU in every block).
A Sequential is fused only where its parent runs it whole: the model itself, a plain
``nn.Sequential`` / ``ModuleList`` / ``ModuleDict``, or a module whose forward's source uses it only
in calls ``self.<name>(...)`` (a parent that indexes it or loops over its modules would see the
fused pair; slicing an optimized Sequential between a fused norm and its activation's slot does
too). A pattern that does not match exactly is left as it was, and ``verbose=True`` says what was
fused and why the rest was not. At run time the fused code falls back to the eager modules for inputs the
kernels do not take (CPU float16 / bfloat16, CPU autocast, devices other than CPU and CUDA, CUDA
without Triton), so an optimized model runs everywhere the original did. On CUDA the norm +
activation run as Triton kernels (float32 / float64 / float16 / bfloat16, contiguous or channels
last, CUDA autocast included) after cuDNN's convolution; ``FASTMED_TRITON=0`` in the environment
switches them off (eager modules), and should they fail to compile on a GPU the op warns once and
computes in plain PyTorch.

By default ``optimize(model)`` runs CPU inference (autograd off) of MONAI's and nnU-Net's U-Nets on
NDHWC activations, which oneDNN convolves faster: the stem convolution takes its planar input
channels last (free with one input channel), everything after follows the layout (the fused norm
has a channels-last kernel), and a forward hook hands the outputs back planar; the weights keep
their strides and training stays planar. ``channels_last=True`` stores the 3D convolution weights
channels last instead (training and CUDA too); ``channels_last=False`` keeps everything planar.

``optimize(model)`` also gives every plain ``nn.Conv3d`` the class ``OneDNNConv3d`` (same
parameters and state_dict; ``onednn=False`` to keep them): PyTorch runs a float32 CPU convolution
of a batch of one in a generic loop when C * D * H of its input is at most 20480 (the first layer,
the deep layers, sliding-window patches), up to 4x slower than oneDNN and turning channels-last
data contiguous; ``OneDNNConv3d`` calls oneDNN there. ``ConvNormAct`` uses it for 3D.

With ``FASTMED_TRITON_CONV=1`` on CUDA, ``ConvNormAct``, the optimized DynUNet blocks and nnU-Net's
``ConvDropoutNormReLU`` layers run convolution -> norm -> activation as
``fastmed::conv_norm_act_fwd``: fastmed's Triton implicit-GEMM convolution with the norm statistics
in its epilogue (``fastmed/kernels/conv_triton.py``). Off by
default until a GPU has timed it against cuDNN.

``optimize(model)`` also gives every plain ``nn.ConvTranspose2d`` / ``3d`` the class
``FastConvTranspose2d`` / ``3d``, and the decoders of DynUNet (``UnetUpBlock``), BasicUNet (``UpCat``,
where MONAI does not pad) and nnU-Net (``UNetDecoder``) a forward that writes the upsampled channels
straight into the concatenation with the skip (``upconv=False`` to keep them): float32 CPU
upsampling with kernel == stride is fastmed's kernel (``fastmed.ops.upconv``). On planar data
PyTorch computes it channels last and then transposes the whole output; on channels-last data
(the default CPU inference layout) the kernel writes the upsampled channels into the
concatenation and copies the skip in the same pass, so ``torch.cat`` never reads the upsampled
tensor back. The skip itself is still copied once: it is also the dense input of the encoder's
next convolution, which oneDNN needs whole.

With ``FASTMED_TRITON_CONV=1`` on CUDA, an optimized DynUNet basic block runs both its layers as
``fastmed::conv_norm_act2_infer`` in inference and ``fastmed::conv_norm_act2_fwd`` in training (the
first norm + activation in the second convolution's prologue; the training backward recomputes
that activation), and an nnU-Net ``StackedConvBlocks`` its layers two by two the same way.

In CPU training a fused norm's output (instance, group or batch norm) remembers its input and
statistics (``fastmed.ops.conv_norm_act.norm_act_keep_source``), and the ``OneDNNConv3d`` /
``FastConv2d`` that takes it keeps those for its backward instead of its input, which it recomputes
there (bit-identical): each conv -> norm -> activation layer keeps one activation for the backward
where eager keeps two.

On that Triton route the backward is fused too (``fastmed/kernels/conv_bwd_triton.py``: the norm +
activation backward inside the convolution's data- and weight-gradient GEMMs, the first layer's
backward statistics in the second layer's data-gradient epilogue). Elsewhere the backward is
norm_act's kernels, then cuDNN's / oneDNN's convolution backward; the CPU convolution is oneDNN's
(not fused with the norm). The CUDA paths are checked under TRITON_INTERPRET=1 only, not yet on a
GPU.

Hooks: a pattern with a hook on its norm, activation or a Dropout between them, or with any global
module hook, is not fused. A hook registered after ``optimize`` on a DynUNet block's norm or
activation makes the block run its own forward (so it runs); on a fused norm in a Sequential it sees
the activated output. A forward hook on a convolution sees its output as eager does (it is then not
normalised in place).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ext
from .ops import conv_norm_act as CNA
from .ops import upconv as UC
from .ops import norm_act as NA
from .ops.norm_act import _cl_format, _triton, norm_act, norm_act_

_CL = torch.channels_last_3d

__all__ = ["ConvNormAct", "OneDNNConv3d", "FastConv2d", "FastConvTranspose2d", "FastConvTranspose3d", "optimize"]

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_BATCH_NORMS = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}  # the input's ndim the kernel takes


def _norm_type(norm: nn.Module) -> type:
    """norm's torch.nn class (a fused norm's base)."""
    t = type(norm)
    return t.__mro__[2] if issubclass(t, _FusedInstanceNorm) else t


def _channels(norm: nn.Module) -> int:
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features


def _norm_act_spec(norm: nn.Module, act: nn.Module) -> tuple[Optional[dict], str]:
    """(kwargs for norm_act, '') when norm -> act can be fused, else (None, reason)."""
    if type(norm) not in _INSTANCE_NORMS and type(norm) not in _BATCH_NORMS and type(norm) is not nn.GroupNorm:
        return None, f"norm is {type(norm).__name__} (InstanceNorm, BatchNorm and GroupNorm are fused)"
    if type(norm) in _INSTANCE_NORMS and norm.track_running_stats:
        return None, "InstanceNorm with track_running_stats=True (eval uses running statistics)"
    if _hooked(norm) or _hooked(act):
        return None, "a hook is registered on the norm or the activation (a fused pair would skip it)"
    if _global_hooks():
        return None, "a global module hook is registered (a fused pair would show it other tensors)"
    if not norm.eps > 0:
        return None, f"eps={norm.eps} (the fused kernels take eps > 0)"
    if type(act) is nn.LeakyReLU:
        spec = dict(act="leaky_relu", slope=float(act.negative_slope))
    elif type(act) is nn.ReLU:
        spec = dict(act="relu", slope=0.0)
    elif type(act) is nn.Identity:
        spec = dict(act="none", slope=0.0)
    elif type(act) is nn.PReLU and act.weight.ndim == 1 \
            and act.weight.numel() in (1, _channels(norm)):
        spec = dict(act="prelu", slope=0.0, prelu=act)  # the module: its weight is read at each call
    else:
        return None, f"activation is {type(act).__name__} (LeakyReLU / ReLU / PReLU are fused)"
    spec["eps"] = float(norm.eps)
    return spec, ""


def _kernel_ok(x: Tensor, norm: Optional[nn.Module] = None) -> bool:
    """The fused kernels take x: float32 / float64 on the CPU without CPU autocast, or on CUDA
    (float16 / bfloat16 too, so CUDA autocast runs fused) when the Triton kernels are available;
    batched (an unbatched (C, *spatial) input to ``norm`` runs the eager modules), more than one
    element per plane."""
    if x.numel() == 0 or x.ndim < 3 or _ext.functorch_active():
        return False
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
            return False
    elif x.device.type == "cuda":
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16) or _triton() is None:
            return False
    else:
        return False
    if norm is not None and _norm_type(norm) not in _INSTANCE_NORMS:
        if _norm_type(norm) not in _BATCH_NORMS and _norm_type(norm) is not nn.GroupNorm:
            return False  # e.g. a SyncBatchNorm that convert_sync_batchnorm put in a fused block
        # batch / group norm: the C++ kernels, the Triton kernels on CUDA; 3D+ input
        if x.ndim != _BATCH_NORMS.get(_norm_type(norm), x.ndim):
            return False
        if _norm_type(norm) is nn.GroupNorm and x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            return False  # autocast runs F.group_norm in float32 (a float32 result): eager keeps that
    elif norm is not None and x.ndim != norm._get_no_batch_dim() + 1:
        return False
    return x[0, 0].numel() > 1


def _fused(norm: nn.Module, spec: dict, x: Tensor, fresh: bool = False) -> Tensor:
    """The fused norm + activation; ``fresh``: x is a temporary nobody else holds (a convolution's
    output inside the block), so without autograd it is normalised in place (no new buffer)."""
    w = norm.weight if norm.affine else None
    b = norm.bias if norm.affine else None
    pw = spec["prelu"].weight if spec["act"] == "prelu" else None
    inplace = fresh and not torch.is_grad_enabled() and (x.is_contiguous() or _cl_format(x) is not None)
    kind = _norm_type(norm)
    if kind in _BATCH_NORMS:
        return _batch_norm_fused(norm, spec, x, w, b, pw, inplace)
    if kind is nn.GroupNorm:
        if inplace:
            with torch.no_grad():
                NA.norm_act_inplace_op(x, w, b, float(norm.eps), float(spec["slope"]), NA.ACTS[spec["act"]], pw, 1,
                                       norm.num_groups)
            return x
        y, mean, rstd, xk, code, pwk = NA._group_norm_act(x, norm.num_groups, w, b, norm.eps, spec["act"],
                                                          spec["slope"], pw)
        # training on the CPU: the next convolution keeps x instead of y (see norm_act_keep_source)
        return CNA.keep_source(y, xk, mean, rstd, w, b, pwk, norm.eps, spec["slope"], code,
                               ("group", norm.num_groups))
    if inplace:
        return norm_act_(x, w, b, spec["eps"], spec["act"], spec["slope"], pw)
    if x.device.type == "cpu" and torch.is_grad_enabled():
        # training: the next convolution keeps x instead of the result (see norm_act_keep_source)
        return CNA.norm_act_keep_source(x, w, b, spec["eps"], spec["act"], spec["slope"], pw)
    return norm_act(x, w, b, spec["eps"], spec["act"], spec["slope"], pw)


def _batch_norm_fused(norm: nn.Module, spec: dict, x: Tensor, w, b, pw, inplace: bool) -> Tensor:
    """nn.BatchNorm*d's forward (its choice of batch or running statistics, momentum or cumulative
    average, num_batches_tracked) with the activation fused."""
    norm._check_input_dim(x)
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    bn_training = norm.training or (norm.running_mean is None and norm.running_var is None)
    use_running = not norm.training or norm.track_running_stats
    rm = norm.running_mean if use_running else None
    rv = norm.running_var if use_running else None
    y, mean, rstd, xk, code, pwk, k = NA._batch_norm_act(x, rm, rv, w, b, bn_training, factor, norm.eps, spec["act"],
                                                         spec["slope"], pw, inplace)
    if inplace:
        return y
    # training on the CPU: the next convolution keeps x instead of y (see norm_act_keep_source)
    return CNA.keep_source(y, xk, mean, rstd, w, b, pwk, norm.eps, spec["slope"], code,
                           ("batch",) if k == 2 else ("given",))


def _eager_act(spec: dict, x: Tensor) -> Tensor:
    if spec["act"] == "leaky_relu":
        return F.leaky_relu(x, spec["slope"])
    if spec["act"] == "prelu":
        return F.prelu(x, spec["prelu"].weight)
    return F.relu(x) if spec["act"] == "relu" else x


def _act_ok(spec: dict, x: Tensor) -> bool:
    """PReLU is fused when its weight has x's dtype and device (else, e.g. float16 under CUDA
    autocast with a float32 weight, eager PyTorch decides the result's dtype, or raises)."""
    if spec["act"] != "prelu":
        return True
    pw = spec["prelu"].weight
    return pw.device == x.device and pw.dtype == x.dtype


def _norm_then_act(norm_forward, norm: nn.Module, spec: dict, x: Tensor, fresh: bool = False) -> Tensor:
    """norm + activation: the fused kernel where it takes x, else the eager norm then activation."""
    if _kernel_ok(x, norm) and _act_ok(spec, x):
        return _fused(norm, spec, x, fresh)
    return _eager_act(spec, norm_forward(norm, x))


def _is_nhwc(x: Tensor) -> bool:
    """x is a dense channels-last 5D tensor (a 1-channel one only when restrided so: channel stride 1)."""
    return x.ndim == 5 and x.is_contiguous(memory_format=_CL) and not (x.is_contiguous() and x.stride(1) != 1)


def _nhwc_suits(x: Tensor) -> bool:
    """A float32 CPU 5D activation, planar or strided but not channels last, that optimize()'s default
    layout takes channels last (with oneDNN on: PyTorch's generic loop would turn it back)."""
    if torch.compiler.is_compiling() or _ext.functorch_active():
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 5 and not x.is_mkldnn
            and x.numel() > 0 and not _is_nhwc(x) and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.enabled)


def _as_nhwc(x: Tensor) -> Tensor:
    """x in channels-last layout: with one channel the same memory restrided (a view of a contiguous
    x; a 1-channel tensor is both planar and channels last, and PyTorch reads the layout from the
    strides), else a channels-last copy."""
    if x.shape[1] == 1:
        n, _, d, h, w = x.shape
        return x.reshape(n, d, h, w, 1).permute(0, 4, 1, 2, 3)
    return x.contiguous(memory_format=_CL)


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, state_dict and outputs to float32 rounding) whose float32 CPU
    convolutions call oneDNN directly where PyTorch's own choice would not: a batch of one whose
    C * D * H is at most 20480 (a network's first and deepest layers, patches of sliding-window
    inference) takes PyTorch's generic loop, up to 4x slower, which also turns channels-last data
    contiguous (see ``fastmed.ops.conv_norm_act.onednn_suits``). Everywhere else it is
    ``nn.Conv3d``. ``optimize()`` gives every plain ``nn.Conv3d`` of a model this class.

    With ``_fm_nhwc`` set (``optimize()``'s default layout on the CPU) a float32 CPU input of
    inference (eval mode, autograd off or nothing requiring gradients; in train mode PyTorch's
    channels-last batch norm is ~85x less exact than its planar one on a measured case) that is not channels last is taken
    channels last (free for a contiguous 1-channel input, a copy otherwise), so the convolution and
    everything after it run on NDHWC activations while the weight keeps its strides."""

    _fm_nhwc = False

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self._fm_nhwc and not self.training and _nhwc_suits(input) and not (torch.is_grad_enabled() and (
                input.requires_grad or weight.requires_grad)):
            input = _as_nhwc(input)
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return CNA.conv_nd(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state_dict and outputs: the same ``F.conv2d``) whose
    convolution goes through ``fastmed.ops.conv_norm_act.conv_nd``. What that adds is CPU training:
    an input that a fused norm made (``norm_act_keep_source``) is not kept for the backward; the
    norm's input and statistics are, and the backward recomputes it bit for bit, so a 2D conv ->
    norm -> activation layer keeps one activation where eager keeps two.
    ``optimize()`` gives every plain ``nn.Conv2d`` of a model this class; ``ConvNormAct`` uses it
    for 2D."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return CNA.conv_nd(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class _FastConvTranspose:
    """forward of FastConvTranspose2d / 3d: fastmed::upconv_fwd where ``upconv_suits``."""

    def forward(self, input: Tensor, output_size: Optional[list] = None) -> Tensor:
        if output_size is None and self.padding_mode == "zeros" and UC.upconv_suits(
                input, self.weight, self.stride, self.padding, self.output_padding, self.dilation, self.groups):
            return UC.upconv_fwd(input, self.weight, self.bias, None, False)
        return super().forward(input, output_size)


class FastConvTranspose3d(_FastConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` (same parameters, state_dict and outputs to float32 rounding) whose
    planar float32 CPU upsampling with kernel == stride (U-Net decoders: k = s = 2, or (1, 2, 2))
    runs fastmed's kernel (``fastmed.ops.upconv``): PyTorch computes it channels last and then
    transposes the whole output, which on our 2-core CPU took longer than the convolution. Everywhere
    else it is ``nn.ConvTranspose3d``. ``optimize()`` gives every plain ``nn.ConvTranspose3d`` this class."""


class FastConvTranspose2d(_FastConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with the same kernel == stride fast path as ``FastConvTranspose3d``."""


_FAST_TRANSPOSED = {nn.ConvTranspose2d: FastConvTranspose2d, nn.ConvTranspose3d: FastConvTranspose3d}


def _forward_is(cls, *lines: str) -> bool:
    """Whether cls.forward's source holds these statements (spaces ignored): the forward a fused
    subclass stands in for, in this version of the package."""
    import inspect

    try:
        src = inspect.getsource(cls.forward).replace(" ", "")
    except (OSError, TypeError):  # pragma: no cover
        return False
    return all(t.replace(" ", "") in src for t in lines)


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                or getattr(mod, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    mm = nn.modules.module
    return any(getattr(mm, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                              "_global_backward_hooks", "_global_backward_pre_hooks"))


def _plain_upconv(m: nn.Module, x: Tensor, concat: bool = False) -> Optional[nn.Module]:
    """The nn.ConvTranspose2d / 3d that ``m`` is (or that a Sequential holding only it wraps, as
    MONAI's ``Convolution(is_transposed=True, conv_only=True)``) when fastmed::upconv_fwd computes it
    for ``x`` exactly as its forward would (kernel == stride, no padding, no hooks); else None."""
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and len(m) == 1 and not _hooked(m):
        m = m[0]
    if type(m) not in (nn.ConvTranspose2d, nn.ConvTranspose3d, FastConvTranspose2d, FastConvTranspose3d):
        return None
    if _hooked(m) or _global_hooks() or m.padding_mode != "zeros":
        return None
    if not UC.upconv_suits(x, m.weight, m.stride, m.padding, m.output_padding, m.dilation, m.groups, concat):
        return None
    return m


def _upsample_cat(upsample: nn.Module, x: Tensor, skip: Tensor, skip_first: bool = False) -> Optional[Tensor]:
    """``torch.cat((upsample(x), skip), 1)`` (``(skip, upsample(x))`` with ``skip_first``) with the
    upsampled channels written straight into the concatenation (only the skip is copied), where
    fastmed's kernel computes ``upsample`` and the shapes fit; else None (the caller's own code)."""
    m = _plain_upconv(upsample, x, concat=True)
    if m is None or not isinstance(skip, Tensor) or skip.dtype != x.dtype or skip.device != x.device:
        return None
    if skip.ndim != x.ndim or skip.shape[0] != x.shape[0] or \
            list(skip.shape[2:]) != [s * k for s, k in zip(x.shape[2:], m.weight.shape[2:])]:
        return None
    return UC.upconv_fwd(x, m.weight, m.bias, skip, skip_first)


def _plain_conv(m: nn.Module) -> Optional[nn.Module]:
    """The nn.Conv2d / nn.Conv3d that ``m`` is (or that a Sequential holding only it, as MONAI's
    ``Convolution(conv_only=True)``, wraps) when conv_norm_act can run it: groups 1, zero padding
    given as numbers, no hooks on it; else None."""
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and len(m) == 1 and not _hooked(m):
        m = m[0]
    if type(m) not in (nn.Conv2d, nn.Conv3d, OneDNNConv3d, FastConv2d) or _hooked(m):
        return None
    if _global_hooks():
        return None  # global module hooks must see the convolution run
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return None
    return m


def _conv_norm_act(conv_mod: nn.Module, norm: nn.Module, spec: dict, x: Tensor) -> Optional[Tensor]:
    """conv -> norm -> act as one ``fastmed::conv_norm_act_fwd`` (the Triton implicit GEMM with the
    norm statistics in its epilogue) where it applies: CUDA, ``FASTMED_TRITON_CONV=1``, a plain
    convolution; CUDA autocast runs it in the autocast dtype. None: the caller runs the usual path."""
    args = _triton_args(conv_mod, norm, spec, x)
    if args is None:
        return None
    with torch.autocast("cuda", enabled=False):
        if not torch.is_grad_enabled():  # inference: normalised in place in the convolution's output
            return CNA.conv_norm_act_infer(*args)
        return CNA.conv_norm_act_fwd(*args)[0]


def _conv_pair(layers, x: Tensor) -> Optional[Tensor]:
    """Two conv -> norm -> act layers ((conv, norm, spec) each) for inference as one
    ``fastmed::conv_norm_act2_infer``: the first norm + activation in the second convolution's
    prologue, where the Triton convolution takes both. None: the caller runs them one by one."""
    if torch.is_grad_enabled():
        return None
    a1 = _triton_args(*layers[0], x)
    if a1 is None:
        return None
    xin, w1 = a1[0], a1[1]  # x and the first weight in the dtype the convolutions run in
    shape = CNA._out_shape(xin, w1, a1[5], a1[6], a1[7])  # the first layer's output: the second's input
    probe = torch.empty(shape, dtype=xin.dtype, device="meta", memory_format=CNA._out_format(xin, w1))
    a2 = _triton_args(*layers[1], probe, device=x.device)
    if a2 is None:
        return None
    with torch.autocast("cuda", enabled=False):
        return CNA.conv_norm_act2_infer(*a1, *a2[1:])


def _triton_args(conv_mod: nn.Module, norm: nn.Module, spec: dict, x: Tensor, device=None) -> Optional[tuple]:
    """conv_norm_act_fwd's arguments for this layer where the Triton convolution runs it, else None.
    ``device``: x's device when x is a meta-tensor stand-in (shape, dtype and layout only)."""
    device = device if device is not None else x.device
    if device.type != "cuda" or not CNA.triton_conv_enabled() or spec["act"] == "prelu" \
            or _norm_type(norm) not in _INSTANCE_NORMS:
        return None
    conv = _plain_conv(conv_mod)
    if conv is None or x.ndim != conv.weight.ndim or x.ndim != norm._get_no_batch_dim() + 1:
        return None
    w, b = conv.weight, conv.bias
    dt = x.dtype
    half = (torch.float32, torch.float16, torch.bfloat16)
    if torch.is_autocast_enabled("cuda") and x.dtype in half and w.dtype in half:
        dt = torch.get_autocast_dtype("cuda")  # autocast runs the convolution in dt (never float64)
    elif w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        return None  # the eager convolution says what is wrong
    sp = x.shape[2:]
    out = [(sp[i] + 2 * conv.padding[i] - conv.dilation[i] * (w.shape[2 + i] - 1) - 1) // conv.stride[i] + 1
           for i in range(x.ndim - 2)]
    if min(out) < 1 or torch.Size(out).numel() < 2:
        return None  # eager's own error (instance norm of one voxel) or an empty output
    # routing decided on the dtype the convolution will run in, before casting anything
    probe = torch.empty(x.shape, dtype=dt, device="meta")
    if CNA._use_triton(probe, w.to("meta", dt), conv.stride, conv.padding, conv.dilation, device=device) is None:
        return None
    x, w, b = x.to(dt), w.to(dt), (b.to(dt) if b is not None else None)
    return (x, w, b, norm.weight if norm.affine else None, norm.bias if norm.affine else None, list(conv.stride),
            list(conv.padding), list(conv.dilation), spec["eps"], spec["slope"], CNA.NA.ACTS[spec["act"]])


def _train_pair(layers, x: Tensor) -> Optional[Tensor]:
    """Two conv -> instance norm -> act layers ((conv, norm, spec) each) in training as one
    ``fastmed::conv_norm_act2_fwd`` where the Triton convolution runs both (CUDA,
    ``FASTMED_TRITON_CONV=1``): the first norm + activation in the second convolution's prologue, so
    the first normalised activation is never written (its backward recomputes it). Not elsewhere:
    on the CPU the op saved 17% of the activations kept for the backward of a DynUNet step but
    raised its peak memory (the one autograd node keeps the second layer's gradient and output
    alive through the first layer's backward); there ``_fused`` marks the norm's output instead
    (``norm_act_keep_source``), so the next convolution, in its own node, recomputes it. None: the
    caller runs them one by one."""
    if not torch.is_grad_enabled():
        return None
    a1 = _triton_args(*layers[0], x)
    if a1 is None:
        return None
    xin, w1 = a1[0], a1[1]
    shape = CNA._out_shape(xin, w1, a1[5], a1[6], a1[7])
    probe = torch.empty(shape, dtype=xin.dtype, device="meta", memory_format=CNA._out_format(xin, w1))
    a2 = _triton_args(*layers[1], probe, device=x.device)
    if a2 is None:
        return None
    if not any(isinstance(t, Tensor) and t.requires_grad for t in a1[:5] + a2[1:5]):
        return None  # inference with autograd on: the layers one by one normalise in place
    with torch.autocast("cuda", enabled=False):
        return CNA.conv_norm_act2_fwd(*a1, *a2[1:])[0]


def _conv_then_norm_act(conv: nn.Module, norm: nn.Module, spec: dict, x: Tensor) -> Tensor:
    z = _conv_norm_act(conv, norm, spec, x)
    if z is not None:
        return z
    # the convolution's output is normalised in place in inference, unless a forward hook (the
    # convolution's own or a global one) has seen it and may keep it
    return _norm_then_act(type(norm).forward, norm, spec, conv(x), fresh=not (_hooked(conv) or _global_hooks()))


def _hooks_since(*mods: nn.Module) -> bool:
    """A hook registered (after optimize) on a module that a fused forward does not call, or a
    global module hook: then the block runs its own forward, which calls them all."""
    return _global_hooks() or any(_hooked(m) for m in mods)


class _AppliedPReLU(nn.PReLU):
    """An ``nn.PReLU`` whose activation the fused instance norm before it already applied
    (fastmed.optimize): its forward passes its input through. It stays in its slot so that its
    weight keeps its place, name and gradient in the model."""

    def forward(self, input: Tensor) -> Tensor:
        return input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", applied by the fused norm before it"


class _FusedInstanceNorm:
    """Mixin: an InstanceNormNd (or BatchNormNd, GroupNorm) whose forward also applies the
    activation that followed it."""

    _fm_spec: dict

    def forward(self, x):
        # never in place: this module can be called on a tensor its caller keeps
        return _norm_then_act(type(self).__mro__[2].forward, self, self._fm_spec, x)


class FusedInstanceNorm1d(_FusedInstanceNorm, nn.InstanceNorm1d):
    pass


class FusedInstanceNorm2d(_FusedInstanceNorm, nn.InstanceNorm2d):
    pass


class FusedInstanceNorm3d(_FusedInstanceNorm, nn.InstanceNorm3d):
    pass


class FusedBatchNorm1d(_FusedInstanceNorm, nn.BatchNorm1d):
    pass


class FusedBatchNorm2d(_FusedInstanceNorm, nn.BatchNorm2d):
    pass


class FusedBatchNorm3d(_FusedInstanceNorm, nn.BatchNorm3d):
    pass


class FusedGroupNorm(_FusedInstanceNorm, nn.GroupNorm):
    pass


_FUSED_NORM = {nn.InstanceNorm1d: FusedInstanceNorm1d, nn.InstanceNorm2d: FusedInstanceNorm2d,
               nn.InstanceNorm3d: FusedInstanceNorm3d, nn.BatchNorm1d: FusedBatchNorm1d,
               nn.BatchNorm2d: FusedBatchNorm2d, nn.BatchNorm3d: FusedBatchNorm3d, nn.GroupNorm: FusedGroupNorm}


# ------------------------------------------------------------------------------------------------
# ConvNormAct

_NORMS = {
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "group": {2: nn.GroupNorm, 3: nn.GroupNorm},
}
_ACTS = {"leakyrelu": nn.LeakyReLU, "relu": nn.ReLU, "prelu": nn.PReLU}


def _lower(v, name: str) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a string or None, got {type(v).__name__}")
    return v.lower().replace("_", "")


class ConvNormAct(nn.Module):
    """Convolution -> normalisation -> activation (nnU-Net's ``ConvDropoutNormReLU`` without
    dropout, MONAI's ``Convolution`` with ``adn_ordering="NA"``), 2D or 3D.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: as ``nn.Conv3d``.
        padding: as ``nn.Conv3d``; ``None`` (default) pads ``(kernel_size - 1) // 2 * dilation`` per
            dim, the "same" padding of nnU-Net and MONAI for odd kernels.
        spatial_dims: 2 or 3.
        norm: "instance" (default), "batch", "group" or None; ``norm_kwargs`` go to the torch.nn
            norm (e.g. ``affine``, ``eps``, ``momentum``, ``track_running_stats``; ``num_groups``
            for "group", default 8).
        act: "leakyrelu" (default, ``negative_slope`` 0.01 as nnU-Net), "relu", "prelu" or None;
            ``act_kwargs`` go to the torch.nn activation.

    Submodules ``conv``, ``norm`` (absent without norm) and ``act`` (absent without act) are the
    torch.nn modules themselves (the 3D convolution is ``OneDNNConv3d``, an ``nn.Conv3d``
    subclass), so parameter names, shapes, state_dicts and train / eval semantics are torch.nn's.
    Instance norm without running statistics + LeakyReLU / ReLU / PReLU / none runs fused on the
    CPU (float32 / float64) and on CUDA (Triton; float16 / bfloat16 too; PReLU where its weight has
    the input's dtype); batch norm and group norm run fused on the CPU; everything else runs the
    eager modules.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]] = 3,
                 stride: Union[int, Sequence[int]] = 1, padding: Union[None, int, Sequence[int], str] = None,
                 dilation: Union[int, Sequence[int]] = 1, groups: int = 1, bias: bool = True, spatial_dims: int = 3,
                 norm: Optional[str] = "instance", norm_kwargs: Optional[dict] = None,
                 act: Optional[str] = "leakyrelu", act_kwargs: Optional[dict] = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        norm_name, act_name = _lower(norm, "norm"), _lower(act, "act")
        if norm_name is not None and norm_name not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)} or None, got {norm!r}")
        if act_name is not None and act_name not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)} or None, got {act!r}")
        for name, v in (("kernel_size", kernel_size), ("dilation", dilation)):
            vals = v if isinstance(v, (tuple, list)) else [v]
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in vals):
                raise ValueError(f"{name} must be a positive int or {spatial_dims} of them, got {v!r}")
        ks = (kernel_size,) * spatial_dims if isinstance(kernel_size, int) else tuple(kernel_size)
        dl = (dilation,) * spatial_dims if isinstance(dilation, int) else tuple(dilation)
        if len(ks) != spatial_dims or len(dl) != spatial_dims:
            raise ValueError(f"kernel_size and dilation need {spatial_dims} entries, got {kernel_size}, {dilation}")
        if padding is None:
            padding = tuple((k - 1) // 2 * d for k, d in zip(ks, dl))
        conv_t = OneDNNConv3d if spatial_dims == 3 else FastConv2d
        self.conv = conv_t(in_channels, out_channels, ks, stride=stride, padding=padding, dilation=dl,
                           groups=groups, bias=bias)
        for name, kw, part in (("norm_kwargs", norm_kwargs, norm_name), ("act_kwargs", act_kwargs, act_name)):
            if kw and part is None:
                raise ValueError(f"{name}={kw!r} given with {name.split('_')[0]}=None (nothing to pass them to)")
        nk = dict(norm_kwargs or {})
        if norm_name == "group":
            groups_n = nk.pop("num_groups", 8)
            if isinstance(groups_n, int) and groups_n > 0 and out_channels % groups_n:
                raise ValueError(f"norm='group' splits out_channels={out_channels} into num_groups={groups_n} "
                                 f"groups{' (the default)' if 'num_groups' not in (norm_kwargs or {}) else ''}, which "
                                 f"does not divide it: set norm_kwargs={{'num_groups': ...}}")
            self.norm = nn.GroupNorm(groups_n, out_channels, **nk)
        elif norm_name is not None:
            self.norm = _NORMS[norm_name][spatial_dims](out_channels, **nk)
        ak = dict(act_kwargs or {})
        if act_name == "leakyrelu":
            ak.setdefault("negative_slope", 0.01)
        if act_name is not None:
            self.act = _ACTS[act_name](**ak)

    def _spec(self) -> Optional[dict]:
        norm, act = getattr(self, "norm", None), getattr(self, "act", None)
        if norm is None:
            return None
        if act is None:
            spec, _ = _norm_act_spec(norm, nn.Identity())
        else:
            spec, _ = _norm_act_spec(norm, act)
        return spec

    def forward(self, x: Tensor) -> Tensor:
        spec = self._spec()
        norm, act = getattr(self, "norm", None), getattr(self, "act", None)
        if spec is not None:
            return _conv_then_norm_act(self.conv, norm, spec, x)
        y = self.conv(x)
        if norm is not None:
            y = norm(y)
        return act(y) if act is not None else y


try:  # MONAI is optional: without it there is nothing of MONAI's to fuse
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
except ImportError:  # pragma: no cover
    UnetBasicBlock = UnetResBlock = None


if UnetBasicBlock is not None:

    class FusedUnetBasicBlock(UnetBasicBlock):
        """UnetBasicBlock with norm + activation fused (fastmed.optimize)."""

        def forward(self, inp):
            if not _kernel_ok(inp, self.norm1) or _hooks_since(self.norm1, self.norm2, self.lrelu):
                return UnetBasicBlock.forward(self, inp)
            out = _conv_pair(((self.conv1, self.norm1, self._fm_specs[0]), (self.conv2, self.norm2,
                                                                            self._fm_specs[1])), inp)
            if out is not None:  # inference with the Triton convolution: norm1 + act in conv2's prologue
                return out
            out = _train_pair(((self.conv1, self.norm1, self._fm_specs[0]), (self.conv2, self.norm2,
                                                                             self._fm_specs[1])), inp)
            if out is not None:  # training with the Triton convolution: the same prologue
                return out
            out = _conv_then_norm_act(self.conv1, self.norm1, self._fm_specs[0], inp)
            return _conv_then_norm_act(self.conv2, self.norm2, self._fm_specs[1], out)

    class FusedUnetResBlock(UnetResBlock):
        """UnetResBlock with its first norm + activation fused (fastmed.optimize)."""

        def forward(self, inp):
            if not _kernel_ok(inp, self.norm1) or _hooks_since(self.norm1, self.lrelu):
                return UnetResBlock.forward(self, inp)
            residual = inp
            out = _conv_then_norm_act(self.conv1, self.norm1, self._fm_specs[0], inp)
            out = self.norm2(self.conv2(out))
            if hasattr(self, "conv3"):
                residual = self.conv3(residual)
            if hasattr(self, "norm3"):
                residual = self.norm3(residual)
            out += residual
            return self.lrelu(out)

    _FUSED = {UnetBasicBlock: (FusedUnetBasicBlock, ("norm1", "norm2")), UnetResBlock: (FusedUnetResBlock, ("norm1",))}
else:  # pragma: no cover
    _FUSED = {}
_FUSED_TARGETS = {target for target, _ in _FUSED.values()}


# decoder blocks whose "upsample, then concatenate with the skip" runs as one fastmed::upconv_fwd
_UPCAT = {}
try:
    from monai.networks.blocks.dynunet_block import UnetUpBlock
except ImportError:  # pragma: no cover
    UnetUpBlock = None
if UnetUpBlock is not None:

    class FusedUnetUpBlock(UnetUpBlock):
        """MONAI's UnetUpBlock (DynUNet's decoder) whose transposed convolution writes straight into
        the concatenation with the skip (fastmed.optimize)."""

        def forward(self, inp, skip):
            out = _upsample_cat(self.transp_conv, inp, skip)
            if out is None:
                return UnetUpBlock.forward(self, inp, skip)
            return self.conv_block(out)

    _UPCAT[UnetUpBlock] = FusedUnetUpBlock

try:
    from monai.networks.nets.basic_unet import UpCat
except ImportError:  # pragma: no cover
    UpCat = None
if UpCat is not None:

    class FusedUpCat(UpCat):
        """MONAI's UpCat (BasicUNet's decoder) whose "deconv" upsampling writes straight into the
        concatenation with the encoder's features, where no padding is needed (fastmed.optimize)."""

        def forward(self, x: Tensor, x_e: Optional[Tensor]):
            if isinstance(x_e, Tensor):
                out = _upsample_cat(self.upsample, x, x_e, skip_first=True)
                if out is not None:
                    return self.convs(out)
            return UpCat.forward(self, x, x_e)

    _UPCAT[UpCat] = FusedUpCat

try:
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
except ImportError:  # pragma: no cover
    UNetDecoder = None


def _nnunet_decoder_as_expected() -> bool:
    """Whether this dynamic-network-architectures' UNetDecoder.forward is the loop FusedUNetDecoder
    repeats (transposed convolution, cat with the skip, stage, segmentation layers)."""
    return _forward_is(UNetDecoder, "x=self.transpconvs[s](lres_input)", "x=torch.cat((x,skips[-(s+2)]),1)",
                       "x=self.stages[s](x)", "seg_outputs.append(self.seg_layers[s](x))",
                       "seg_outputs.append(self.seg_layers[-1](x))", "seg_outputs=seg_outputs[::-1]")


if UNetDecoder is not None and _nnunet_decoder_as_expected():

    class FusedUNetDecoder(UNetDecoder):
        """nnU-Net's UNetDecoder (PlainConvUNet, ResidualEncoderUNet) whose transposed convolutions
        write straight into the concatenation with the skips (fastmed.optimize)."""

        def forward(self, skips):
            lres_input = skips[-1]
            seg_outputs = []
            for s in range(len(self.stages)):
                x = _upsample_cat(self.transpconvs[s], lres_input, skips[-(s + 2)])
                if x is None:
                    x = torch.cat((self.transpconvs[s](lres_input), skips[-(s + 2)]), 1)
                x = self.stages[s](x)
                if self.deep_supervision:
                    seg_outputs.append(self.seg_layers[s](x))
                elif s == (len(self.stages) - 1):
                    seg_outputs.append(self.seg_layers[-1](x))
                lres_input = x
            seg_outputs = seg_outputs[::-1]
            return seg_outputs if self.deep_supervision else seg_outputs[0]

    _UPCAT[UNetDecoder] = FusedUNetDecoder


# nnU-Net's conv -> [dropout] -> norm -> nonlin layers and their stacks: on CUDA with
# FASTMED_TRITON_CONV=1 a layer runs as fastmed::conv_norm_act (the Triton convolution with the
# norm statistics in its epilogue), and in inference two layers in a row as conv_norm_act2_infer
# (the first norm + activation in the second convolution's prologue); everywhere else their own forward
_NNUNET_BLOCKS = {}
try:
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
except ImportError:  # pragma: no cover
    ConvDropoutNormReLU = StackedConvBlocks = None


def _nnunet_layer(block: nn.Module) -> Optional[tuple]:
    """(conv, norm, spec) of an nnU-Net ConvDropoutNormReLU whose Sequential is conv -> [Dropout(p=0)]
    -> fused norm -> its activation's emptied slot, with no hook on any of them; else None."""
    seq = block._modules.get("all_modules")
    if not isinstance(seq, nn.Sequential) or _hooked(block) or _hooked(seq):
        return None
    mods = list(seq)
    if len(mods) < 2 or any(_hooked(m) for m in mods):
        return None
    conv, rest = mods[0], mods[1:]
    if isinstance(rest[0], nn.modules.dropout._DropoutNd):
        if rest[0].p != 0:
            return None
        rest = rest[1:]
    if not rest or not isinstance(rest[0], _FusedInstanceNorm) or any(not isinstance(m, nn.Identity) for m in rest[1:]):
        return None
    return conv, rest[0], rest[0]._fm_spec


def _triton_conv_route(x: Tensor) -> bool:
    return x.device.type == "cuda" and CNA.triton_conv_enabled()


if ConvDropoutNormReLU is not None and _forward_is(ConvDropoutNormReLU, "return self.all_modules(x)") \
        and _forward_is(StackedConvBlocks, "return self.convs(x)"):

    class FusedConvDropoutNormReLU(ConvDropoutNormReLU):
        """nnU-Net's ConvDropoutNormReLU (its norm + nonlin already fused by optimize) that runs as one
        fastmed::conv_norm_act on CUDA with FASTMED_TRITON_CONV=1; else its own forward."""

        def forward(self, x):
            if _triton_conv_route(x):
                layer = _nnunet_layer(self)
                if layer is not None:
                    z = _conv_norm_act(*layer, x)
                    if z is not None:
                        return z
            return ConvDropoutNormReLU.forward(self, x)

    class FusedStackedConvBlocks(StackedConvBlocks):
        """nnU-Net's StackedConvBlocks whose layers run two by two on CUDA with FASTMED_TRITON_CONV=1:
        as conv_norm_act2_infer in inference and conv_norm_act2_fwd in training (the first norm +
        activation in the second convolution's prologue, see above); else its own forward."""

        def forward(self, x):
            if not _triton_conv_route(x) or _hooked(self.convs):
                return StackedConvBlocks.forward(self, x)
            pair = _train_pair if torch.is_grad_enabled() else _conv_pair
            blocks, i = list(self.convs), 0
            while i < len(blocks):
                if i + 1 < len(blocks):
                    l1, l2 = _nnunet_layer(blocks[i]), _nnunet_layer(blocks[i + 1])
                    out = pair((l1, l2), x) if l1 is not None and l2 is not None else None
                    if out is not None:
                        x, i = out, i + 2
                        continue
                x, i = blocks[i](x), i + 1
            return x

    _NNUNET_BLOCKS = {ConvDropoutNormReLU: FusedConvDropoutNormReLU, StackedConvBlocks: FusedStackedConvBlocks}


# parents whose forward calls their Sequential only, though they also register its norm (nnU-Net)
_SEQUENTIAL_ONLY_PARENTS = ("ConvDropoutNormReLU", "FusedConvDropoutNormReLU")


def _runs_whole(seq: nn.Sequential, parent: Optional[nn.Module]) -> str:
    """'' when ``parent`` runs ``seq`` only as a whole (each of its modules then sees the previous
    one's output), else why that is not known. A fused norm applies the activation that follows it
    and the activation's slot passes its input through, so a parent that indexed the Sequential, or
    called some of its modules alone, would get other values. Known: no parent (the model itself),
    a parent that is a plain ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``, or one whose
    forward's source uses the Sequential only in calls ``self.<name>(...)``."""
    import inspect
    import re

    if parent is None or type(parent) in (nn.ModuleList, nn.ModuleDict):
        return ""
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        return ""
    names = [k for k, v in parent._modules.items() if v is seq]
    cls = type(parent)
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return f"the source of {cls.__name__}.forward is not available to check how it runs the Sequential"
    code = getattr(cls.forward, "__code__", None)
    me = code.co_varnames[0] if code is not None and code.co_argcount > 0 else "self"
    for name in names:
        uses = [m.end() for m in re.finditer(r"\b" + re.escape(me) + r"\s*\.\s*" + re.escape(name) + r"\b", src)]
        if not uses:
            return f"{cls.__name__}.forward does not call {me}.{name}(...) (it may run its modules one by one)"
        if re.search(r"[\"']" + re.escape(name) + r"[\"']", src):
            return f"{cls.__name__}.forward names {name!r} in a string (it may reach the Sequential by getattr)"
        if any(not re.match(r"\s*\(", src[e:]) for e in uses):
            return (f"{cls.__name__}.forward uses {me}.{name} other than by calling it (indexing it or "
                    f"running its modules one by one would see the fused pair)")
    return ""


def _fuse_sequential(seq: nn.Sequential, prefix: str, fused: list, skipped: list, refs: dict,
                     parent: Optional[nn.Module]) -> None:
    """In one nn.Sequential: InstanceNorm -> [Dropout(p=0)] -> LeakyReLU / ReLU becomes a fused
    instance norm (the same object, its class swapped) and nn.Identity in the activation's slot."""
    names = list(seq._modules)
    whole = None
    for k, name in enumerate(names):
        norm = seq._modules[name]
        if not isinstance(norm, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d,
                                 nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            continue
        where = f"{prefix}.{name}" if prefix else name
        if isinstance(norm, _FusedInstanceNorm):  # fused by an earlier optimize()
            fused.append(f"{where} (fused before)")
            continue
        j = k + 1
        while j < len(names) and isinstance(seq._modules[names[j]], nn.modules.dropout._DropoutNd) \
                and seq._modules[names[j]].p == 0:
            j += 1
        if j >= len(names):
            skipped.append((where, "no activation follows the norm in its Sequential"))
            continue
        if any(_hooked(seq._modules[names[i]]) for i in range(k + 1, j)):
            skipped.append((where, "a hook is registered on the Dropout between the norm and the activation"))
            continue
        act = seq._modules[names[j]]
        spec, why = _norm_act_spec(norm, act)
        if spec is not None and type(norm) in _BATCH_NORMS:
            # the activation's slot would be emptied: nn.SyncBatchNorm.convert_sync_batchnorm (DDP)
            # would then replace the fused norm by a plain one and the activation would be lost
            spec, why = None, ("BatchNorm in a Sequential (its activation would be lost if "
                               "nn.SyncBatchNorm.convert_sync_batchnorm replaced it later)")
        # nnU-Net's block registers its norm and activation twice (as attributes and in the
        # Sequential its forward runs): exactly two references there; anything else is shared
        limit = 2 if type(parent).__name__ in _SEQUENTIAL_ONLY_PARENTS else 1
        shared = [m for m in (norm, act) if refs.get(id(m), 0) > limit]
        if spec is not None and shared:
            spec, why = None, (f"{type(shared[0]).__name__} is registered more than once in the model (it may "
                               f"run outside this Sequential)")
        if spec is not None:
            if whole is None:
                whole = _runs_whole(seq, parent)
            if whole:
                spec, why = None, whole
        if spec is None:
            skipped.append((where, why))
            continue
        norm.__class__ = _FUSED_NORM[type(norm)]
        norm._fm_spec = spec
        if spec["act"] == "prelu":  # its weight stays where it was (state_dict, optimizer)
            act.__class__ = _AppliedPReLU
        else:
            seq._modules[names[j]] = nn.Identity()
        fused.append(f"{where} + {prefix + '.' if prefix else ''}{names[j]}")


def _stacked_nhwc(x: Tensor) -> bool:
    """x is a dense, not contiguous tensor of 5 or more dims whose channel dim (-4) has stride 1: a
    channels-last activation, or a stack of them (DynUNet's deep-supervision output)."""
    if x.ndim < 5 or x.is_contiguous() or x.numel() == 0 or x.shape[-4] == 1 or x.stride(-4) != 1:
        return False
    return sum(st * (n - 1) for st, n in zip(x.stride(), x.shape)) + 1 == x.numel()  # dense, no overlap


def _planar_outputs(out):
    """out with every dense channels-last 5D tensor made planar (also inside lists, tuples,
    namedtuples and dicts); None if none was."""
    if isinstance(out, Tensor):
        return out.contiguous() if _stacked_nhwc(out) else None
    if isinstance(out, (list, tuple)):
        new = [_planar_outputs(o) for o in out]
        if all(n is None for n in new):
            return None
        vals = [o if n is None else n for o, n in zip(out, new)]
        if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
            return type(out)(*vals)
        try:
            return type(out)(vals)
        except TypeError:  # a subclass with its own constructor: a plain list / tuple
            return tuple(vals) if isinstance(out, tuple) else vals
    if isinstance(out, dict):
        new = {k: _planar_outputs(v) for k, v in out.items()}
        if all(n is None for n in new.values()):
            return None
        res = copy.copy(out)  # keeps the dict's class (OrderedDict, ...)
        for k, n in new.items():
            if n is not None:
                res[k] = n
        return res
    return None


def _layout_hook(module: nn.Module, args: tuple, kwargs: dict, out):
    """Forward hook of a model optimize() runs channels last: its outputs come back planar when its
    (first tensor) input was not channels last (planar, or a strided view such as a
    sliding-window patch), as the original model's would."""
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if x is None or x.ndim != 5 or _ext.functorch_active() or _is_nhwc(x):
        return None  # (under torch.func transforms nothing runs channels last: see _nhwc_suits)
    return _planar_outputs(out)


def _set_layout_hook(model: nn.Module, on: bool) -> None:
    """Adds _layout_hook to model once, or removes it."""
    ours = [k for k, h in model._forward_hooks.items() if h is _layout_hook]
    if on and not ours:
        model.register_forward_hook(_layout_hook, with_kwargs=True)
    elif not on:
        for k in ours:
            del model._forward_hooks[k]
            model._forward_hooks_with_kwargs.pop(k, None)


def _nhwc_known_classes() -> list:
    """The networks whose forward is known to take channels-last activations (no .view of conv
    features and the like): the U-Nets optimize() targets. A model of another class (a classifier
    whose head views its features, say) could fail channels last, so the default leaves it planar."""
    found = []
    for mod, names in (("monai.networks.nets", ("DynUNet", "UNet", "BasicUNet")),
                       ("dynamic_network_architectures.architectures.unet", ("PlainConvUNet", "ResidualEncoderUNet"))):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(m, n) for n in names if hasattr(m, n)]
    return found


def _nhwc_known(model: nn.Module) -> bool:
    """model is one of _nhwc_known_classes (a subclass only if it keeps that class's forward)."""
    return any(isinstance(model, c) and type(model).forward is c.forward for c in _nhwc_known_classes())


def _has_nhwc_weights(model: nn.Module) -> bool:
    """Does the model already keep a 3D convolution weight channels last (the user's own layout)?"""
    for mod in model.modules():
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
            w = mod.weight
            if w.shape[1] > 1 and w.is_contiguous(memory_format=_CL) and not w.is_contiguous():
                return True
    return False


def optimize(model: nn.Module, inplace: bool = False, verbose: bool = False, channels_last: Optional[bool] = None,
             onednn: bool = True, upconv: bool = True) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace=True``) with the supported
    norm -> activation patterns fused; see the module docstring. Parameters, buffers and state_dict
    keys are unchanged. ``model._fastmed_report`` lists what was fused and what was skipped (why).

    ``channels_last`` chooses the layout of 3D activations. ``None`` (default): CPU inference
    (autograd off, as under ``torch.no_grad()``) runs on NDHWC (channels-last) activations, which
    oneDNN convolves faster (DynUNet 96^3 eval forward on our 2-core CPU: 2.4-2.7 s against
    2.8-4.0 s planar in the runs of one session; the fused norm has a channels-last kernel). Every ``OneDNNConv3d`` takes a
    float32 CPU input that is not channels last as channels last: free for a contiguous 1-channel
    input (the stem), a copy for a strided patch or where PyTorch computed a small transposed
    convolution in its generic loop (which returns planar data). The weights keep their strides,
    and a forward hook on the model returns its 5D outputs planar when its input was not channels
    last, as the original's; forward hooks a user puts on inner modules see channels-last tensors
    (``.reshape`` works on them, ``.view`` may not). Training stays planar: it measured no faster
    channels last here, and PyTorch's channels-last batch norm backward is less exact (gradients of
    a small DynUNet with batch norm came out ~1% from float64 channels last, 6e-6 planar). The check
    is per convolution, so a block under reentrant checkpointing (first forward without autograd)
    or a frozen encoder runs channels last in training too (same values). This default applies to
    the networks whose forward is known to take NDHWC activations (MONAI's ``DynUNet``, ``UNet``,
    ``BasicUNet``; nnU-Net's ``PlainConvUNet``, ``ResidualEncoderUNet``: the model passed, not a
    wrapper around one); any other model (a classifier whose head calls ``.view`` on conv features
    would fail channels last) stays planar. Other devices, dtypes, CPU autocast and oneDNN switched
    off run as given; nor is anything changed when the model already keeps a 3D convolution weight
    channels last (the user's own layout) or with ``onednn=False``. ``True`` stores the 3D
    convolution weights channels last (``torch.channels_last_3d``; training and CUDA too, where
    cuDNN then runs NDHWC) with the same output hook. ``False``: planar as given. Values are the
    same to float32 rounding in every layout, and optimizing an optimized model again sets its
    layout anew.

    ``onednn=True`` (default) also gives every plain ``nn.Conv3d`` the class ``OneDNNConv3d``
    (same parameters and state_dict): float32 CPU convolutions of a batch of one on small inputs,
    which PyTorch runs in a generic loop, go to oneDNN (outputs equal to float32 rounding; MONAI's
    UNet at batch 1 ran 1.4x faster at 96^3 and 4x at 64^3 on our 2-core CPU), and every plain
    ``nn.Conv2d`` of a model with fused norms the class ``FastConv2d`` (the same ``F.conv2d``; in
    CPU training it keeps the fused norm's input instead of its output, as ``OneDNNConv3d`` does). ``onednn=False`` leaves
    convolutions alone (and gives those of a model optimized before their torch.nn classes back).

    ``upconv=True`` (default) gives every plain ``nn.ConvTranspose2d`` / ``3d`` the class
    ``FastConvTranspose2d`` / ``3d``, and the decoder blocks of DynUNet (``UnetUpBlock``), BasicUNet
    (``UpCat``) and nnU-Net (``UNetDecoder``) a forward that writes the upsampled channels straight
    into the concatenation with the skip: on float32 CPU data with kernel == stride the
    upsampling is fastmed's kernel (``fastmed.ops.upconv``). On planar data PyTorch computes it
    channels last and then transposes (DynUNet 96^3 eval forward: 1.21x with it against 1.10x
    without, on our 2-core CPU); on channels-last data (the default layout) the kernel writes its
    channels into the concatenation buffer and copies the skip in the same pass, where PyTorch's
    ``torch.cat`` reads the upsampled tensor back (the same forward 2.2% faster). The report's
    ``"upconv"`` lists both. ``upconv=False`` leaves them alone (and gives those of a model
    optimized before their classes back)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    fused, skipped = [], []
    refs, parents = {}, {}
    for mod in model.modules():
        for child in mod._modules.values():  # every registration, repeats included
            if child is not None:
                refs[id(child)] = refs.get(id(child), 0) + 1
                parents[id(child)] = mod
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Sequential):
            if type(mod).forward is not nn.Sequential.forward:  # it may not run its modules in order
                if any(isinstance(m, (*_INSTANCE_NORMS, *_BATCH_NORMS, nn.GroupNorm)) for m in mod.children()):
                    skipped.append((name or type(model).__name__,
                                    f"{type(mod).__name__} is an nn.Sequential with its own forward"))
                continue
            _fuse_sequential(mod, name, fused, skipped, refs, parents.get(id(mod)))
            continue
        if type(mod) in _FUSED_TARGETS:  # fused by an earlier optimize()
            fused.append(f"{name or type(model).__name__} (fused before)")
            continue
        if type(mod) not in _FUSED:
            continue
        target, norms = _FUSED[type(mod)]
        specs = [_norm_act_spec(getattr(mod, n), mod.lrelu) for n in norms]
        reasons = [r for sp, r in specs if sp is None]
        if reasons:
            skipped.append((name or type(model).__name__, "; ".join(reasons)))
            continue
        mod._fm_specs = [sp for sp, _ in specs]
        mod.__class__ = target
        fused.append(name or type(model).__name__)
    for mod in model.modules():  # nnU-Net's layers and stacks: the Triton convolution's routes on CUDA
        # (only those holding a fused layer: one with nothing fused keeps its class)
        if type(mod) is ConvDropoutNormReLU and type(mod) in _NNUNET_BLOCKS and _nnunet_layer(mod) is not None:
            mod.__class__ = _NNUNET_BLOCKS[type(mod)]
        elif type(mod) is StackedConvBlocks and type(mod) in _NNUNET_BLOCKS and isinstance(mod.convs, nn.Sequential) \
                and any(_nnunet_layer(b) is not None for b in mod.convs if type(b) in _NNUNET_BLOCKS):
            mod.__class__ = _NNUNET_BLOCKS[type(mod)]
    for mod in model.modules():  # the classes an earlier optimize() gave: back first, set anew below
        # (not where the class changed since, e.g. to a weight parametrization's subclass of ours)
        if "_fm_orig" in mod.__dict__ and type(mod) is mod.__dict__.get("_fm_set"):
            mod.__class__ = mod.__dict__.pop("_fm_orig")
            del mod._fm_set
            mod.__dict__.pop("_fm_nhwc", None)

    def swap(mod, cls):
        mod._fm_orig, mod._fm_set = type(mod), cls
        mod.__class__ = cls

    onednn_convs, convs2d = [], []
    if onednn:
        for name, mod in model.named_modules():
            if type(mod) is nn.Conv3d:
                swap(mod, OneDNNConv3d)
                onednn_convs.append(name)
            elif type(mod) is nn.Conv2d and fused:  # only for the fused norms' recompute (FastConv2d
                # is no faster, and a model with nothing fused stays scriptable and FX-traceable)
                swap(mod, FastConv2d)
                convs2d.append(name)
    upconvs = []
    if upconv:
        for name, mod in model.named_modules():
            if type(mod) in _FAST_TRANSPOSED:
                swap(mod, _FAST_TRANSPOSED[type(mod)])
                upconvs.append(name)
            elif type(mod) in _UPCAT:
                swap(mod, _UPCAT[type(mod)])
                upconvs.append(f"{name} (upsampling written into the skip concatenation)")
    layout = "planar"
    for mod in model.modules():  # weights an earlier optimize(channels_last=True) stored NDHWC: back first
        if getattr(mod, "_fm_cl_weight", False):
            # a clone: .contiguous() keeps the strides of a 1-input-channel weight restrided below
            mod.weight.data = mod.weight.data.clone(memory_format=torch.contiguous_format)
            del mod._fm_cl_weight
    auto = channels_last is None and onednn and _nhwc_known(model) and not _has_nhwc_weights(model)
    if channels_last is None and not auto:
        layout = ("planar (the default runs NDHWC only for MONAI's DynUNet / UNet / BasicUNet and nnU-Net's "
                  "PlainConvUNet / ResidualEncoderUNet, with onednn=True and weights not already channels last; "
                  "channels_last=True for any model)")
    for mod in model.modules():  # set, or reset on a model optimized before
        if isinstance(mod, OneDNNConv3d):
            mod._fm_nhwc = auto
            if auto:
                layout = "channels last in CPU inference (activations)"
    if channels_last:
        layout = "channels last (weights)"
        for mod in model.modules():
            if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
                w = mod.weight.data.contiguous(memory_format=torch.channels_last_3d)
                if w.shape[1] == 1 and isinstance(mod, nn.Conv3d):
                    # one input channel: both layouts are the same memory, but oneDNN writes a
                    # channels-last output only when the weight's strides say so
                    w = w.as_strided(w.shape, (w.shape[2] * w.shape[3] * w.shape[4], 1,
                                               w.shape[3] * w.shape[4], w.shape[4], 1))
                if w.stride() != mod.weight.data.stride():
                    mod._fm_cl_weight = True  # ours: optimizing again restores the planar weight
                mod.weight.data = w
    _set_layout_hook(model, not layout.startswith("planar"))
    model._fastmed_report = {"fused": fused, "skipped": skipped, "onednn": onednn_convs, "conv2d": convs2d,
                             "upconv": upconvs, "layout": layout}
    if verbose:
        print(f"fastmed.optimize: fused norm + activation in {len(fused)} place(s), {len(skipped)} left as they were")
        for n in fused:
            print(f"  fused   {n}")
        for n, why in skipped:
            print(f"  skipped {n}: {why}")
        if onednn_convs:
            print(f"  {len(onednn_convs)} Conv3d -> OneDNNConv3d (batch-1 float32 CPU convolutions to oneDNN)")
        if convs2d:
            print(f"  {len(convs2d)} Conv2d -> FastConv2d (CPU training keeps the fused norm's input, not its output)")
        for n in upconvs:
            print(f"  upconv  {n}")
        print(f"  layout  {layout}")
    return model
