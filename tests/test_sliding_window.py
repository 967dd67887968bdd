"""fastmed.inferers against MONAI 1.6's sliding_window_inference, and the stitching ops."""
from __future__ import annotations

import pytest
import torch

from fastmed import inferers as FI
from fastmed.ops import sliding_window as SW

monai = pytest.importorskip("monai")
from monai.inferers import SlidingWindowInferer as MSWI  # noqa: E402
from monai.inferers import sliding_window_inference as msw  # noqa: E402


def pred3(x):
    return torch.cat([x.sin(), x.cos() * 2, x * x], 1)


def run_both(x, *args, **kw):
    return msw(x, *args, **kw), FI.sliding_window_inference(x, *args, **kw)


def assert_same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
        return
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
        return
    a = a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a
    b = b.as_subclass(torch.Tensor) if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, (0.5, 0.25, 0.0)])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("sw_batch_size", [1, 3, 8])
def test_3d_matches_monai_exactly(overlap, mode, sw_batch_size):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 37, 45, 29)
    a, b = run_both(x, (16, 20, 12), sw_batch_size, pred3, overlap, mode)
    assert torch.equal(a, b)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_2d_matches_monai_exactly(overlap, mode):
    torch.manual_seed(1)
    x = torch.randn(3, 1, 50, 33)
    a, b = run_both(x, (16, 16), 4, pred3, overlap, mode, sigma_scale=(0.2, 0.1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("roi", [(16, 16, -1), (None, 8, 8), (0, 12, 12), 10, (64, 12, 40)])
@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_roi_fallback_and_padding(roi, padding_mode):
    torch.manual_seed(2)
    x = torch.randn(1, 1, 21, 30, 17)
    kw = dict(padding_mode=padding_mode, cval=-3.0)
    if roi == (64, 12, 40) and padding_mode in ("reflect", "circular"):
        with pytest.raises(ValueError, match="padding_mode"):
            FI.sliding_window_inference(x, roi, 2, pred3, 0.5, "gaussian", **kw)
        return
    b = FI.sliding_window_inference(x, roi, 2, pred3, 0.5, "gaussian", **kw)
    try:
        a = msw(x, roi, 2, pred3, 0.5, "gaussian", **kw)
    except RuntimeError as e:  # MONAI 1.6 passes cval to F.pad for every mode, which torch refuses
        assert padding_mode != "constant" and "value" in str(e)
        assert b.shape == (1, 3, 21, 30, 17) and torch.isfinite(b).all()
        return
    assert torch.equal(a, b)


def test_image_smaller_than_roi_pads_like_monai():
    x = torch.randn(1, 1, 5, 7, 3)
    a, b = run_both(x, (8, 8, 8), 1, pred3, 0.25, "gaussian", padding_mode="constant", cval=2.0)
    assert torch.equal(a, b) and b.shape == (1, 3, 5, 7, 3)


def test_tuple_and_dict_outputs_and_other_resolutions():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 24, 32, 20)

    def multi(w):
        up = torch.nn.functional.interpolate(w, scale_factor=2, mode="nearest")
        down = torch.nn.functional.avg_pool3d(w, 2)
        return (w * 2, up.sin(), down + 1)

    a, b = run_both(x, (16, 16, 8), 3, multi, 0.5, "gaussian")
    assert_same(a, b)
    assert b[1].shape[2:] == (48, 64, 40) and b[2].shape[2:] == (12, 16, 10)

    def as_dict(w):
        return {"seg": pred3(w), "aux": w.mean(1, keepdim=True)}

    a, b = run_both(x, (16, 16, 8), 2, as_dict, 0.25, "constant")
    assert_same(a, b)


def test_other_resolution_smaller_than_roi_image():
    x = torch.randn(1, 1, 6, 20, 9)

    def up(w):
        return torch.nn.functional.interpolate(w, scale_factor=2, mode="nearest")

    a, b = run_both(x, (8, 8, 8), 2, up, 0.5, "gaussian")
    assert_same(a, b)


class Stateful:
    def __init__(self):
        self.calls = []

    def __call__(self, w, *args, **kwargs):
        self.calls.append((tuple(w.shape), float(w.sum()), args, tuple(sorted(kwargs))))
        return w * len(self.calls)


@pytest.mark.parametrize("buffer_steps", [None, 1, 2])
def test_stateful_predictor_sees_the_same_calls(buffer_steps):
    torch.manual_seed(4)
    x = torch.randn(2, 1, 30, 26, 22)
    pm, pf = Stateful(), Stateful()
    a = msw(x, (12, 12, 12), 3, pm, 0.5, "gaussian", buffer_steps=buffer_steps, buffer_dim=0, extra=1)
    b = FI.sliding_window_inference(x, (12, 12, 12), 3, pf, 0.5, "gaussian", buffer_steps=buffer_steps,
                                    buffer_dim=0, extra=1)
    assert pm.calls == pf.calls
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_with_coord_args_kwargs_and_condition():
    torch.manual_seed(5)
    x = torch.randn(1, 1, 20, 20, 20)
    cond = torch.randn(1, 1, 20, 20, 20)
    seen = {"m": [], "f": []}

    def make(tag):
        def p(w, coords, scale, condition=None, shift=0.0):
            seen[tag].append([[(s.start, s.stop) for s in c] for c in coords])
            return w * scale + condition + shift
        return p

    pos = (0.25, "gaussian", 0.125, "constant", 0.0, None, None, False, None, None, None, -1, True, 3.0)
    a = msw(x, (8, 8, 8), 4, make("m"), *pos, condition=cond, shift=1.0)
    b = FI.sliding_window_inference(x, (8, 8, 8), 4, make("f"), *pos, condition=cond, shift=1.0)
    assert seen["m"] == seen["f"]
    assert torch.equal(a, b)


def test_process_fn_and_roi_weight_map():
    torch.manual_seed(6)
    x = torch.randn(1, 1, 20, 24, 16)
    wmap = torch.rand(8, 8, 8) + 0.1

    def process(seg, win, imap):
        return tuple(s * 0.5 for s in seg), imap * 2 + 0.5

    a, b = run_both(x, (8, 8, 8), 3, pred3, 0.5, "gaussian", process_fn=process)
    assert torch.equal(a, b)
    a, b = run_both(x, (8, 8, 8), 3, pred3, 0.5, "gaussian", roi_weight_map=wmap)
    assert torch.equal(a, b)



@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_follow_the_input(dtype):
    torch.manual_seed(7)
    x = torch.randn(1, 1, 24, 20, 18).to(dtype)
    a, b = run_both(x, (12, 12, 12), 2, pred3, 0.5, "gaussian")
    assert b.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_fp16_accumulation_error_is_bounded():
    """fp16 accumulators: error against the float64 result stays within a few fp16 ulps."""
    torch.manual_seed(8)
    x = torch.randn(1, 1, 40, 40, 40)
    ref = FI.sliding_window_inference(x.double(), (16, 16, 16), 4, pred3, 0.5, "gaussian")
    got = FI.sliding_window_inference(x.half(), (16, 16, 16), 4, pred3, 0.5, "gaussian").double()
    err = ((got - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    # measured 4.7e-3: the input is rounded to fp16 (4.9e-4 relative), then each product and each of
    # up to 27 window sums and the division are rounded to fp16 (4.9e-4 each)
    assert err < 1e-2


def test_inferer_class_matches_monai():
    torch.manual_seed(9)
    x = torch.randn(1, 1, 30, 30, 30)
    for kw in ({}, {"cache_roi_weight_map": True}, {"cpu_thresh": 10}, {"buffer_steps": 2, "buffer_dim": 1}):
        m = MSWI((12, 12, 12), 3, 0.5, "gaussian", **kw)
        f = FI.SlidingWindowInferer((12, 12, 12), 3, 0.5, "gaussian", **kw)
        torch.testing.assert_close(f(x, pred3), m(x, pred3), rtol=1e-6, atol=1e-6)


def test_metatensor_in_metatensor_out():
    from monai.data import MetaTensor

    x = MetaTensor(torch.randn(1, 1, 20, 20, 20), affine=torch.diag(torch.tensor([0.7, 0.7, 5.0, 1.0])))
    a, b = run_both(x, (8, 8, 8), 2, pred3, 0.25, "gaussian")
    assert isinstance(b, MetaTensor)
    torch.testing.assert_close(b.affine, a.affine)
    assert torch.equal(b.as_tensor(), a.as_tensor())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metatensor_in_tuple_and_dict_out_like_monai(dtype):
    """MONAI converts the whole result (tensor, tuple or dict) to an empty MetaTensor carrying the
    input's metadata: float32 MetaTensors whatever the input's dtype (a dict's values, and a tuple's
    items, lose the affine there). fastmed returns the same types, dtypes and affines."""
    from monai.data import MetaTensor

    aff = torch.diag(torch.tensor([2.0, 0.7, 5.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.randn(1, 1, 12, 10, 8, dtype=dtype), affine=aff)
    for pred in (lambda w: w * 2, lambda w: (w * 2, w + 1), lambda w: {"b": w + 1, "a": w * 2}):
        a, b = run_both(x, (6, 6, 6), 2, pred, 0.5, "gaussian")
        assert type(a) is type(b)
        items_a = list(a.items()) if isinstance(a, dict) else list(enumerate(a if isinstance(a, tuple) else [a]))
        items_b = list(b.items()) if isinstance(b, dict) else list(enumerate(b if isinstance(b, tuple) else [b]))
        assert [k for k, _ in items_a] == [k for k, _ in items_b]
        for (_, u), (_, v) in zip(items_a, items_b):
            assert type(u) is type(v) is MetaTensor and u.dtype == v.dtype
            assert torch.equal(u.affine, v.affine)
            assert torch.equal(u.as_tensor(), v.as_tensor())


def test_numpy_and_tensor_arguments_like_monai():
    """MONAI's ensure_tuple_rep takes numpy and torch scalars and arrays for the sizes, overlap and
    sigma_scale; so does fastmed, with the same results."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(5)
    x = torch.randn(1, 1, 20, 17)
    ref = msw(x, (8, 8), 2, pred3, 0.5, "gaussian", 0.2)
    for kw in ({"roi_size": np.array([8, 8])}, {"roi_size": torch.tensor([8, 8])}, {"roi_size": np.int64(8)},
               {"roi_size": (np.int64(8), np.int64(8))}, {"sw_batch_size": np.int64(2)},
               {"overlap": np.float32(0.5)}, {"overlap": torch.tensor(0.5)}, {"overlap": np.array([0.5, 0.5])},
               {"sigma_scale": np.float32(0.2)}, {"sigma_scale": torch.tensor([0.2, 0.2])}):
        args = dict(roi_size=(8, 8), sw_batch_size=2, predictor=pred3, overlap=0.5, mode="gaussian", sigma_scale=0.2)
        args.update(kw)
        out = FI.sliding_window_inference(x, **args)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=str(kw))


def test_sigma_scales_that_print_alike_are_different_tilings():
    """The cached weight map belongs to the exact sigma: two tensors that print the same at 4
    decimals once shared a map, and the second result came back 4% off."""
    x = torch.ones(1, 1, 24, 24)
    for sig in (torch.tensor(0.12501), torch.tensor(0.12504), torch.tensor(0.3), torch.tensor(0.30004)):
        a, b = run_both(x, (8, 8), 2, lambda w: w, 0.5, "gaussian", sigma_scale=sig)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, torch.ones_like(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                                 (torch.float64, torch.float32), (torch.float64, torch.float16)])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_narrower_predictions_weighted_in_their_dtype_like_monai(in_dtype, out_dtype, mode):
    """A predictor returning a narrower dtype than the input (float16 under autocast): MONAI weights
    the window in place (`buffer *= w`), rounding the product to the prediction's dtype, and fastmed
    does the same: equal results, not just close ones (and the same in 2D, zoomed outputs, weights)."""
    torch.manual_seed(6)
    x = torch.randn(2, 1, 19, 17, 13, dtype=in_dtype)

    def pred(w):
        return pred3(w).to(out_dtype)

    a, b = run_both(x, (8, 8, 8), 3, pred, 0.5, mode)
    assert a.dtype == b.dtype == in_dtype and torch.equal(a, b)
    a, b = run_both(x[:, :, 0], (8, 8), 2, pred, 0.5, mode)
    assert torch.equal(a, b)

    def zoomed(w):
        return torch.nn.functional.avg_pool3d(pred3(w), 2).to(out_dtype)

    a, b = run_both(x, (8, 8, 8), 3, zoomed, 0.5, mode)
    assert torch.equal(a, b)
    w = torch.rand(8, 8, 8, dtype=in_dtype) + 0.5
    a, b = run_both(x, (8, 8, 8), 3, pred, 0.5, mode, roi_weight_map=w)
    assert torch.equal(a, b)
    # buffered mode: MONAI adds `p * w` (promoted, not rounded to p's dtype) to its buffer
    a, b = run_both(x, (8, 8, 8), 3, pred, 0.5, mode, buffer_steps=2)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # with autograd (the differentiable path): same values and input gradients
    grads = []
    for f in (msw, FI.sliding_window_inference):
        xg = x.clone().requires_grad_(True)
        out = f(xg, (8, 8, 8), 3, pred, 0.5, mode)
        (out * out).sum().backward()
        grads.append((out.detach(), xg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_float64_custom_weights_are_not_rounded_to_float32():
    """A float64 roi_weight_map or process_fn weight that float32 cannot hold: MONAI's float64
    result uses it exactly, and so does fastmed (the kernels' weight map is float32)."""
    torch.manual_seed(7)
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    w = torch.rand(6, 6, dtype=torch.float64) + 0.1

    def make_pred():
        n = [0]

        def pred(win):  # a different value per window: the weighting shows
            n[0] += 1
            return win * 1.0 + n[0]
        return pred

    a = msw(x, (6, 6), 1, make_pred(), 0.5, roi_weight_map=w)
    b = FI.sliding_window_inference(x, (6, 6), 1, make_pred(), 0.5, roi_weight_map=w)
    assert torch.equal(a, b)

    def pfn(seg, win, imap):
        return seg, imap * (1 + 1e-9 * torch.arange(36, dtype=torch.float64).reshape(6, 6))

    a = msw(x, (6, 6), 2, make_pred(), 0.5, "gaussian", process_fn=pfn)
    b = FI.sliding_window_inference(x, (6, 6), 2, make_pred(), 0.5, "gaussian", process_fn=pfn)
    assert torch.equal(a, b)


def test_condition_and_process_fn_weight_errors_name_the_argument():
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match="condition: expected a tensor with the batch size"):
        FI.sliding_window_inference(x, (6, 6), 2, lambda w, condition: w * 1.0, condition=torch.randn(1, 1, 12, 12))
    with pytest.raises(ValueError, match="condition: expected a tensor with the batch size"):
        FI.sliding_window_inference(x, (6, 6), 2, lambda w, condition: w * 1.0, condition=torch.randn(2, 1, 10, 12))
    with pytest.raises(ValueError, match="process_fn: returned a weight of shape"):
        FI.sliding_window_inference(x, (6, 6), 2, lambda w: w * 1.0, process_fn=lambda s, w, m: (s, torch.ones(5, 5)))
    with pytest.raises(TypeError, match="process_fn: must return"):
        FI.sliding_window_inference(x, (6, 6), 2, lambda w: w * 1.0, process_fn=lambda s, w, m: (s, 1.0))


def test_cached_weight_map_with_a_dynamic_roi_warns():
    """cache_roi_weight_map with a None / non-positive roi entry cannot cache (the roi depends on the
    image): a warning, as MONAI intends, not a TypeError."""
    with pytest.warns(UserWarning, match="cache is not created"):
        f = FI.SlidingWindowInferer((None, 8, 8), 2, 0.5, "gaussian", cache_roi_weight_map=True)
    x = torch.randn(1, 1, 10, 16, 16)
    torch.testing.assert_close(f(x, pred3), msw(x, (None, 8, 8), 2, pred3, 0.5, "gaussian"), rtol=1e-6, atol=1e-6)


def test_progress_bar_runs():
    pytest.importorskip("tqdm")
    x = torch.randn(1, 1, 16, 16, 16)
    a, b = run_both(x, (8, 8, 8), 2, pred3, 0.5, "gaussian", progress=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"overlap": 1.0}, ValueError, "overlap"),
        ({"overlap": -0.1}, ValueError, "overlap"),
        ({"mode": "bilinear"}, ValueError, "mode"),
        ({"padding_mode": "zeros"}, ValueError, "padding_mode"),
        ({"roi_size": (8, 8)}, ValueError, "roi_size"),
        ({"sw_batch_size": 0}, ValueError, "sw_batch_size"),
        ({"roi_size": (8.5, 8, 8)}, ValueError, "roi_size"),
        ({"roi_size": (True, 8, 8)}, ValueError, "roi_size"),
    ],
)
def test_bad_arguments(kw, exc, match):
    args = {"roi_size": (8, 8, 8), "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian", "padding_mode": "constant"}
    args.update(kw)
    x = torch.randn(1, 1, 12, 12, 12)
    with pytest.raises(exc, match=match):
        FI.sliding_window_inference(x, args["roi_size"], args["sw_batch_size"], pred3, args["overlap"], args["mode"],
                                    padding_mode=args["padding_mode"])


def test_bad_predictors():
    x = torch.randn(1, 1, 12, 12, 12)
    with pytest.raises(ValueError, match="predictor"):
        FI.sliding_window_inference(x, (8, 8, 8), 3, lambda w: w[:1], 0.25)
    with pytest.raises(TypeError, match="predictor"):
        FI.sliding_window_inference(x, (8, 8, 8), 2, lambda w: (w, [1, 2]), 0.25)
    with pytest.raises(ValueError, match="predictor"):
        FI.sliding_window_inference(x, (8, 8, 8), 2, lambda w: w[:, :, 0], 0.25)
    with pytest.raises(TypeError, match="inputs"):
        FI.sliding_window_inference(x.numpy(), (8, 8, 8), 2, pred3, 0.25)
    with pytest.raises(TypeError, match="inputs"):
        FI.sliding_window_inference(x.long(), (8, 8, 8), 2, pred3, 0.25)
    with pytest.raises(ValueError, match="inputs"):
        FI.sliding_window_inference(x[:0], (8, 8, 8), 2, pred3, 0.25)


def test_bad_buffered_and_weight_map_arguments_raise_before_any_kernel():
    """Found by review: these used to write or read out of bounds (a crash, or NaN garbage)."""
    x = torch.randn(1, 1, 20, 17, 13)
    up = lambda w: torch.nn.functional.interpolate(w, scale_factor=2)  # noqa: E731
    with pytest.raises(ValueError, match="predictor"):  # MONAI raises too (size mismatch)
        FI.sliding_window_inference(x, (8, 8, 8), 3, up, buffer_steps=2)
    for bad in (torch.rand(4, 4, 4), torch.rand(512), torch.rand(2, 1, 8, 8, 8)):
        with pytest.raises(ValueError, match="roi_weight_map"):
            FI.sliding_window_inference(x, (8, 8, 8), 3, pred3, roi_weight_map=bad)
        with pytest.raises(ValueError, match="roi_weight_map"):
            FI.sliding_window_labels(x, (8, 8, 8), 3, pred3, roi_weight_map=bad)
    with pytest.raises(ValueError, match="buffer_dim"):
        FI.sliding_window_inference(x, (8, 8, 8), 2, pred3, buffer_steps=1, buffer_dim=3)
    # a map that broadcasts to the window is taken, with MONAI's result
    for w in (torch.rand(8, 1, 8) + 0.1, torch.rand(1, 1, 8, 8, 8) + 0.1):
        a, b = run_both(x, (8, 8, 8), 3, pred3, 0.5, "constant", roi_weight_map=w)
        assert torch.equal(a, b)


def test_ops_refuse_windows_outside_their_tensors():
    src = torch.randn(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="starts"):
        SW.sw_gather(src, torch.tensor([[0, 6, 6, 6]]), [8, 8, 8])
    with pytest.raises(ValueError, match="starts"):
        SW.sw_gather(src, torch.tensor([[1, 0, 0, 0]]), [8, 8, 8])
    with pytest.raises(ValueError, match="roi"):
        SW.sw_gather(src, torch.tensor([[0, 0, 0, 0]]), [8, 8])
    acc = torch.zeros(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="starts"):
        SW.sw_accumulate(acc, torch.ones(1, 2, 8, 8, 8), torch.tensor([[0, 1000, 1000, 1000]]), None, None, None,
                         0.0, None)
    with pytest.raises(ValueError, match="starts"):
        SW.sw_accumulate(acc, torch.ones(1, 2, 4, 4, 4), torch.tensor([[0, -1, 0, 0]]), None, None, None, 0.0, None)
    with pytest.raises(ValueError, match="pred"):
        SW.sw_accumulate(acc, torch.ones(1, 3, 4, 4, 4), torch.tensor([[0, 0, 0, 0]]), None, None, None, 0.0, None)
    with pytest.raises(ValueError, match="wmap"):
        SW.sw_accumulate(acc, torch.ones(1, 2, 4, 4, 4), torch.tensor([[0, 0, 0, 0]]), None, None, None, 0.0,
                         torch.ones(2, 2, 2))
    gs = [torch.ones(4), torch.ones(4), torch.ones(3)]
    with pytest.raises(ValueError, match="g0"):
        SW.sw_accumulate(acc, torch.ones(1, 2, 4, 4, 4), torch.tensor([[0, 0, 0, 0]]), *gs, 0.0, None)
    with pytest.raises(ValueError, match="fresh"):
        SW.sw_accumulate(acc, torch.ones(1, 2, 4, 4, 4), torch.tensor([[0, 0, 0, 0]]), None, None, None, 0.0, None,
                         torch.tensor([[0, 9, 0, 4, 0, 4]]))
    with pytest.raises(ValueError, match="count"):
        SW.sw_normalize_(acc, torch.ones(1, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="out"):
        SW.sw_argmax(acc, torch.ones(1, 1, 8, 8, 8), torch.zeros(1, 1, 4, 8, 8, dtype=torch.uint8))


def test_accumulate_op_matches_reference_and_opcheck():
    torch.manual_seed(10)
    acc = torch.randn(2, 3, 10, 12, 9)
    pred = torch.randn(4, 3, 5, 6, 4)
    starts = torch.tensor([[0, 0, 0, 0], [1, 5, 6, 5], [0, 3, 2, 1], [0, 3, 3, 1]])
    gs, wmin = FI.importance_map_factors((5, 6, 4), "gaussian", 0.3)
    w = FI._importance_map(gs, wmin)
    a1, a2 = acc.clone(), acc.clone()
    SW.sw_accumulate(a1, pred, starts, *gs, wmin, None)
    SW.sw_accumulate_reference(a2, pred, starts, w)
    assert torch.equal(a1, a2)
    a3 = acc.clone()
    SW.sw_accumulate(a3, pred, starts, None, None, None, 0.0, w)
    assert torch.equal(a3, a2)
    torch.library.opcheck(torch.ops.fastmed.sliding_window_accumulate.default,
                          (acc.clone(), pred, starts, *gs, wmin, None))
    cnt = torch.rand(10, 12, 9) + 0.5
    torch.library.opcheck(torch.ops.fastmed.sliding_window_normalize.default, (acc, cnt, torch.float32))
    torch.testing.assert_close(SW.sw_normalize(acc, cnt, torch.float64), (acc / cnt).double())


@pytest.mark.parametrize("roi, overlap", [((16, 20, 12), 0.5), ((7, 9, 5), 0.75), ((16, 16, 16), 0.0), ((30, 8, 8), 0.3)])
def test_first_touch_writes_cover_every_voxel(monkeypatch, roi, overlap):
    """The output is not zero-filled: every voxel must be written by its first window. Hand out
    NaN-filled memory to make a missed voxel visible."""
    monkeypatch.setattr(FI, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype))
    torch.manual_seed(11)
    x = torch.randn(2, 1, 37, 45, 29)
    a, b = run_both(x, roi, 3, pred3, overlap, "gaussian")
    assert torch.equal(a, b)
    x2 = torch.randn(1, 2, 40, 33)
    a, b = run_both(x2, roi[1:], 2, pred3, overlap, "constant")
    assert torch.equal(a, b)


def pred4(x):
    return torch.cat([x.sin(), x.cos(), x * 0.3, -x], 1)


@pytest.mark.parametrize(
    "shape, roi, overlap, mode, slab_dim",
    [
        ((2, 1, 37, 45, 29), (16, 16, 16), 0.5, "gaussian", 0),
        ((1, 1, 40, 40, 40), (24, 24, 24), 0.25, "constant", None),
        ((1, 2, 33, 21), (16, 16), 0.75, "gaussian", 1),
        ((1, 1, 10, 40, 12), (16, 16, -1), 0.5, "gaussian", None),
        ((1, 1, 8, 8, 8), (16, 12, 4), 0.0, "gaussian", 2),
        ((1, 1, 30, 26, 50), (12, 12, 12), 0.6, "gaussian", -1),
    ],
)
def test_label_map_mode_equals_argmax_of_full_result(shape, roi, overlap, mode, slab_dim):
    torch.manual_seed(12)
    x = torch.randn(shape)
    full = FI.sliding_window_inference(x, roi, 3, pred4, overlap, mode).argmax(1, keepdim=True)
    lab = FI.sliding_window_labels(x, roi, 3, pred4, overlap, mode, slab_dim=slab_dim)
    assert lab.dtype == torch.uint8 and lab.shape == full.shape
    assert torch.equal(lab.long(), full)


def test_label_map_mode_many_classes_and_fp16_accumulators():
    torch.manual_seed(13)
    x = torch.randn(1, 1, 20, 24, 28)
    proj = torch.randn(300, 1, 1, 1, 1)

    def many(w):
        return (w * proj.view(1, 300, 1, 1, 1)).sin() * 5

    res = FI.sliding_window_inference(x, (8, 8, 8), 4, many, 0.5, "gaussian")
    full = res.argmax(1, keepdim=True)
    lab = FI.sliding_window_labels(x, (8, 8, 8), 4, many, 0.5, "gaussian")
    assert lab.dtype == torch.int16 and torch.equal(lab.long(), full)
    lab16 = FI.sliding_window_labels(x, (8, 8, 8), 4, many, 0.5, "gaussian", accumulate_dtype=torch.float16)
    # fp16 accumulators: labels may differ only where the two best classes are within fp16 rounding
    # of each other (a few half-ulps of values up to 5 summed over <= 8 windows: margin 0.05)
    top2 = res.topk(2, dim=1).values
    clear = (top2[:, :1] - top2[:, 1:2]) > 0.05
    assert clear.float().mean() > 0.3
    assert torch.equal(lab16.long()[clear], full[clear])


def test_label_map_mode_bad_inputs():
    x = torch.randn(1, 1, 12, 12, 12)
    with pytest.raises(ValueError, match="overlap"):
        FI.sliding_window_labels(x, (8, 8, 8), 1, pred4, 1.0)
    with pytest.raises(TypeError, match="predictor"):
        FI.sliding_window_labels(x, (8, 8, 8), 1, lambda w: (w,))
    with pytest.raises(ValueError, match="predictor"):
        FI.sliding_window_labels(x, (8, 8, 8), 2, lambda w: w[:1])
    with pytest.raises(ValueError, match="slab_dim"):
        FI.sliding_window_labels(x, (8, 8, 8), 1, pred4, slab_dim=3)
    many = lambda w: torch.cat([w * 0] * 299 + [w * 0 + 1], 1)  # noqa: E731
    with pytest.raises(ValueError, match="labels_dtype"):  # 299 would wrap around in uint8
        FI.sliding_window_labels(x, (8, 8, 8), 2, many, labels_dtype=torch.uint8)
    assert FI.sliding_window_labels(x, (8, 8, 8), 2, many).unique().tolist() == [299]  # int16 by default
    with pytest.raises(TypeError, match="labels_dtype"):
        FI.sliding_window_labels(x, (8, 8, 8), 2, pred4, labels_dtype=torch.float32)
    with pytest.raises(ValueError, match="inputs"):
        FI.sliding_window_labels(x[:0], (8, 8, 8), 2, pred4)


# ------------------------------------------------------------------------------------------------
# autograd: MONAI's result is differentiable when grad is recorded; fastmed's too


class _TwoRes(torch.nn.Module):
    """A learnable predictor with a full- and a half-resolution output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.nn.functional.avg_pool3d(y, 2)


def _cloned(net):
    """net with fresh output tensors: MONAI multiplies the predictor's outputs by the weight in place,
    which autograd refuses where the network's last op saved its output (Tanh, a pooling of it)."""

    def run(w):
        out = net(w)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    return run


def _loss_and_grads(fn, net, x, *args, **kw):
    net.zero_grad()
    x.grad = None
    out = fn(x, *args, **kw)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum(((o - 0.3) ** 2 * (k + 1)).sum() for k, o in enumerate(outs))
    loss.backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("kw", [{"mode": "gaussian"}, {"mode": "constant"}, {"mode": "gaussian", "buffer_steps": 2},
                                {"mode": "gaussian", "sw_batch_size": 1}])
def test_differentiable_like_monai(kw):
    """With grad enabled and a learnable predictor, MONAI's result carries a graph: fastmed's too, with
    the same values and the same gradients for the predictor's parameters and the input (and no
    in-place product on the predictor's outputs, so a Tanh last needs no clone, as MONAI does)."""
    torch.manual_seed(21)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh())
    x = torch.randn(2, 1, 20, 18, 17, requires_grad=True)
    kw = dict(kw)
    bs = kw.pop("sw_batch_size", 2)
    a_out, a_grads = _loss_and_grads(msw, net, x, (12, 12, 12), bs, _cloned(net), 0.5, **kw)
    b_out, b_grads = _loss_and_grads(FI.sliding_window_inference, net, x, (12, 12, 12), bs, net, 0.5, **kw)
    exact = "buffer_steps" not in kw  # MONAI's buffered mode sums a buffer first: other rounding
    for u, v in zip(a_out + a_grads, b_out + b_grads):
        assert u.abs().max() > 0
        if exact:
            assert torch.equal(u, v)
        else:
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5)


def test_differentiable_multi_resolution_padding_and_weights():
    torch.manual_seed(22)
    net = _TwoRes()
    x = torch.randn(1, 1, 10, 22, 20, requires_grad=True)  # smaller than the roi along one axis: padded
    a_out, a_grads = _loss_and_grads(msw, net, x, (12, 12, 12), 3, _cloned(net), 0.5, "gaussian")
    b_out, b_grads = _loss_and_grads(FI.sliding_window_inference, net, x, (12, 12, 12), 3, net, 0.5, "gaussian")
    for u, v in zip(a_out + a_grads, b_out + b_grads):
        assert torch.equal(u, v)
    # a learnable blending weight from process_fn gets its gradient too (through the weight sum)
    scale = torch.tensor(1.5, requires_grad=True)

    def process(seg, win, imap):
        return seg, imap * scale + 0.25

    got = []
    for fn, pred in ((msw, _cloned(net)), (FI.sliding_window_inference, net)):
        scale.grad = None
        out = fn(x.detach(), (12, 12, 12), 3, pred, 0.5, "gaussian", process_fn=process)
        (out[0] ** 2).sum().backward()
        got.append((out[0].detach(), scale.grad.clone()))
    assert got[0][1] != 0
    assert torch.equal(got[0][0], got[1][0])
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-5, atol=0)  # a sum of many terms, in another order


def test_graph_only_when_recording():
    """Under no_grad / inference_mode the kernels run (no graph); the values are the same."""
    torch.manual_seed(23)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        a = FI.sliding_window_inference(x, (12, 12, 12), 2, net, 0.5, "gaussian")
    with torch.inference_mode():
        b = FI.sliding_window_inference(x, (12, 12, 12), 2, net, 0.5, "gaussian")
    c = FI.sliding_window_inference(x, (12, 12, 12), 2, net, 0.5, "gaussian")
    assert not a.requires_grad and not b.requires_grad and c.requires_grad
    assert torch.equal(a, b) and torch.equal(a, c.detach())
    # SlidingWindowInferer(softmax=True) on the graph path: softmax of the differentiable result
    p = FI.SlidingWindowInferer((12, 12, 12), 2, 0.5, "gaussian", softmax=True)(x, net)
    assert p.requires_grad
    torch.testing.assert_close(p.detach(), torch.softmax(a, 1), rtol=1e-6, atol=1e-7)
    # label maps and nnU-Net mode predict under no_grad, as nnU-Net does: same result, no graph
    lab = FI.sliding_window_labels(x, (12, 12, 12), 2, net, 0.5, "gaussian", slab_dim=0)
    assert not lab.requires_grad and torch.equal(lab[:, 0].long(), a.argmax(1))
    n1 = FI.nnunet_sliding_window_inference(x, net, (12, 12, 12), mirror_axes=(0,))
    with torch.no_grad():
        n2 = FI.nnunet_sliding_window_inference(x, net, (12, 12, 12), mirror_axes=(0,))
    assert not n1.requires_grad and torch.equal(n1, n2)


# ------------------------------------------------------------------------------------------------
# nnU-Net mode: against a transcription of nnU-Net v2's predict_sliding_window_return_logits


def _scipy_nnunet_gaussian(patch):
    """nnU-Net v2's compute_gaussian (sigma 1/8, scaled to 10, float16, no zeros), with scipy."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = torch.from_numpy(gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0))
    g /= g.max() / 10
    g = g.half()
    g[g == 0] = g[g != 0].min()
    return g


def _nnunet_reference(data, network, patch, step, use_gaussian, mirror_axes):
    """nnU-Net v2's algorithm, written out with PyTorch in float32 (data: C, *spatial)."""
    import itertools as it


    diff = [max(p - s, 0) for p, s in zip(patch, data.shape[1:])]
    padded = torch.nn.functional.pad(data, [v for d in reversed(diff) for v in (d // 2, d - d // 2)])
    size = padded.shape[1:]
    steps = []
    for i, t in zip(size, patch):
        n = int(np.ceil((i - t) / (t * step))) + 1
        a = (i - t) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(a * k)) for k in range(n)])
    if use_gaussian:
        g = _scipy_nnunet_gaussian(patch).float()
    else:
        g = torch.ones(patch)
    logits, n_pred = None, torch.zeros(size)
    for st in it.product(*steps):
        sl = tuple(slice(s, s + p) for s, p in zip(st, patch))
        x = padded[(slice(None),) + sl][None]
        pred = network(x)
        if mirror_axes:
            axes = [a + 2 for a in mirror_axes]
            combos = [c for i in range(len(axes)) for c in it.combinations(axes, i + 1)]
            for c in combos:
                pred = pred + torch.flip(network(torch.flip(x, c)), c)
            pred = pred / (len(combos) + 1)
        pred = pred[0] * g
        if logits is None:
            logits = torch.zeros((pred.shape[0],) + tuple(size))
        logits[(slice(None),) + sl] += pred
        n_pred[sl] += g
    logits /= n_pred
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(diff, data.shape[1:]))
    return logits[(slice(None),) + crop]


np = pytest.importorskip("numpy")
pytest.importorskip("scipy")


def asym_net(x):  # not flip-invariant, so a wrong flip would show
    ramp = torch.arange(x.shape[-1], dtype=x.dtype)
    return torch.cat([x * 2 + ramp, x.sin() - ramp * 0.1, (x * ramp).cos()], 1)


@pytest.mark.parametrize(
    "shape, patch, step, gauss, axes",
    [
        ((1, 1, 37, 45, 29), (16, 20, 12), 0.5, True, None),
        ((2, 2, 30, 26, 22), (12, 12, 12), 0.5, True, (0, 1, 2)),
        ((1, 1, 20, 33, 17), (16, 16, 16), 0.75, False, (2,)),
        ((1, 1, 10, 40, 12), (16, 16, 16), 0.5, True, (1, 2)),
        ((1, 1, 40, 33), (16, 16), 0.5, True, (0, 1)),
    ],
)
def test_nnunet_mode_matches_nnunet_algorithm(shape, patch, step, gauss, axes):
    torch.manual_seed(14)
    x = torch.randn(shape)
    got = FI.nnunet_sliding_window_inference(x, asym_net, patch, step, gauss, axes, sw_batch_size=3)
    for b in range(shape[0]):
        ref = _nnunet_reference(x[b], asym_net, patch, step, gauss, axes)
        torch.testing.assert_close(got[b], ref, rtol=2e-5, atol=2e-5)


def test_nnunet_tta_equals_explicit_flips():
    torch.manual_seed(15)
    x = torch.randn(1, 1, 30, 28, 26)
    import itertools as it

    def explicit(w):
        combos = [()] + [c for i in range(3) for c in it.combinations((2, 3, 4), i + 1)]
        return sum(torch.flip(asym_net(torch.flip(w, c)), c) if c else asym_net(w) for c in combos) / len(combos)

    a = FI.nnunet_sliding_window_inference(x, asym_net, (16, 16, 16), 0.5, True, (0, 1, 2), sw_batch_size=2)
    b = FI.nnunet_sliding_window_inference(x, explicit, (16, 16, 16), 0.5, True, None, sw_batch_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nnunet_gaussian_and_steps_match_nnunet():
    for t in [(20, 24, 16), (96, 96, 96), (128, 128), (7, 9, 11)]:
        assert torch.equal(FI.nnunet_gaussian(t), _scipy_nnunet_gaussian(t))
    assert FI.nnunet_steps((192, 192, 160), (96, 96, 96), 0.5) == [[0, 48, 96], [0, 48, 96], [0, 32, 64]]
    assert FI.nnunet_steps((96, 100), (96, 96), 0.5) == [[0], [0, 4]]


def test_nnunet_mode_bad_inputs():
    x = torch.randn(1, 1, 12, 12, 12)
    with pytest.raises(ValueError, match="tile_step_size"):
        FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), 0.0)
    with pytest.raises(ValueError, match="mirror_axes"):
        FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), 0.5, True, (3,))
    with pytest.raises(ValueError, match="patch_size"):
        FI.nnunet_sliding_window_inference(x, asym_net, (8, 8), 0.5)
    with pytest.raises(ValueError, match="network"):
        FI.nnunet_sliding_window_inference(x, lambda w: w[:, :, :4], (8, 8, 8), 0.5)
    with pytest.raises(ValueError, match="tile_step_size"):  # 1.5e9 tiles a dim: used to hang
        FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), 1e-9)
    with pytest.raises(ValueError, match="patch_size"):
        FI.nnunet_sliding_window_inference(x, asym_net, (8.7, 8, 8), 0.5)
    with pytest.raises(ValueError, match="inputs"):
        FI.nnunet_sliding_window_inference(x[:0], asym_net, (8, 8, 8), 0.5)


def test_adapt_inferer_on_cpu_is_the_plain_inferer():
    x = torch.randn(1, 1, 20, 22, 24)
    a = FI.SlidingWindowInfererAdapt((8, 8, 8), 3, 0.5, "gaussian")(x, pred3)
    b = FI.sliding_window_inference(x, (8, 8, 8), 3, pred3, 0.5, "gaussian")
    assert torch.equal(a, b)
    m = monai.inferers.SlidingWindowInfererAdapt((8, 8, 8), 3, 0.5, "gaussian")(x, pred3)
    assert torch.equal(a, m)


def test_oom_is_recognised():
    assert FI._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not FI._is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("acc_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                 (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_normalize_fused_softmax(acc_dtype, out_dtype):
    from fastmed.ops.sliding_window import sw_normalize, sw_normalize_, sw_normalize_reference

    acc = (torch.randn(2, 5, 7, 9, 6) * 4).to(acc_dtype)
    count = (torch.rand(7, 9, 6) + 0.5).to(acc_dtype)
    ref = sw_normalize_reference(acc, count, softmax=True)
    got = sw_normalize(acc, count, out_dtype, True)
    tol = 1e-3 if torch.float16 in (acc_dtype, out_dtype) or torch.bfloat16 in (acc_dtype, out_dtype) else 1e-6
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * (10 if out_dtype == torch.bfloat16 else 1))
    inplace = acc.clone()
    sw_normalize_(inplace, count, True)
    torch.testing.assert_close(inplace.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(inplace.double().sum(1), torch.ones(2, 7, 9, 6, dtype=torch.float64), rtol=0, atol=tol)


def test_inferer_softmax_equals_softmax_of_result():
    x = torch.randn(1, 2, 40, 37, 29)
    w = torch.randn(4, 2)

    def net(t):
        return torch.einsum("kc,bc...->bk...", w, t)

    plain = FI.SlidingWindowInferer((16, 16, 16), 3, 0.5, mode="gaussian")(x, net)
    prob = FI.SlidingWindowInferer((16, 16, 16), 3, 0.5, mode="gaussian", softmax=True)(x, net)
    torch.testing.assert_close(prob, torch.softmax(plain, 1), rtol=1e-5, atol=1e-6)
    nn_plain = FI.nnunet_sliding_window_inference(x, net, (16, 16, 16), mirror_axes=(0, 2))
    nn_prob = FI.nnunet_sliding_window_inference(x, net, (16, 16, 16), mirror_axes=(0, 2), softmax=True)
    torch.testing.assert_close(nn_prob, torch.softmax(nn_plain, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.uint8, torch.int16, torch.bool])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_gather_equals_cat_of_slices(dtype, layout):
    vol = (torch.randn(2, 3, 20, 17, 15) * 10).to(dtype)
    if layout == "channels_last":
        vol = vol.to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        vol = (torch.randn(2, 3, 20, 17, 30) * 10).to(dtype)[..., ::2]
    starts = torch.tensor([[0, 0, 0, 0], [1, 4, 9, 7], [0, 12, 1, 8], [1, 0, 0, 0]])
    got = SW.sw_gather(vol, starts, [8, 8, 7])
    want = torch.cat([vol[b:b + 1, :, z:z + 8, y:y + 8, x:x + 7] for b, z, y, x in starts.tolist()])
    assert got.is_contiguous() and torch.equal(got, want)
    st2 = torch.tensor([[1, 3, 2], [0, 0, 9]])
    got2 = SW.sw_gather(vol[:, :, 5], st2, [6, 5])
    assert torch.equal(got2, torch.cat([vol[b:b + 1, :, 5, y:y + 6, x:x + 5] for b, y, x in st2.tolist()]))


def test_gather_opcheck():
    vol = torch.randn(1, 2, 9, 8, 7)
    torch.library.opcheck(SW.sw_gather, (vol, torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]]), [4, 4, 4]))


def _grid_windows(image, roi, overlap):
    interval = FI._scan_interval(image, roi, (overlap,) * len(image))
    starts = FI._window_starts(image, roi, interval)
    grid = [sorted({s[d] for s in starts}) for d in range(len(image))]
    return starts, [v for g in grid for v in g], [len(g) for g in grid]


@pytest.mark.parametrize("acc_dtype, pred_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                                   (torch.float32, torch.float16), (torch.float16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)])
@pytest.mark.parametrize("weight", ["gauss", "map", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_stitch_equals_accumulate_then_normalize(acc_dtype, pred_dtype, weight, layout):
    """sw_stitch (one pass per batch, first touches written, last touches divided) gives exactly the
    numbers of sw_accumulate per window + sw_normalize_, for batches of 1 to 9 windows spanning
    images, in 3D and 2D; NaN-filled accumulators show that every voxel is written."""
    g = torch.Generator().manual_seed(21)
    for image, roi, overlap in [((23, 19, 17), (8, 10, 6), 0.5), ((30, 12), (11, 5), 0.7), ((9, 9, 20), (9, 4, 7), 0.3)]:
        nsp = len(image)
        starts, grid, grid_n = _grid_windows(image, roi, overlap)
        B, C, nwin = 2, 3, len(starts)
        preds = torch.randn((B * nwin, C, *roi), generator=g).to(pred_dtype)
        if layout == "strided":  # predictions read through a transposed view, accumulator channels-last
            preds = preds.transpose(-1, -2).contiguous().transpose(-1, -2)
        gs, wmin = FI.importance_map_factors(roi, "gaussian", 0.2)
        wm = FI._importance_map(gs, wmin)
        wargs = {"gauss": (*FI._pad3(gs), wmin, None), "map": (None, None, None, 0.0, wm),
                 "none": (None, None, None, 0.0, None)}[weight]
        all_st = torch.tensor([[i // nwin] + list(starts[i % nwin]) for i in range(B * nwin)])
        count = torch.zeros((1, 1, *image), dtype=acc_dtype)
        SW.sw_accumulate(count, None, torch.tensor([[0] + list(s) for s in starts]), *(
            wargs if weight != "none" else (None, None, None, 0.0, torch.ones(roi))))
        ref = torch.zeros((B, C, *image), dtype=acc_dtype)
        SW.sw_accumulate(ref, preds, all_st, *wargs)
        SW.sw_normalize_(ref, count)
        for with_count in (True, False):
            acc = torch.full((B, C, *image), float("nan"), dtype=acc_dtype)
            if layout == "strided":
                acc = acc.to(memory_format=torch.channels_last_3d if nsp == 3 else torch.channels_last)
            i = 0
            while i < B * nwin:  # random batch sizes, in order
                n = int(torch.randint(1, 10, (1,), generator=g))
                sl = slice(i, min(i + n, B * nwin))
                widx = torch.arange(sl.start, sl.stop) % nwin
                SW.sw_stitch(acc, preds[sl], all_st[sl], widx, grid, grid_n, *wargs, count if with_count else None)
                i = sl.stop
            if not with_count:
                SW.sw_normalize_(acc, count)
            assert torch.equal(acc, ref), (image, with_count)


def test_stitch_opcheck_and_bad_inputs():
    starts, grid, grid_n = _grid_windows((12, 10, 9), (6, 5, 4), 0.5)
    acc = torch.zeros(1, 2, 12, 10, 9)
    pred = torch.randn(3, 2, 6, 5, 4)
    st = torch.tensor([[0] + list(s) for s in starts[:3]])
    gs, wmin = FI.importance_map_factors((6, 5, 4), "gaussian", 0.125)
    cnt = torch.rand(12, 10, 9) + 0.5
    torch.library.opcheck(torch.ops.fastmed.sliding_window_stitch.default,
                          (acc, pred, st, torch.arange(3), grid, grid_n, *gs, wmin, None, cnt))
    with pytest.raises(ValueError, match="grid_n"):
        SW.sw_stitch(acc, pred, st, torch.arange(3), grid, grid_n[:2], *gs, wmin, None)
    many = torch.zeros(65, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="starts"):
        SW.sw_stitch(acc, torch.zeros(65, 2, 6, 5, 4), many, torch.zeros(65), grid, grid_n, *gs, wmin, None)


def test_stitch_rejects_windows_off_the_grid():
    starts, grid, grid_n = _grid_windows((12, 10, 9), (6, 5, 4), 0.5)
    acc = torch.zeros(1, 1, 12, 10, 9)
    pred = torch.randn(2, 1, 6, 5, 4)
    st = torch.tensor([[0] + list(starts[0]), [0] + list(starts[2])])
    with pytest.raises(ValueError, match="consecutive"):  # places 0 and 2 of one image
        SW.sw_stitch(acc, pred, st, torch.tensor([0, 2]), grid, grid_n, None, None, None, 0.0, None)
    with pytest.raises(ValueError, match="not the grid window"):  # starts that do not match the places
        SW.sw_stitch(acc, pred, st, torch.tensor([0, 1]), grid, grid_n, None, None, None, 0.0, None)


# ---- awkward inputs every mode handles the same way (a sweep of bad inputs, 2026-11-24) ----------


@pytest.mark.parametrize("which", ["monai", "labels", "nnunet"])
def test_device_arguments_are_refused_naming_them(which):
    x = torch.randn(1, 1, 12, 12, 12)
    bad_cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    for name in ("device", "sw_device"):
        for value, match in (("bogus", "not a device"), (bad_cuda, "CUDA")):
            with pytest.raises(ValueError, match=f"{name}: .*{match}"):
                if which == "monai":
                    FI.sliding_window_inference(x, (8, 8, 8), 2, pred3, **{name: value})
                elif which == "labels":
                    FI.sliding_window_labels(x, (8, 8, 8), 2, pred4, **{name: value})
                else:
                    FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), **{name: value})


def test_sigma_scale_that_gives_no_finite_gaussian_is_refused():
    """MONAI returns NaN here (a NaN sigma; sigma 0 puts 0/0 at an odd window's centre voxel)."""
    x = torch.randn(1, 1, 20, 20, 20)
    for sigma, roi in ((float("nan"), (8, 8, 8)), (0.0, (7, 8, 8)), ((0.125, float("nan"), 0.125), (8, 8, 8))):
        assert not torch.isfinite(msw(x, roi, 1, pred3, 0.5, "gaussian", sigma_scale=sigma)).all()
        with pytest.raises(ValueError, match="sigma_scale"):
            FI.sliding_window_inference(x, roi, 1, pred3, 0.5, "gaussian", sigma_scale=sigma)
        with pytest.raises(ValueError, match="sigma_scale"):
            FI.sliding_window_labels(x, roi, 1, pred4, 0.5, "gaussian", sigma_scale=sigma)
    # sigma 0 on even windows is finite in MONAI (every voxel off-centre): the same result here
    a, b = run_both(x, (8, 8, 8), 1, pred3, 0.5, "gaussian", sigma_scale=0.0)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_zero_channel_predictions():
    """MONAI returns an empty (B, 0, ...) output; the kernels used to fail with 'invalid argument'."""
    x = torch.randn(2, 1, 12, 12, 12)
    none = lambda w: w[:, :0]  # noqa: E731
    for mode in ("constant", "gaussian"):
        a, b = run_both(x, (8, 8, 8), 3, none, 0.5, mode)
        assert a.shape == b.shape == (2, 0, 12, 12, 12) and a.dtype == b.dtype
    assert FI.nnunet_sliding_window_inference(x, none, (8, 8, 8)).shape == (2, 0, 12, 12, 12)
    with pytest.raises(ValueError, match="predictor: .*no channels"):  # argmax over no classes
        FI.sliding_window_labels(x, (8, 8, 8), 2, none)


def test_integer_and_complex_predictions():
    """Integer / boolean outputs are summed as numbers in the accumulator's dtype in every mode (MONAI
    fails on them: it weights them in place); complex ones are refused, naming the predictor."""
    x = torch.randn(1, 1, 13, 12, 11)
    ints = lambda w: (torch.cat([w, 2 * w, -w], 1) * 3).round().to(torch.int16)  # noqa: E731
    flts = lambda w: ints(w).float()  # noqa: E731
    for mode in ("constant", "gaussian"):
        a = FI.sliding_window_inference(x, (8, 8, 8), 2, ints, 0.5, mode)
        assert a.dtype == torch.float32 and torch.equal(a, FI.sliding_window_inference(x, (8, 8, 8), 2, flts, 0.5, mode))
        lab = FI.sliding_window_labels(x, (8, 8, 8), 2, ints, 0.5, mode, slab_dim=0)
        assert torch.equal(lab.long(), a.argmax(1, keepdim=True))
    boo = lambda w: torch.cat([w > 0, w < 0], 1)  # noqa: E731
    torch.testing.assert_close(FI.nnunet_sliding_window_inference(x, boo, (8, 8, 8), mirror_axes=(0,)),
                               FI.nnunet_sliding_window_inference(x, lambda w: boo(w).float(), (8, 8, 8),
                                                                  mirror_axes=(0,)), rtol=0, atol=0)
    cplx = lambda w: torch.complex(w, w)  # noqa: E731
    with pytest.raises(TypeError, match="predictor: outputs must be real"):
        FI.sliding_window_inference(x, (8, 8, 8), 2, cplx)
    with pytest.raises(TypeError, match="predictor: outputs must be real"):
        FI.sliding_window_labels(x, (8, 8, 8), 2, cplx)
    with pytest.raises(TypeError, match="network: outputs must be real"):
        FI.nnunet_sliding_window_inference(x, cplx, (8, 8, 8))


def test_nnunet_network_changing_its_channels_is_refused():
    x = torch.randn(1, 1, 12, 12, 12)
    calls = []

    def net(w):
        calls.append(1)
        return w.repeat(1, len(calls), 1, 1, 1)

    with pytest.raises(ValueError, match="network: returned 2 channels, earlier 1"):
        FI.nnunet_sliding_window_inference(x, net, (8, 8, 8))


def test_weights_that_sum_to_zero_or_nan_are_refused():
    """A roi_weight_map (or process_fn weight) with zeros where a voxel has no other window, or NaN /
    inf: MONAI divides by that sum and returns NaN / inf there, unreported; here a ValueError."""
    x = torch.randn(1, 1, 16, 16, 16)
    zero_rim = torch.ones(8, 8, 8)
    zero_rim[0] = 0  # voxel plane 0 of the image has only the first window
    bad_maps = {"zeros": torch.zeros(8, 8, 8), "zero rim": zero_rim, "nan": torch.full((8, 8, 8), float("nan")),
                "inf": torch.full((8, 8, 8), float("inf"))}
    for name, w in bad_maps.items():
        assert not torch.isfinite(msw(x, (8, 8, 8), 2, pred3, 0.5, roi_weight_map=w)).all(), name
        with pytest.raises(ValueError, match="roi_weight_map: the windows' weights sum to"):
            FI.sliding_window_inference(x, (8, 8, 8), 2, pred3, 0.5, roi_weight_map=w)
        with pytest.raises(ValueError, match="roi_weight_map: the windows' weights sum to"):
            FI.sliding_window_labels(x, (8, 8, 8), 2, pred4, 0.5, roi_weight_map=w)
        with pytest.raises(ValueError, match="roi_weight_map: the windows' weights sum to"):  # autograd path
            FI.sliding_window_inference(x.clone().requires_grad_(), (8, 8, 8), 2, pred3, 0.5, roi_weight_map=w)
    with pytest.raises(ValueError, match="process_fn: the windows' weights sum to"):
        FI.sliding_window_inference(x, (8, 8, 8), 2, pred3, 0.5, process_fn=lambda s, w, m: (s, m * 0))
    # zeros where other windows cover the voxel, and negative weights, are fine: MONAI's result exactly
    w = torch.ones(8, 8, 8)
    w[:, :, 2:6] = 0  # along x the windows start at 0, 2, 4 (overlap 0.75): x 2..9 have a window non-zero there
    a, b = run_both(torch.randn(1, 1, 8, 8, 12), (8, 8, 8), 2, pred3, (0.5, 0.5, 0.75), roi_weight_map=w)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    neg = -torch.rand(8, 8, 8) - 0.5
    a, b = run_both(x, (8, 8, 8), 2, pred3, 0.5, roi_weight_map=neg)
    assert torch.isfinite(a).all() and torch.equal(a, b)


# ---- a differential fuzz against MONAI 1.6.1 (850 cases, 2026-11-24): what it found ---------------


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: drives SlidingWindowInfererAdapt's GPU branches here."""

    @property
    def is_cuda(self):
        return True


def _adapt_calls(cls, parent, monkeypatch, x, ooms, **kw):
    """The (device, buffer_steps, buffer_dim) of each call SlidingWindowInfererAdapt makes to its
    parent's __call__, the first ``ooms`` of them failing with CUDA out-of-memory."""
    calls = []

    def fake(self, inputs, network, *args, **kwargs):
        calls.append((str(kwargs.get("device")), kwargs.get("buffer_steps"), kwargs.get("buffer_dim")))
        if len(calls) <= ooms:
            oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5
            raise oom("CUDA out of memory (simulated)")
        return "done"

    monkeypatch.setattr(parent, "__call__", fake)
    inf = cls((8, 8, 8), 2, 0.5, **kw)
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("ignore")
        try:
            res = inf(x, pred3)
        except RuntimeError as e:
            res = type(e).__name__
    return calls, res, inf.cpu_thresh, inf.buffer_steps


@pytest.mark.parametrize("buffer_steps", [None, 0, 1, 4])
@pytest.mark.parametrize("ooms", [0, 1, 2, 4, 12])
@pytest.mark.parametrize("shape", [(1, 1, 40, 16, 16), (1, 1, 16, 16, 16)])
def test_adapt_makes_monai_calls_on_gpu_inputs_and_out_of_memory(monkeypatch, buffer_steps, ooms, shape):
    """MONAI's state machine (GPU stitching, then buffered CPU stitching halving the buffer, then
    plain CPU stitching; buffer_dim the long axis), call for call."""
    x = torch.zeros(shape).as_subclass(_FakeCuda)
    got = _adapt_calls(FI.SlidingWindowInfererAdapt, FI.SlidingWindowInferer, monkeypatch, x, ooms,
                       buffer_steps=buffer_steps)
    want = _adapt_calls(monai.inferers.SlidingWindowInfererAdapt, monai.inferers.SlidingWindowInferer, monkeypatch,
                        x, ooms, buffer_steps=buffer_steps)
    assert got == want


def test_adapt_on_cpu_ignores_buffer_steps_as_monai():
    """Found by the fuzz: fastmed's Adapt buffered a CPU input (other batches; a tuple cut to its
    first output); MONAI runs it unbuffered."""
    x = torch.randn(1, 1, 16, 16)
    calls = {"monai": [], "fastmed": []}

    def make(key):
        def p(w):
            calls[key].append(w.shape[0])
            return w * 2, w + 1

        return p

    a = monai.inferers.SlidingWindowInfererAdapt((8, 8), 4, overlap=0.5, buffer_steps=1)(x, make("monai"))
    b = FI.SlidingWindowInfererAdapt((8, 8), 4, overlap=0.5, buffer_steps=1)(x, make("fastmed"))
    assert calls["monai"] == calls["fastmed"] == [4, 4, 1]
    assert_same(a, b)


def test_weights_zero_only_in_cropped_padding_are_fine():
    """The weight-sum check looked at the padding too (an image smaller than the roi)."""
    w = torch.zeros(8, 8)
    w[1:-1, 1:-1] = 1
    x = torch.randn(1, 1, 6, 6)
    a, b = run_both(x, (8, 8), 1, lambda t: t * 2, roi_weight_map=w)
    assert torch.isfinite(b).all() and torch.equal(a, b)
    lab = FI.sliding_window_labels(x, (8, 8), 1, lambda t: torch.cat([t, -t], 1), roi_weight_map=w)
    assert torch.equal(lab.long(), (x < 0).long())  # class 1 (-x) wins where x < 0
    w3 = torch.zeros(8, 8, 8)
    w3[1:-1, 1:-1, :] = 1  # zero rims on the two padded axes only
    x3 = torch.randn(1, 1, 6, 6, 20)
    full = FI.sliding_window_inference(x3, (8, 8, 8), 2, pred4, 0.5, roi_weight_map=w3)
    lab3 = FI.sliding_window_labels(x3, (8, 8, 8), 2, pred4, 0.5, roi_weight_map=w3, slab_dim=0)
    assert torch.equal(lab3.long(), full.argmax(1, keepdim=True))


def test_process_fn_weights_that_broadcast():
    """A scalar or a (1, W) process_fn weight: MONAI broadcasts it; fastmed raised IndexError / a
    false zero-sum error."""
    x = torch.randn(1, 1, 16, 16)
    for pf in (lambda s, w, m: (s, torch.tensor(2.0)), lambda s, w, m: (s, m[:1]), lambda s, w, m: (s, m[:, :1])):
        a, b = run_both(x, (4, 4), 2, lambda t: t * 2, 0.5, "gaussian", process_fn=pf)
        assert torch.equal(a, b)


def test_outputs_at_other_resolutions_in_any_order():
    """A lower- or higher-resolution output before the full-resolution one: MONAI fails (its weight
    map stays resized for the next output, which it cannot weight); each output here equals the one
    computed alone. Where MONAI's resized map does broadcast, or resizes again for the next output,
    its result is kept exactly."""
    F = torch.nn.functional
    x = torch.randn(1, 1, 16, 16)
    for pr in (lambda w: (F.avg_pool2d(w, 2), w * 3), lambda w: (F.interpolate(w, scale_factor=2), w * 3),
               lambda w: {"a": F.avg_pool2d(w, 2), "b": w * 3}):
        with pytest.raises(RuntimeError):
            msw(x, (4, 4), 2, pr, 0.5, "gaussian")
        got = FI.sliding_window_inference(x, (4, 4), 2, pr, 0.5, "gaussian")
        parts = list(got.values()) if isinstance(got, dict) else list(got)
        for i, part in enumerate(parts):
            alone = FI.sliding_window_inference(
                x, (4, 4), 2, lambda w, i=i: list(pr(w).values() if isinstance(pr(w), dict) else pr(w))[i], 0.5,
                "gaussian")
            assert torch.equal(part, alone)
    def ctx(w):  # a value that depends on the window, so the weighting shows
        return w * 3 + w.mean((2, 3), keepdim=True)

    for pr in (lambda w: (F.avg_pool2d(w, 4), ctx(w)),  # a 1 x 1 map: MONAI weights the next output by it
               lambda w: (F.avg_pool2d(w, 2), F.interpolate(ctx(w), scale_factor=2), w[:, :, :1, :1]),
               lambda w: {"b": F.avg_pool2d(ctx(w), 2), "z": F.interpolate(ctx(w), scale_factor=2) * 2}):
        for mode in ("constant", "gaussian"):
            a, b = run_both(x, (4, 4), 2, pr, 0.5, mode)
            assert_same(a, b)


def test_predictions_of_another_half_dtype_round_as_monai():
    """bfloat16 predictions on a float16 input: MONAI rounds each weighted window to bfloat16; that
    rounding was skipped (same itemsize), 4e-3 off."""
    x = torch.randn(1, 1, 20, 20).half()
    for mode in ("constant", "gaussian"):
        a, b = run_both(x, (8, 8), 2, lambda t: (t * 1.3).bfloat16(), 0.5, mode)
        assert b.dtype == torch.float16 and torch.equal(a, b)
    # float16 predictions on a bfloat16 input: MONAI adds the window in float32 and rounds once; the
    # kernels round it to bfloat16 first and once more after the add (a bfloat16 ulp or two)
    a, b = run_both(x.bfloat16(), (8, 8), 2, lambda t: (t * 1.3).half(), 0.5, "gaussian")
    torch.testing.assert_close(b.float(), a.float(), rtol=2**-6, atol=2**-6)


def test_nnunet_and_label_map_argument_types():
    x = torch.randn(1, 1, 12, 12, 12)
    ref = FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), mirror_axes=(0,))
    assert torch.equal(FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), mirror_axes=0), ref)  # was: no TTA
    ref01 = FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), mirror_axes=(0, 1))
    for axes in (np.array([0, 1]), torch.tensor([1, 0]), [np.int64(0), 1]):
        assert torch.equal(FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), mirror_axes=axes), ref01)
    assert torch.equal(FI.nnunet_sliding_window_inference(x, asym_net, 8), FI.nnunet_sliding_window_inference(
        x, asym_net, (8, 8, 8)))
    for axes in ((0.0,), "x", (True,)):
        with pytest.raises(TypeError, match="mirror_axes"):
            FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), mirror_axes=axes)
    for step in ("0.5", None, True):
        with pytest.raises(TypeError, match="tile_step_size"):
            FI.nnunet_sliding_window_inference(x, asym_net, (8, 8, 8), step)
    for sd in (1.0, "0", True):
        with pytest.raises(TypeError, match="slab_dim"):
            FI.sliding_window_labels(x, (8, 8, 8), 1, pred4, slab_dim=sd)
    assert torch.equal(FI.sliding_window_labels(x, (8, 8, 8), 1, pred4, slab_dim=np.int64(1)),
                       FI.sliding_window_labels(x, (8, 8, 8), 1, pred4, slab_dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nnunet_narrow_accumulator_with_mirroring(dtype):
    """float16 output with mirroring: each mirrored prediction weighted by 1/8 of the Gaussian
    underflowed at the tile's corners (a constant 1 came out as 0 at 290 of 512 voxels). The mirrored
    predictions are averaged in float32 first, as nnU-Net averages them; the result is then within
    the output dtype's rounding of nnU-Net's own algorithm accumulated in that dtype."""
    o = FI.nnunet_sliding_window_inference(torch.randn(1, 1, 8, 8, 8), lambda w: w * 0 + 1, (8, 8, 8),
                                           mirror_axes=(0, 1, 2), accumulate_dtype=dtype)
    assert o.dtype == dtype and torch.equal(o, torch.ones_like(o))
    torch.manual_seed(14)
    x = torch.randn(1, 1, 30, 26, 22)
    got = FI.nnunet_sliding_window_inference(x, asym_net, (12, 12, 12), 0.5, True, (0, 1, 2), accumulate_dtype=dtype)
    exact = _nnunet_reference(x[0].double(), asym_net, (12, 12, 12), 0.5, True, (0, 1, 2))
    # nnU-Net's own float16 accumulation is up to 0.5 off exact where the weight sum is tiny (tile
    # corners): the bound is on the bulk, and on the float32 average's weighted sum
    err = (got[0].double() - exact).abs()
    eps = torch.finfo(dtype).eps
    assert err.max() < 0.6 and err.mean() < 4 * eps * exact.abs().mean()
