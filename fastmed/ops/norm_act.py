"""``fastmed::norm_act_fwd`` / ``fastmed::norm_act_bwd``: instance normalisation fused with its
activation (nnU-Net's ``InstanceNorm3d(affine=True) -> LeakyReLU(0.01)``), forward and backward.

``norm_act(x, weight, bias, eps, act, slope, prelu)`` on ``x`` (N, C, *spatial): per (n, c) plane the
mean and biased variance (in float64), ``y = act((x - mean) / sqrt(var + eps) * weight[c] + bias[c])``
with ``act`` "none", "relu", "leaky_relu" (negative slope ``slope``) or "prelu" (negative slope
``prelu[c]``, or ``prelu[0]`` for every channel: ``nn.PReLU``'s weight, MONAI's UNet activation), in
one read-twice, write-once pass; the backward recomputes the pre-activation instead of storing it
and returns dx, dweight, dbias and dprelu (per-plane partial sums added over n in a fixed order:
deterministic). CPU kernel in C++;
on CUDA Triton kernels (``fastmed/kernels/norm_act_triton.py``: contiguous or channels-last data
read as it is, each plane split over many programs; checked under TRITON_INTERPRET=1, not yet on a
GPU; float16 / bfloat16 too, accumulating in float32); without Triton, on other devices, and
should the Triton kernels fail to compile on a GPU (a warning says so once), the same formula in
plain PyTorch (float64).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from .. import _ext

__all__ = ["norm_act", "norm_act_", "batch_norm_act", "group_norm_act", "norm_act_reference", "ACTS"]

ACTS = {"none": 0, "relu": 1, "leaky_relu": 2, "prelu": 3}


KINDS = {"instance": 0, "group": 1, "batch": 2, "batch_eval": 3}


def _params(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, slope: float, act: int,
            prelu: Optional[Tensor] = None, kind: int = 0, groups: int = 1):
    """(module, params, keep): weight / bias / PReLU weight converted for the kernel here, and
    ``keep`` holds the converted tensors, whose pointers ``params`` carries: the caller keeps it
    until the kernel has run (a temporary freed before the call would be read after free)."""
    weight, bias = _affine_arg(weight, x), _affine_arg(bias, x)
    prelu = _prelu_arg(prelu, x, act)
    keep = [weight, bias, prelu]
    mod = _ext.require(x.device, "norm_act")
    p = mod.NormActParams()
    p.N, p.C = x.shape[0], x.shape[1]
    p.S = x[0, 0].numel()
    p.dtype = _ext.DTYPE_CODES[x.dtype]
    p.x = x.data_ptr()
    p.weight = weight.data_ptr() if weight is not None else 0
    p.bias = bias.data_ptr() if bias is not None else 0
    p.eps, p.slope, p.act = float(eps), float(slope), int(act)
    if act == 3:
        p.prelu, p.prelu_n = prelu.data_ptr(), prelu.numel()
    p.kind, p.groups = int(kind), int(groups)
    p.channels_last = int(_cl_format(x) is not None)
    p.num_threads = _ext.num_threads()
    return mod, p, keep


_TRITON = []


def _triton():
    """fastmed.kernels.norm_act_triton when Triton imports (GPUs), else None (plain PyTorch)."""
    if not _TRITON:
        norm_act_triton = None
        if os.environ.get("FASTMED_TRITON", "1") != "0":  # FASTMED_TRITON=0: plain PyTorch on GPUs
            try:
                from ..kernels import norm_act_triton
            except Exception:  # no triton, or one that cannot load here
                norm_act_triton = None
        _TRITON.append(norm_act_triton)
    return _TRITON[0]


def _run_triton(fn, *args) -> bool:
    """Runs a Triton launcher; True when it ran. A Triton that fails to compile or launch here
    (an untested GPU, a driver or version mismatch) is switched off for the process with one
    warning, and the caller computes the same values in plain PyTorch instead."""
    try:
        fn(*args)
        return True
    except (torch.cuda.OutOfMemoryError, IndexError, KeyError, AttributeError, NameError):
        raise  # out of memory, or a bug of ours: never hidden behind the fallback
    except Exception as exc:  # noqa: BLE001 - a compile / launch failure
        import warnings

        warnings.warn(f"fastmed: the Triton norm_act kernels failed on this GPU ({type(exc).__name__}: {exc}); "
                      f"using plain PyTorch for norm_act from now on", RuntimeWarning, stacklevel=3)
        _TRITON[:] = [None]
        return False


def _cl_format(x: Tensor):
    """torch.channels_last / channels_last_3d when x is dense in that layout and not also plain
    contiguous (then the CPU kernel works on it as is), else None."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    if fmt is None or x.is_contiguous():
        return None
    return fmt if x.is_contiguous(memory_format=fmt) else None


def _like(x: Tensor) -> Tensor:
    """A new tensor in x's layout (plain contiguous or channels last)."""
    return torch.empty_like(x, memory_format=_cl_format(x) or torch.contiguous_format)


def _affine_arg(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """weight / bias for the kernels: x's dtype (float32 for float16 / bfloat16 x: not rounded)."""
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return None if t is None else t.detach().to(dtype=dt).contiguous()


def _prelu_arg(prelu: Optional[Tensor], x: Tensor, act: int) -> Optional[Tensor]:
    """PReLU's weights for the kernels (act 3): x's dtype (float32 for half x), contiguous."""
    return _affine_arg(prelu, x) if act == 3 else None


def _prelu_grad(dp: Tensor, prelu: Optional[Tensor], N: int, C: int, act: int) -> Tensor:
    """Per-plane PReLU sums (N * C, float64) -> the weight's gradient (float64, prelu's shape);
    an empty tensor without PReLU."""
    if act != 3:
        return dp.new_empty(0)
    g = dp.view(N, C).sum(0)
    return g.sum().reshape(1) if prelu.numel() == 1 else g


def _triton_fwd(tri, x, weight, bias, eps, slope, act, mean, rstd, prelu=None, kind=0, groups=1) -> Optional[Tensor]:
    """y by the Triton kernels (x planar or channels last read as it is, y in x's layout; mean and
    rstd filled, or given for kind 3), or None when they failed (see _run_triton)."""
    xp = x if tri.is_supported_layout(x) else x.contiguous()
    y = _like(xp)
    ok = _run_triton(tri.norm_act_fwd, xp, _affine_arg(weight, x), _affine_arg(bias, x), eps, slope, act,
                     y, mean, rstd, _prelu_arg(prelu, x, act), kind, groups)
    return y if ok else None


def _triton_bwd(tri, dy, x, weight, bias, mean, rstd, slope, act, prelu=None, kind=0, groups=1):
    """(dx in x's layout, dweight, dbias, dprelu in float64) by the Triton kernels, or None."""
    N, C = x.shape[0], x.shape[1]
    xp = x if tri.is_supported_layout(x) else x.contiguous()
    fmt = _cl_format(xp)
    dyp = dy.to(x.dtype).contiguous(memory_format=fmt) if fmt else dy.to(x.dtype).contiguous()
    dx = _like(xp)
    dw = torch.empty(N * C, dtype=torch.float64, device=x.device)
    db = torch.empty(N * C, dtype=torch.float64, device=x.device)
    dp = torch.empty(N * C if act == 3 else 0, dtype=torch.float64, device=x.device)
    if not _run_triton(tri.norm_act_bwd, dyp, xp, _affine_arg(weight, x), _affine_arg(bias, x), mean, rstd,
                       slope, act, dx, dw, db, _prelu_arg(prelu, x, act), dp, kind, groups):
        return None
    return dx, dw.view(N, C).sum(0), db.view(N, C).sum(0), _prelu_grad(dp, prelu, N, C, act)


@torch.library.custom_op("fastmed::norm_act_fwd", mutates_args=())
def norm_act_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, slope: float,
                 act: int, prelu: Optional[Tensor] = None, kind: int = 0, groups: int = 1,
                 run_mean: Optional[Tensor] = None, run_var: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); mean / rstd per plane (N * C, float64): each plane's statistics, or its group's
    (kind 1) or channel's (kind 2); kind 3 normalises with the given run_mean / run_var (batch norm
    in eval) and returns them per plane."""
    planes = x.shape[0] * x.shape[1]
    mean = torch.empty(planes, dtype=torch.float64, device=x.device)
    rstd = torch.empty(planes, dtype=torch.float64, device=x.device)
    if kind == 3:
        _given_stats(x, run_mean, run_var, eps, mean, rstd)
    if x.device.type != "cpu" or (kind != 0 and _ext.cpu is None):
        tri = _triton() if x.device.type == "cuda" else None
        y = _triton_fwd(tri, x, weight, bias, eps, slope, act, mean, rstd, prelu, kind, groups) \
            if tri is not None else None
        if y is not None:
            return y, mean, rstd
        y, m, r = _reference_fwd(x, weight, bias, eps, slope, act, prelu, kind, groups, run_mean, run_var)
        return y, mean.copy_(m.flatten()), rstd.copy_(r.flatten())
    y = _like(x)
    if x.numel():
        mod, p, keep = _params(x, weight, bias, eps, slope, act, prelu, kind, groups)
        p.y, p.mean, p.rstd = y.data_ptr(), mean.data_ptr(), rstd.data_ptr()
        mod.norm_act_fwd(p)
        del keep
    return y, mean, rstd


def norm_act_apply(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   slope: float, act: int, prelu: Optional[Tensor] = None) -> Tensor:
    """norm_act_fwd's y again from its saved per-plane ``mean`` / ``rstd`` (float64, N * C): the
    elementwise pass alone (the kernels' given-statistics variant), the same arithmetic and so the
    same bits as the forward that computed them. Not an op and no autograd: a backward's recompute
    of an activation that was not kept (conv_norm_act2_fwd, conv_norm_act's _ConvOfNormAct)."""
    mean, rstd = mean.detach().clone(), rstd.detach().clone()  # the kernels' given statistics
    prelu = prelu if act == 3 else None
    if x.device.type != "cpu" or _ext.cpu is None:
        tri = _triton() if x.device.type == "cuda" else None
        y = _triton_fwd(tri, x, weight, bias, 0.0, slope, act, mean, rstd, prelu, 3) if tri is not None else None
        if y is not None:
            return y
        return _reference_fwd(x, weight, bias, 0.0, slope, act, prelu, stats=(mean, rstd))[0].contiguous(
            memory_format=_cl_format(x) or torch.contiguous_format)
    y = _like(x)
    if x.numel():
        mod, p, keep = _params(x, weight, bias, 0.0, slope, act, prelu, 3)
        p.y, p.mean, p.rstd = y.data_ptr(), mean.data_ptr(), rstd.data_ptr()
        mod.norm_act_fwd(p)
        del keep
    return y


def _given_stats(x: Tensor, run_mean: Tensor, run_var: Tensor, eps: float, mean: Tensor, rstd: Tensor) -> None:
    """Batch norm in eval: the running statistics per plane (float64), rstd = 1 / sqrt(var + eps)."""
    N, C = x.shape[0], x.shape[1]
    mean.copy_(run_mean.to(torch.float64).expand(N, C).flatten())
    rstd.copy_((1.0 / torch.sqrt(run_var.to(torch.float64) + eps)).expand(N, C).flatten())


@norm_act_fwd.register_fake
def _(x, weight, bias, eps, slope, act, prelu=None, kind=0, groups=1, run_mean=None, run_var=None):
    planes = x.shape[0] * x.shape[1]
    return _like(x), x.new_empty(planes, dtype=torch.float64), x.new_empty(planes, dtype=torch.float64)


@torch.library.custom_op("fastmed::norm_act_bwd", mutates_args=())
def norm_act_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                 slope: float, act: int, prelu: Optional[Tensor] = None, kind: int = 0,
                 groups: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dprelu): the parameters' gradients in float64, dprelu empty unless act 3."""
    N, C = x.shape[0], x.shape[1]
    fmt = _cl_format(x)
    if x.device.type != "cpu" or (kind != 0 and _ext.cpu is None):
        tri = _triton() if x.device.type == "cuda" else None
        out = _triton_bwd(tri, dy, x, weight, bias, mean, rstd, slope, act, prelu, kind, groups) \
            if tri is not None else None
        if out is not None:
            return out
        return _reference_bwd(dy, x, weight, bias, mean, rstd, slope, act, prelu, kind, groups)
    dy = dy.contiguous(memory_format=fmt) if fmt else dy.contiguous()  # x's layout
    dx = _like(x)
    dw = torch.empty(N * C, dtype=torch.float64)
    db = torch.empty(N * C, dtype=torch.float64)
    dp = torch.zeros(N * C if act == 3 else 0, dtype=torch.float64)
    if x.numel():
        mod, p, keep = _params(x, weight, bias, 0.0, slope, act, prelu, kind, groups)
        p.dy, p.dx, p.mean, p.rstd = dy.data_ptr(), dx.data_ptr(), mean.data_ptr(), rstd.data_ptr()
        p.dweight, p.dbias = dw.data_ptr(), db.data_ptr()
        if act == 3:
            p.dprelu = dp.data_ptr()
        mod.norm_act_bwd(p)
        del keep
    # float64 (a float16 sum would overflow)
    return dx, dw.view(N, C).sum(0), db.view(N, C).sum(0), _prelu_grad(dp, prelu, N, C, act)


@norm_act_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, slope, act, prelu=None, kind=0, groups=1):
    C = x.shape[1]
    npr = 0 if act != 3 or prelu is None else prelu.numel()
    return (_like(x), x.new_empty(C, dtype=torch.float64), x.new_empty(C, dtype=torch.float64),
            x.new_empty(npr, dtype=torch.float64))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, slope, act = inputs[:6]
    prelu, kind, groups = (list(inputs[6:9]) + [None, 0, 1][len(inputs[6:9]):])
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, prelu)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.slope, ctx.act, ctx.kind, ctx.groups = slope, act, kind, groups
    ctx.has_w, ctx.has_b = weight is not None, bias is not None
    ctx.eps = eps


def _graph_backward(ctx, dy, x, weight, bias, mean, rstd, prelu):
    """The backward as PyTorch ops that autograd records (create_graph=True: a gradient penalty, a
    Hessian-vector product): the forward recomputed in float64 plain PyTorch and differentiated,
    so the gradient is itself differentiable. The kernels record no graph."""
    with torch.enable_grad():
        stats = (mean, rstd) if ctx.kind == 3 else None  # given statistics (batch norm in eval)
        y = _reference_fwd(x, weight, bias, ctx.eps, ctx.slope, ctx.act, prelu, ctx.kind, ctx.groups, stats=stats)[0]
        wrt = [(i, t) for i, t in ((0, x), (1, weight), (2, bias), (6, prelu))
               if t is not None and ctx.needs_input_grad[i]]
        gs = torch.autograd.grad(y, [t for _, t in wrt], dy, create_graph=True, allow_unused=True)
    out = [None] * 11
    for (i, _), g in zip(wrt, gs):
        out[i] = g
    return tuple(out)


def _backward(ctx, dy, dmean, drstd):
    x, weight, bias, mean, rstd, prelu = ctx.saved_tensors
    if torch.is_grad_enabled():  # backward(create_graph=True)
        return _graph_backward(ctx, dy, x, weight, bias, mean, rstd, prelu)
    dx, dw, db, dp = norm_act_bwd(dy, x, weight, bias, mean, rstd, ctx.slope, ctx.act, prelu, ctx.kind, ctx.groups)
    dprelu = dp.view(prelu.shape).to(prelu.dtype) if prelu is not None and ctx.act == 3 and ctx.needs_input_grad[6] \
        else None
    return (dx, dw.to(weight.dtype) if ctx.has_w and ctx.needs_input_grad[1] else None,
            db.to(bias.dtype) if ctx.has_b and ctx.needs_input_grad[2] else None, None, None, None, dprelu,
            None, None, None, None)


norm_act_fwd.register_autograd(_backward, setup_context=_setup_context)


def _act_code(act) -> int:
    if isinstance(act, int) and act in ACTS.values():
        return act
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    return ACTS[act]


def norm_act(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
             act="leaky_relu", slope: float = 0.01, prelu: Optional[Tensor] = None) -> Tensor:
    """Instance norm (+ optional per-channel affine) fused with an activation; see the module docstring.
    ``act="prelu"`` takes ``prelu``, ``nn.PReLU``'s weight (1 or C values; differentiable)."""
    code = _check(x, weight, bias, eps, act, prelu)
    if not x.is_contiguous() and _cl_format(x) is None:  # channels last is taken as it is
        x = x.contiguous()
    return norm_act_fwd(x, weight, bias, float(eps), float(slope), code, prelu if code == 3 else None)[0]


def _check(x, weight, bias, eps, act, prelu=None, norm="instance norm") -> int:
    """Validates norm_act's arguments (naming the bad one); returns the activation code."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(f"x must be (N, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    if x.numel() and x[0, 0].numel() == 1 and norm == "instance norm":
        # one value per plane: instance norm's variance is 0 (eager PyTorch raises too); batch and
        # group norm take their statistics over more (checked by their own functions)
        raise ValueError(f"x: {norm} needs more than 1 spatial element here, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64) and not (
            x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"x must be float32 or float64 (float16 / bfloat16 too on CUDA), got {x.dtype}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (C,)):
            raise ValueError(f"{name} must be a tensor of shape ({C},), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor on x's device {x.device}, got {t.dtype} on "
                             f"{t.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    code = _act_code(act)
    if code == 3:
        if not isinstance(prelu, Tensor) or prelu.ndim != 1 or prelu.numel() not in (1, C):
            raise ValueError(f"prelu must be nn.PReLU's weight, a tensor of shape (1,) or ({C},) for act='prelu', got "
                             f"{tuple(prelu.shape) if isinstance(prelu, Tensor) else type(prelu).__name__}")
        if not prelu.is_floating_point() or prelu.device != x.device:
            raise ValueError(f"prelu must be a floating-point tensor on {x.device}, got {prelu.dtype} on {prelu.device}")
    elif prelu is not None:
        raise ValueError(f"prelu is only taken with act='prelu', got act={act!r}")
    return code


def group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, act="leaky_relu", slope: float = 0.01, prelu: Optional[Tensor] = None) -> Tensor:
    """``act(F.group_norm(x, num_groups, weight, bias, eps))`` in one read-twice, write-once pass
    (statistics per sample and group of C / num_groups channels); differentiable. C++ kernel on the
    CPU, Triton kernels on CUDA; other devices compute it in float64 plain PyTorch."""
    return _group_norm_act(x, num_groups, weight, bias, eps, act, slope, prelu)[0]


def _group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act,
                    slope: float, prelu: Optional[Tensor]) -> tuple:
    """group_norm_act's (y, mean, rstd, x as the kernel read it, act code, PReLU weight or None)."""
    code = _check(x, weight, bias, eps, act, prelu, "group norm")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {C} channels, got {num_groups!r}")
    num_groups = int(num_groups)
    if x.shape[0] * (C // num_groups) * math.prod(x.shape[2:]) == 1:
        # as F.group_norm, which checks N * C / G * spatial (so one value per group is taken when
        # the batch has more than one item: the output is then the bias)
        raise ValueError(f"x: group norm needs more than 1 value per group, got shape {tuple(x.shape)} and "
                         f"num_groups={num_groups}")
    if not x.is_contiguous() and _cl_format(x) is None:
        x = x.contiguous()
    pw = prelu if code == 3 else None
    y, mean, rstd = norm_act_fwd(x, weight, bias, float(eps), float(slope), code, pw, 1, num_groups)
    return y, mean, rstd, x, code, pw


def batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, act="leaky_relu", slope: float = 0.01,
                   prelu: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))`` in
    one pass (training: statistics per channel over the batch and space, and the running statistics
    updated in place as F.batch_norm does: momentum-weighted, unbiased variance); differentiable.
    ``inplace=True`` (inference only) writes the result over x."""
    return _batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, act, slope, prelu,
                           inplace)[0]


def _batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                    act, slope: float, prelu: Optional[Tensor], inplace: bool) -> tuple:
    """batch_norm_act's (y, mean, rstd, x as the kernel read it, act code, PReLU weight or None,
    kind: 2 batch statistics, 3 the running ones)."""
    code = _check(x, weight, bias, eps, act, prelu, "batch norm")
    N, C = x.shape[0], x.shape[1]
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a number (F.batch_norm's; nn.BatchNorm's momentum=None is its cumulative "
                        f"average, 1 / num_batches_tracked), got {momentum!r}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (C,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor of shape ({C},), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are needed when training=False")
    if training and N * math.prod(x.shape[2:]) == 1:  # as F.batch_norm (an empty x is returned empty)
        raise ValueError(f"x: batch norm in training needs more than 1 value per channel, got shape {tuple(x.shape)}")
    if not x.is_contiguous() and _cl_format(x) is None:
        if inplace:
            raise ValueError("x must be contiguous (or channels last) to be normalised in place")
        x = x.contiguous()
    pw = prelu if code == 3 else None
    kind = 2 if training else 3
    rm, rv = (running_mean, running_var) if kind == 3 else (None, None)
    if inplace:
        _no_graph_inplace(x)
        mean = torch.empty(N * C, dtype=torch.float64, device=x.device)
        rstd = torch.empty_like(mean)
        with torch.no_grad():
            norm_act_inplace_op(x, weight, bias, float(eps), float(slope), code, pw, kind, 1, rm, rv, mean, rstd)
        y = x
    else:
        y, mean, rstd = norm_act_fwd(x, weight, bias, float(eps), float(slope), code, pw, kind, 1, rm, rv)
    if training and running_mean is not None and running_var is not None and x.numel():  # empty: as eager, unchanged
        n = N * math.prod(x.shape[2:])
        with torch.no_grad():  # as F.batch_norm: r = momentum * batch + (1 - momentum) * r, variance unbiased
            # the batch variance from rstd = 1 / sqrt(var + eps) in float64: exact to ~1e-16 * eps / var
            # relative (eager's own float32 variance is ~1e-7 off), never below 0 (a constant channel)
            bm, bv = mean[:C], (1.0 / rstd[:C].square() - eps).clamp_min(0.0)
            running_mean.copy_(momentum * bm + (1 - momentum) * running_mean.double())
            running_var.copy_(momentum * bv * (n / (n - 1)) + (1 - momentum) * running_var.double())
    return y, mean, rstd, x, code, pw, kind


@torch.library.custom_op("fastmed::norm_act_", mutates_args=("x", "mean_out", "rstd_out"))
def norm_act_inplace_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, slope: float,
                        act: int, prelu: Optional[Tensor] = None, kind: int = 0, groups: int = 1,
                        run_mean: Optional[Tensor] = None, run_var: Optional[Tensor] = None,
                        mean_out: Optional[Tensor] = None, rstd_out: Optional[Tensor] = None) -> None:
    """norm_act_fwd's y written over x; mean_out / rstd_out (float64, N * C) receive the statistics
    when given (batch norm in training updates its running statistics from them)."""
    planes = x.shape[0] * x.shape[1]
    if x.device.type != "cpu" or (kind != 0 and _ext.cpu is None):
        tri = _triton() if x.device.type == "cuda" else None
        if tri is not None and tri.is_supported_layout(x):
            mean = mean_out if mean_out is not None else torch.empty(planes, dtype=torch.float64, device=x.device)
            rstd = rstd_out if rstd_out is not None else torch.empty_like(mean)
            if kind == 3:
                _given_stats(x, run_mean, run_var, eps, mean, rstd)
            if _run_triton(tri.norm_act_fwd, x, _affine_arg(weight, x), _affine_arg(bias, x), eps, slope, act,
                           x, mean, rstd, _prelu_arg(prelu, x, act), kind, groups):
                return  # the statistics are read first, then each element is written once
        y, m, r = _reference_fwd(x, weight, bias, eps, slope, act, prelu, kind, groups, run_mean, run_var)
        x.copy_(y)
        for o, v in ((mean_out, m), (rstd_out, r)):
            if o is not None:
                o.copy_(v.flatten())
        return
    if x.numel():
        mod, p, keep = _params(x, weight, bias, eps, slope, act, prelu, kind, groups)
        mean = mean_out if mean_out is not None else torch.empty(planes, dtype=torch.float64)
        rstd = rstd_out if rstd_out is not None else torch.empty_like(mean)
        if kind == 3:
            _given_stats(x, run_mean, run_var, eps, mean, rstd)
        p.y, p.mean, p.rstd = x.data_ptr(), mean.data_ptr(), rstd.data_ptr()  # y = x: each voxel is
        mod.norm_act_fwd(p)  # read for the statistics first, then written once
        del keep


@norm_act_inplace_op.register_fake
def _(x, weight, bias, eps, slope, act, prelu=None, kind=0, groups=1, run_mean=None, run_var=None, mean_out=None,
      rstd_out=None):
    return None


def norm_act_(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
              act="leaky_relu", slope: float = 0.01, prelu: Optional[Tensor] = None) -> Tensor:
    """norm_act in place, for inference: overwrites the contiguous ``x`` with the result (no new
    buffer: on the CPU a fresh activation costs as much in page faults as the pass itself).
    Not differentiable; returns ``x``."""
    code = _check(x, weight, bias, eps, act, prelu)
    if not x.is_contiguous() and _cl_format(x) is None:
        raise ValueError("x must be contiguous (or channels last) to be normalised in place")
    _no_graph_inplace(x)
    with torch.no_grad():
        norm_act_inplace_op(x, weight, bias, float(eps), float(slope), code, prelu if code == 3 else None)
    return x


def _no_graph_inplace(x: Tensor) -> None:
    """The in-place variants are for inference: overwriting a tensor autograd records would leave it
    a wrong gradient without a word, so that is refused."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("x requires grad: the in-place variant is not differentiable (it would silently give a "
                         "wrong gradient); use the out-of-place function, or run under torch.no_grad()")


def _prelu_ref(z: Tensor, prelu: Tensor) -> Tensor:
    """PReLU in z's dtype with 1 or C weights."""
    w = prelu.to(z.dtype).view((1, -1) + (1,) * (z.ndim - 2))
    return torch.where(z > 0, z, z * w)


def _reference_stats(x64: Tensor, eps: float, kind: int = 0, groups: int = 1, run_mean=None, run_var=None):
    """(mean, rstd) of shape (N, C, 1, ...) in float64: per plane (kind 0), per sample and group of
    channels (1), per channel over the batch (2), or the given running statistics (3)."""
    N, C = x64.shape[0], x64.shape[1]
    one = (1,) * (x64.ndim - 2)
    dims = tuple(range(2, x64.ndim))
    if kind == 0:
        mean, var = x64.mean(dims, keepdim=True), x64.var(dims, unbiased=False, keepdim=True)
    elif kind == 1:
        xg = x64.reshape(N, groups, -1)
        mean = xg.mean(-1, keepdim=True).repeat_interleave(C // groups, 1).view((N, C) + one)
        var = xg.var(-1, unbiased=False, keepdim=True).repeat_interleave(C // groups, 1).view((N, C) + one)
    elif kind == 2:
        bd = (0,) + dims
        mean, var = x64.mean(bd, keepdim=True), x64.var(bd, unbiased=False, keepdim=True)
    else:
        mean, var = run_mean.double().view((1, C) + one), run_var.double().view((1, C) + one)
    return mean.expand((N, C) + one), (1.0 / torch.sqrt(var + eps)).expand((N, C) + one)


def _reference_fwd(x, weight, bias, eps, slope, act, prelu=None, kind=0, groups=1, run_mean=None, run_var=None,
                   stats=None):
    """float64 plain PyTorch (differentiable); ``stats``: given per-plane (mean, rstd), (N * C,)."""
    x64 = x.double()
    if stats is not None:
        shape = tuple(x.shape[:2]) + (1,) * (x.ndim - 2)
        mean, rstd = stats[0].view(shape), stats[1].view(shape)
    else:
        mean, rstd = _reference_stats(x64, eps, kind, groups, run_mean, run_var)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    z = (x64 - mean) * rstd
    if weight is not None:
        z = z * weight.double().view(shape)
    if bias is not None:
        z = z + bias.double().view(shape)
    if act == 3:
        y = _prelu_ref(z, prelu)
    else:
        y = z if act == 0 else torch.relu(z) if act == 1 else torch.nn.functional.leaky_relu(z, slope)
    return y.to(x.dtype), mean, rstd


def _reference_bwd(dy, x, weight, bias, mean, rstd, slope, act, prelu=None, kind=0, groups=1):
    """The backward formula of norm_act_bwd in float64 plain PyTorch (non-CPU devices): for group and
    batch norm (kinds 1, 2) dx = rstd (w g - M1 - xhat M2) with M1, M2 the means of w g and
    w g xhat over the statistics' set; kind 3 (given statistics) dx = rstd w g."""
    N, C = x.shape[0], x.shape[1]
    dims = tuple(range(2, x.ndim))
    shape = (N, C) + (1,) * (x.ndim - 2)
    cshape = (1, C) + (1,) * (x.ndim - 2)
    xhat = (x.double() - mean.view(shape)) * rstd.view(shape)
    w = weight.double().view(cshape) if weight is not None else torch.ones(cshape, dtype=torch.float64, device=x.device)
    z = xhat * w + (bias.double().view(cshape) if bias is not None else 0.0)
    g = dy.double()
    if act == 1:
        g = torch.where(z > 0, g, torch.zeros_like(g))
    elif act == 2:
        g = torch.where(z > 0, g, g * slope)
    dp = x.new_empty(0, dtype=torch.float64)
    if act == 3:
        dp = torch.where(z > 0, torch.zeros_like(g), g * z).sum(dims).sum(0)  # per channel
        dp = dp.sum().reshape(1) if prelu.numel() == 1 else dp
        g = torch.where(z > 0, g, g * prelu.double().view((1, -1) + (1,) * (x.ndim - 2)))
    sdz, sdzx = g.sum(dims, keepdim=True), (g * xhat).sum(dims, keepdim=True)
    S = x[0, 0].numel()
    if kind == 0:
        dx = rstd.view(shape) * w * (g - sdz / S - xhat * sdzx / S)
    else:
        m1, m2 = w * sdz, w * sdzx  # (N, C, 1, ...) per-plane sums of w g and w g xhat
        if kind == 1:
            m1 = m1.reshape(N, groups, -1).sum(-1, keepdim=True).repeat_interleave(C // groups, 1).view(shape)
            m2 = m2.reshape(N, groups, -1).sum(-1, keepdim=True).repeat_interleave(C // groups, 1).view(shape)
            cnt = C // groups * S
        else:
            m1, m2, cnt = m1.sum(0, keepdim=True), m2.sum(0, keepdim=True), N * S
        if kind == 3:
            m1, m2 = torch.zeros_like(m1), torch.zeros_like(m2)
        dx = rstd.view(shape) * (w * g - m1 / cnt - xhat * m2 / cnt)
    return dx.to(x.dtype), sdzx.sum(0).flatten(), sdz.sum(0).flatten(), dp  # float64, as the kernels


def norm_act_reference(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
                       act="leaky_relu", slope: float = 0.01, prelu: Optional[Tensor] = None) -> Tensor:
    """float64 plain PyTorch: ``act(instance_norm(x) * weight + bias)`` (differentiable)."""
    return _reference_fwd(x, weight, bias, eps, slope, _act_code(act), prelu)[0].double()
