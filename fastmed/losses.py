"""Dice, Dice + cross-entropy and generalised Dice losses: drop-ins for MONAI's, and nnU-Net's loss.

``fastmed.losses.DiceLoss``, ``DiceCELoss`` and ``GeneralizedDiceLoss`` take the same constructor
arguments, with the same defaults, as MONAI 1.6's classes of the same names and return the same
values and gradients (to float32 rounding). The difference is how they get there: one fused pass
over the logits and an integer label map (no one-hot tensor, no probability tensor, no per-term
temporaries) computes every per-(batch, class) sum, and one pass writes the gradient.

Beyond MONAI:

* ``DiceCELoss`` also takes ``ignore_index`` (voxels with that label are left out of both terms,
  as in ``torch.nn.CrossEntropyLoss``) and ``soft_label``.
* every loss takes ``ddp=True``: with ``batch=True`` the statistics are summed over all
  ``torch.distributed`` ranks before the Dice ratio, as nnU-Net does (see :class:`AllReduceSum`).
* :class:`NNUNetDiceCELoss` is nnU-Net v2's default training loss (soft Dice without background
  over softmax probabilities, plus cross-entropy, with its ignore label).

Dtypes: logits may be float32, float16, bfloat16 or float64; the kernel accumulates in float32 or
wider, and the loss is returned in float32 (float64 for float64 logits). Labels may be uint8,
int8, int16, int32, int64 or float (truncated like ``.long()``), shaped (B, 1, *spatial).

NaN and Inf logits behave as in PyTorch: they propagate through softmax / sigmoid into the sums,
so a NaN logit makes the loss NaN (with ``batch=False`` and ``reduction='none'``, only the affected
batch item's values).
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from . import _ext
from .ops.dice_ce import ACT, CE, LABEL_DTYPES, LOGIT_DTYPES, dice_ce_fwd, dice_ce_reference

__all__ = ["DiceLoss", "DiceCELoss", "GeneralizedDiceLoss", "NNUNetDiceCELoss", "AllReduceSum", "ShapeError"]


class ShapeError(ValueError, AssertionError):
    """Mismatched shapes. A ValueError, and an AssertionError like the one MONAI raises."""


# ------------------------------------------------------------------------------------------------
# shared plumbing


class AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all ranks; the backward sums the gradients over ranks too.

    Every rank computes the same loss from the same global sums, so the gradient that reaches a
    rank's local sums is the sum over ranks of each rank's (identical) gradient; DDP then divides
    the parameter gradients by the world size, which gives exactly the single-process gradient of
    the loss over the whole global batch.
    """

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM)
        return g


def _ddp_active(ddp: bool) -> bool:
    return bool(ddp) and torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_label_arg(value, name: str):
    """An ignore label: None or an integer (numpy integers too, or a float holding one, as MONAI's
    comparison takes 1.0 for 1) that fits int64."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
            and float(value).is_integer() and abs(float(value)) < 2 ** 63:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -2**63 <= int(value) < 2**63:
        raise TypeError(f"{name}: expected None or an integer label (int64), got {value!r}")
    return int(value)


def _check_reduction(reduction: str, allowed=("none", "mean", "sum")) -> str:
    r = getattr(reduction, "value", reduction)
    if r not in allowed:
        raise ValueError(f"reduction: unsupported value {reduction!r}, available options are {list(allowed)}")
    return r


def _check_inputs(input: Tensor, target: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if input.dtype not in LOGIT_DTYPES:
        raise TypeError(f"input: expected a floating-point tensor (float32, float16, bfloat16, float64), got {input.dtype}")
    if input.ndim < 3:
        raise ShapeError(f"input: expected shape (B, C, *spatial) with at least one spatial dim, got {tuple(input.shape)}")
    if target.ndim != input.ndim:
        raise ShapeError(
            f"target: the number of dimensions of input and target should be the same, got input {tuple(input.shape)} "
            f"and target {tuple(target.shape)}; an integer label map should be shaped (B, 1, *spatial)"
        )
    if input.shape[0] == 0:
        raise ValueError("input: empty batch (batch size 0)")
    if input.numel() == 0:
        raise ValueError(f"input: has zero elements, shape {tuple(input.shape)}")
    if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
        raise ShapeError(
            f"target: batch and spatial sizes must match input's, got input {tuple(input.shape)} and target {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ValueError(f"target: is on {target.device} but input is on {input.device}")
    if target.dtype == torch.bool:
        pass
    elif target.dtype not in LABEL_DTYPES + (torch.float16, torch.bfloat16):
        raise TypeError(f"target: unsupported dtype {target.dtype}")


def _stats(x, target, *, mask=None, ce_weight=None, act="none", ce="none", dice=True, label_map=False,
           squared=False, soft=False, ignore_index=None, ce_smooth=False):
    """Run the fused op (or the float64 reference where no kernel applies)."""
    if target.dtype == torch.bool or (not label_map and target.dtype in (torch.float16, torch.bfloat16) and target.dtype != x.dtype):
        target = target.to(torch.uint8 if target.dtype == torch.bool else torch.float32)
    if label_map and target.dtype in (torch.float16, torch.bfloat16):
        target = target.to(torch.float32)
    # the kernels read the mask and the class weights in float32: float64 logits whose mask or
    # weights float32 cannot hold exactly (a soft ignore mask, a weight like 0.1) take the float64
    # reference, so that a float64 loss stays exact to float64 rounding
    inexact = x.dtype == torch.float64 and not (_exact_in_float32(mask) and _exact_in_float32(ce_weight))
    needs_ref = (
        inexact
        or x.device.type not in ("cpu", "cuda")
        or target.requires_grad
        or (mask is not None and mask.requires_grad)
        or _ext.functorch_active()  # torch.func (grad, vmap, ...): the op's autograd has no functorch rule
    )
    if mask is not None:
        mask = mask.to(device=x.device, dtype=torch.float64 if needs_ref else torch.float32)
    if ce_weight is not None:
        ce_weight = ce_weight.to(device=x.device, dtype=torch.float64 if needs_ref else torch.float32).contiguous()
    args = (x, target, mask, ce_weight, ACT[act], CE[ce], dice, label_map, squared, soft, ignore_index, ce_smooth)
    if needs_ref:
        return dice_ce_reference(*args)
    return dice_ce_fwd(*args)


def _exact_in_float32(t: Optional[Tensor]) -> bool:
    """t is None, or every value of t is a float32 value (NaN counts as not)."""
    if t is None or t.dtype in (torch.float32, torch.float16, torch.bfloat16) or not t.is_floating_point():
        return True
    with torch.no_grad():
        return bool(torch.equal(t.to(torch.float32).to(t.dtype), t))


def _ignore_mask(target: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    """MONAI's spatial ignore mask for a dense target (B, C, ...) -> (B, 1, ...), float32 (float64
    for a soft float64 target: 1 - target[:, ignore_index] is soft then)."""
    if ignore_index is None:
        return None
    if target.shape[1] == 1:
        return (target != ignore_index).to(torch.float32)
    C = target.shape[1]
    if 0 <= ignore_index < C:
        dt = torch.float64 if target.dtype == torch.float64 else torch.float32
        return 1.0 - target[:, ignore_index:ignore_index + 1].to(dt)
    return (target.sum(dim=1, keepdim=True) > 0).to(torch.float32)


class _DicePrep:
    """Decides, once per call, how the Dice term reads its inputs (shared by all the losses)."""

    def __init__(self, loss, input: Tensor, target: Tensor, ignore_index: Optional[int]):
        C = input.shape[1]
        self.C = C
        self.act = "none"
        self.x = input
        if loss.sigmoid:
            self.act = "sigmoid"
        if loss.softmax:
            if C == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
            else:
                self.act = "softmax"
        if loss.other_act is not None:
            x = input
            if self.act == "sigmoid":
                x = torch.sigmoid(x)
            elif self.act == "softmax":
                x = torch.softmax(x, 1)
            self.x = loss.other_act(x)
            self.act = "none"
            if not isinstance(self.x, Tensor) or self.x.shape != input.shape:
                raise ShapeError("other_act: must return a tensor of the same shape as input")
        self.label_map = False
        self.mask = None
        self.ignore_index = None
        if loss.to_onehot_y and C == 1:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
        if loss.to_onehot_y and C > 1:
            if target.shape[1] != 1:
                raise ShapeError(
                    f"target: with to_onehot_y=True the target must be a label map shaped (B, 1, *spatial), got {tuple(target.shape)}"
                )
            self.label_map = True
            self.ignore_index = ignore_index
        else:
            if target.shape != input.shape:
                raise ShapeError(f"ground truth has different shape ({tuple(target.shape)}) from input ({tuple(input.shape)})")
            self.mask = _ignore_mask(target, ignore_index)
        self.keep_from = 0
        if not loss.include_background:
            if C == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                self.keep_from = 1


def _tp_fp_fn(stats: Tensor, squared: bool, soft: bool):
    """MONAI's compute_tp_fp_fn from the fused sums (float64)."""
    inter, pred, grnd, diff = stats.unbind(-1)
    if soft and not squared:
        tp = (pred + grnd - diff) / 2
    else:
        tp = inter  # for squared sums (p-y)^2 = p^2 + y^2 - 2py makes MONAI's tp exactly sum(p*y)
    return tp, pred - tp, grnd - tp


def _sum_batch(t: Tensor, batch: bool, ddp: bool) -> Tensor:
    if not batch:
        return t
    t = t.sum(0)
    if _ddp_active(ddp):
        t = AllReduceSum.apply(t)
    return t


def _reduce(f: Tensor, reduction: str, spatial_dims: int) -> Tensor:
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    return f.view(list(f.shape[0:2]) + [1] * spatial_dims)


def _out_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _dice_value(loss, stats: Tensor, prep: _DicePrep, class_weight: Optional[Tensor], squared: bool, jaccard: bool,
                soft: bool) -> Tensor:
    stats = stats[:, prep.keep_from:]
    stats = _sum_batch(stats, loss.batch, getattr(loss, "ddp", False))
    tp, fp, fn = _tp_fp_fn(stats, squared, soft)
    if not jaccard:
        fp = fp * 0.5
        fn = fn * 0.5
    f = 1 - (2 * tp + loss.smooth_nr) / (2 * (tp + fp + fn) + loss.smooth_dr)
    n_cls = stats.shape[-2]
    if class_weight is not None and n_cls != 1:
        w = class_weight
        if w.ndim == 0:
            w = w.expand(n_cls)
        elif w.shape[0] != n_cls:
            raise ValueError(
                "weight: the length of the `weight` sequence should be the same as the number of classes. "
                "If `include_background=False`, the weight should not include the background category class 0."
            )
        if w.min() < 0:
            raise ValueError("weight: the value/values of the `weight` should be no less than 0.")
        f = f * w.to(device=f.device, dtype=f.dtype)
    return f


# ------------------------------------------------------------------------------------------------
# MONAI drop-ins


class DiceLoss(_Loss):
    """Soft Dice / Jaccard loss with MONAI 1.6's ``DiceLoss`` signature and results.

    ``input`` is (B, C, *spatial) logits or probabilities; ``target`` is (B, C, *spatial) one-hot or
    soft, or with ``to_onehot_y=True`` an integer label map (B, 1, *spatial), read directly without
    building a one-hot tensor. ``ddp=True`` (fastmed only) sums the batch statistics over
    ``torch.distributed`` ranks when ``batch=True``.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | int | Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        ddp: bool = False,
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.ignore_index = _check_label_arg(ignore_index, "ignore_index")
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)
        self.soft_label = soft_label
        self.ddp = ddp

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_inputs(input, target)
        prep = _DicePrep(self, input, target, self.ignore_index)
        stats, _ = _stats(prep.x, target, mask=prep.mask, act=prep.act, label_map=prep.label_map,
                          squared=self.squared_pred, soft=self.soft_label, ignore_index=prep.ignore_index)
        f = _dice_value(self, stats, prep, self.class_weight, self.squared_pred, self.jaccard, self.soft_label)
        return _reduce(f, self.reduction, input.ndim - 2).to(_out_dtype(input))


class GeneralizedDiceLoss(_Loss):
    """Generalised Dice loss (Sudre et al. 2017) with MONAI 1.6's ``GeneralizedDiceLoss`` signature and results."""

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        w_type: str = "square",
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        *,
        ddp: bool = False,
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        w = getattr(w_type, "value", w_type)
        if w not in ("square", "simple", "uniform"):
            raise ValueError(f"w_type: unsupported value {w_type!r}, available options are ['square', 'simple', 'uniform']")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.w_type = w
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.soft_label = soft_label
        self.ddp = ddp

    def w_func(self, grnd: Tensor) -> Tensor:
        if self.w_type == "simple":
            return torch.reciprocal(grnd)
        if self.w_type == "square":
            return torch.reciprocal(grnd * grnd)
        return torch.ones_like(grnd)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_inputs(input, target)
        prep = _DicePrep(self, input, target, None)
        stats, _ = _stats(prep.x, target, act=prep.act, label_map=prep.label_map, soft=self.soft_label)
        stats = _sum_batch(stats[:, prep.keep_from:], self.batch, self.ddp)
        tp, fp, fn = _tp_fp_fn(stats, False, self.soft_label)
        denominator = 2 * (tp + 0.5 * fp + 0.5 * fn)
        # MONAI computes the weights from float32 sums
        w = self.w_func(stats[..., 2].to(torch.float32)).to(torch.float64)
        infs = torch.isinf(w)
        w = torch.where(infs, torch.zeros_like(w), w)
        if self.batch:
            w = w + infs * torch.max(w)
        else:
            w = w + infs * torch.max(w, dim=1)[0].unsqueeze(dim=1)
        dim = 0 if self.batch else 1
        numer = 2.0 * (tp * w).sum(dim, keepdim=True) + self.smooth_nr
        denom = (denominator * w).sum(dim, keepdim=True) + self.smooth_dr
        f = 1.0 - numer / denom
        return _reduce(f, self.reduction, input.ndim - 2).to(_out_dtype(input))


class DiceCELoss(_Loss):
    """Dice + cross-entropy with MONAI 1.6's ``DiceCELoss`` signature and results, in one fused pass.

    The cross-entropy is computed on the raw logits (softmax CE for C > 1, with class indices from a
    (B, 1, ...) label map or class probabilities from a (B, C, ...) target; BCE-with-logits for C = 1),
    with ``weight`` as the class weight (``pos_weight`` for BCE) and ``label_smoothing``.
    fastmed additions: ``ignore_index`` (left out of the Dice sums and of the CE, whose mean is then
    over the remaining voxels, as in PyTorch), ``soft_label`` and ``ddp``.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        soft_label: bool = False,
        ignore_index: int | None = None,
        ddp: bool = False,
    ) -> None:
        super().__init__()
        reduction = _check_reduction(reduction, ("mean", "sum"))
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight is not None and weight.ndim != 1:
            raise ValueError(f"weight: DiceCELoss takes one weight per class (a sequence or a 1D tensor, as the "
                             f"cross-entropy's), got shape {tuple(weight.shape)}")
        ignore_index = _check_label_arg(ignore_index, "ignore_index")
        dice_weight = weight[1:] if (weight is not None and not include_background) else weight
        self.dice = DiceLoss(
            include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid, softmax=softmax,
            other_act=other_act, squared_pred=squared_pred, jaccard=jaccard, reduction=reduction,
            smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, weight=dice_weight, soft_label=soft_label,
            ignore_index=ignore_index, ddp=ddp,
        )
        if lambda_dice < 0.0:
            raise ValueError("lambda_dice should be no less than 0.0.")
        if lambda_ce < 0.0:
            raise ValueError("lambda_ce should be no less than 0.0.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1], got {label_smoothing}")
        # the class weight lives where MONAI's DiceCELoss keeps it (the same tensor in both), so a
        # state_dict saved with MONAI's class loads here and the other way round; the two modules
        # hold it, the fused op computes the cross-entropy
        self.cross_entropy = nn.CrossEntropyLoss(weight=weight, reduction=reduction,
                                                 label_smoothing=float(label_smoothing))
        self.binary_cross_entropy = nn.BCEWithLogitsLoss(pos_weight=weight, reduction=reduction)
        self._register_load_state_dict_pre_hook(_old_weight_key)
        self.reduction = reduction
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index

    @property
    def weight(self) -> Optional[Tensor]:
        """The class weight (``cross_entropy.weight``, also ``binary_cross_entropy.pos_weight``)."""
        return self.cross_entropy.weight

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_inputs(input, target)
        C = input.shape[1]
        if target.shape[1] != 1 and target.shape[1] != C:
            raise ShapeError(
                "target: number of channels for target is neither 1 (without one-hot encoding) nor the same as input, "
                f"got shape {tuple(input.shape)} and {tuple(target.shape)}."
            )
        d = self.dice
        prep = _DicePrep(d, input, target, self.ignore_index)
        w = self.binary_cross_entropy.pos_weight if C == 1 else self.cross_entropy.weight
        if w is not None and w.requires_grad and torch.is_grad_enabled():
            # as PyTorch's cross_entropy / BCE-with-logits (so MONAI) refuse it: the fused op has no
            # gradient for the class weight, and half a gradient (the Dice term's) would be wrong
            raise RuntimeError("weight: the cross-entropy is not differentiable with respect to its class weight "
                               "(as in PyTorch); pass weight.detach(), or compute under torch.no_grad()")
        if C == 1:
            ce_mode, ce_label_map = "bce", False
            if w is not None:
                if w.numel() != 1:
                    raise ValueError(f"weight: with one channel the cross-entropy is BCE and weight is its pos_weight, "
                                     f"one value; got shape {tuple(w.shape)}")
                w = w.reshape(1)
        else:
            ce_mode, ce_label_map = "softmax", target.shape[1] == 1
            if w is not None and (w.ndim != 1 or w.shape[0] != C):
                raise ValueError(f"weight: expected {C} class weights for cross-entropy, got shape {tuple(w.shape)}")
        ce_mask = None if ce_label_map else _ignore_mask(target, self.ignore_index)
        ce_target = target if (ce_label_map or C > 1 or target.is_floating_point()) else target.to(input.dtype)
        fused = prep.x is input and prep.label_map == ce_label_map
        if fused:
            stats, ce = _stats(input, target, mask=prep.mask, ce_weight=w, act=prep.act, ce=ce_mode,
                               label_map=prep.label_map, squared=d.squared_pred, soft=d.soft_label,
                               ignore_index=prep.ignore_index if prep.label_map else None,
                               ce_smooth=self.label_smoothing > 0)
        else:
            stats, _ = _stats(prep.x, target, mask=prep.mask, act=prep.act, label_map=prep.label_map,
                              squared=d.squared_pred, soft=d.soft_label, ignore_index=prep.ignore_index)
            _, ce = _stats(input, ce_target, mask=ce_mask, ce_weight=w, ce=ce_mode, dice=False,
                           label_map=ce_label_map, ignore_index=self.ignore_index if ce_label_map else None,
                           ce_smooth=self.label_smoothing > 0)
        f = _dice_value(d, stats, prep, d.class_weight, d.squared_pred, d.jaccard, d.soft_label)
        dice_loss = _reduce(f, self.reduction, input.ndim - 2)
        ce_loss = _ce_value(ce, ce_mode, ce_label_map, C, self.label_smoothing, self.reduction)
        total = self.lambda_dice * dice_loss + self.lambda_ce * ce_loss
        return total.to(_out_dtype(input))


def _old_weight_key(state_dict, prefix, *args) -> None:
    """A state_dict of fastmed 0.1's DiceCELoss kept the class weight as ``weight``: load it into
    MONAI's places."""
    old = state_dict.pop(prefix + "weight", None)
    if old is not None:
        state_dict.setdefault(prefix + "cross_entropy.weight", old)
        state_dict.setdefault(prefix + "binary_cross_entropy.pos_weight", old)


def _ce_value(ce: Tensor, mode: str, label_map: bool, C: int, eps: float, reduction: str) -> Tensor:
    """torch.nn.CrossEntropyLoss / BCEWithLogitsLoss value from the fused sums."""
    tot = ce.sum(0)
    if mode == "bce":
        return tot[0] / tot[3] if reduction == "mean" else tot[0]
    # without label smoothing the all-class sum is not used at all: a -inf logit of a class that
    # is not the voxel's label makes that sum inf, and 0 * inf would be NaN where PyTorch is finite
    value = tot[0] if eps == 0 else (1.0 - eps) * tot[0] + (eps / C) * tot[1]
    if reduction == "sum":
        return value
    return value / (tot[2] if label_map else tot[3])


# ------------------------------------------------------------------------------------------------
# nnU-Net


class NNUNetDiceCELoss(torch.nn.Module):
    """nnU-Net v2's default training loss: soft Dice + cross-entropy (its ``DC_and_CE_loss`` with
    ``MemoryEfficientSoftDiceLoss``), fused.

    ``loss = weight_ce * CE(logits, target) - weight_dice * mean_c dice_c`` where
    ``dice_c = (2 I_c + smooth) / max(P_c + G_c + smooth, 1e-8)`` over softmax probabilities, summed
    over spatial dims (and the batch, and all ranks with ``ddp``, when ``batch_dice``), classes from 1
    (``do_bg=False``). Voxels labelled ``ignore_label`` are left out of both terms; if every voxel is
    ignored, the CE term is 0. ``target`` is a label map (B, 1, *spatial) or one-hot (B, C, *spatial).
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5,
                 ignore_label: int | None = None, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 ddp: bool = False) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = float(smooth)
        self.ignore_label = _check_label_arg(ignore_label, "ignore_label")
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)
        self.ddp = ddp

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        _check_inputs(net_output, target)
        C = net_output.shape[1]
        if C < 2:
            raise ShapeError(f"net_output: nnU-Net's loss needs at least 2 classes (softmax), got C={C}")
        label_map = target.shape[1] == 1
        if not label_map and target.shape != net_output.shape:
            raise ShapeError(f"target: expected (B, 1, *spatial) labels or one-hot {tuple(net_output.shape)}, got {tuple(target.shape)}")
        if self.ignore_label is not None and not label_map:
            raise ShapeError("target: ignore_label needs a label map shaped (B, 1, *spatial)")
        stats, ce = _stats(net_output, target, act="softmax", ce="softmax" if self.weight_ce != 0 else "none",
                           dice=self.weight_dice != 0, label_map=label_map, ignore_index=self.ignore_label)
        total = net_output.new_zeros((), dtype=torch.float64)
        if self.weight_dice != 0:
            s = stats if self.do_bg else stats[:, 1:]
            s = _sum_batch(s, self.batch_dice, self.ddp)
            inter, pred, grnd = s[..., 0], s[..., 1], s[..., 2].detach()
            dc = (2 * inter + self.smooth) / torch.clip(grnd + pred + self.smooth, 1e-8)
            total = total - self.weight_dice * dc.mean()
        if self.weight_ce != 0:
            tot = ce.sum(0)
            ce_loss = torch.where(tot[3] > 0, tot[0] / tot[3].clamp_min(1e-300), torch.zeros_like(tot[0]))
            total = total + self.weight_ce * ce_loss
        return total.to(_out_dtype(net_output))
