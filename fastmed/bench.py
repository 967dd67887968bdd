"""The benchmark suite behind ``fastmed bench``: fastmed against MONAI, side by side in one run.

Each case reports forward, backward and forward+backward times (median of repeats), the ratio to
MONAI measured in the same run, the achieved bandwidth on the minimal memory traffic against the
machine's copy bandwidth measured at the start of the run, and the peak extra memory (each
implementation measured in a fresh process on the CPU; ``max_memory_allocated`` on a GPU).
"""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


# ------------------------------------------------------------------------------------------------
# machine facts


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """GB/s of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def _time(fn: Callable[[], None], device: str, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    op: str
    name: str
    make_inputs: Callable[[str], tuple]        # device -> tensors
    impls: dict                                # impl name -> loss factory
    min_bytes: Callable[[tuple], int]          # minimal forward+backward memory traffic
    baseline: str = "monai"


@dataclass
class Result:
    op: str
    case: str
    impl: str
    fwd_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    ratio_vs_baseline: Optional[float] = None
    gbps: Optional[float] = None
    pct_copy_bw: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    extra: dict = field(default_factory=dict)


def _dice_ce_inputs(shape):
    def make(device):
        g = torch.Generator().manual_seed(0)
        B, C = shape[0], shape[1]
        x = (torch.randn(shape, generator=g) * 2).to(device)
        y = torch.randint(0, C, (B, 1) + tuple(shape[2:]), generator=g).to(device)
        return x, y
    return make


def _dice_ce_impls():
    def fm():
        import fastmed.losses
        return fastmed.losses.DiceCELoss(to_onehot_y=True, softmax=True)

    def mo():
        import monai.losses
        return monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)

    return {"fastmed": fm, "monai": mo}


def _dice_ce_bytes(inputs):
    x, y = inputs
    # forward reads logits + labels; backward reads them again and writes the gradient
    return 3 * x.numel() * x.element_size() + 2 * y.numel() * y.element_size()


def cases(quick: bool) -> list:
    shape = (2, 14, 96, 96, 96)
    out = [Case("dice_ce", "DiceCELoss 2x14x96^3 fp32, int64 labels", _dice_ce_inputs(shape), _dice_ce_impls(),
                _dice_ce_bytes)]
    if not quick:
        out.append(Case("dice_ce", "DiceCELoss 1x117x64^3 fp32, int64 labels", _dice_ce_inputs((1, 117, 64, 64, 64)),
                        _dice_ce_impls(), _dice_ce_bytes))
    return out


# ------------------------------------------------------------------------------------------------
# running


def _run_impl(case: Case, impl: str, device: str, reps: int) -> dict:
    inputs = case.make_inputs(device)
    x, y = inputs
    loss = case.impls[impl]()
    xr = x.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            loss(xr, y)

    def both():
        xr.grad = None
        loss(xr, y).backward()

    holder = {}

    def fwd_keep():
        xr.grad = None
        holder["v"] = loss(xr, y)

    def bwd_only():
        holder["v"].backward()

    t_fwd = _time(fwd, device, reps)
    t_both = _time(both, device, reps)
    # backward alone: forward outside the timed region each time
    ts = []
    for _ in range(reps):
        fwd_keep()
        _sync(device)
        t = time.perf_counter()
        bwd_only()
        _sync(device)
        ts.append(time.perf_counter() - t)
    t_bwd = statistics.median(ts)
    return {"fwd": t_fwd, "bwd": t_bwd, "both": t_both}


def _peak_child(args):
    case_idx, impl, quick, q = args
    case = cases(quick)[case_idx]
    torch.set_num_threads(torch.get_num_threads())
    inputs = case.make_inputs("cpu")
    x, y = inputs
    xr = x.detach().clone().requires_grad_(True)
    loss = case.impls[impl]()
    loss(xr[:, :, :4, :4, :4].detach().clone().requires_grad_(True), y[:, :, :4, :4, :4]).backward()  # warm up
    xr.grad = None
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
        base = _status_kb("VmRSS")
        loss(xr, y).backward()
        peak = _status_kb("VmHWM")
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss(xr, y).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put((peak - base) / 1024.0)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def _peak_extra_mb(case_idx: int, impl: str, quick: bool, device: str, case: Case) -> Optional[float]:
    if device == "cuda":
        inputs = case.make_inputs(device)
        x, y = inputs
        xr = x.detach().clone().requires_grad_(True)
        loss = case.impls[impl]()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss(xr, y).backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=((case_idx, impl, quick, q),))
    p.start()
    p.join(600)
    return q.get(timeout=5) if p.exitcode == 0 else None


# what ``ops`` selects: the fused losses; optimize(model) on U-Nets (eval forward and training steps;
# on CUDA also one conv -> norm -> act block forward + backward); resampling; sliding-window inference
OPS = ("dice_ce", "optimize", "resample", "sliding_window")


def run(quick: bool = False, device: str = "cpu", reps: Optional[int] = None, ops: Optional[list] = None,
        memory: bool = True, log=print) -> dict:
    unknown = [o for o in (ops or []) if o not in OPS]
    if unknown:
        raise ValueError(f"ops: unknown {unknown}; choose from {list(OPS)}")
    reps = reps or (5 if quick else 10)
    bw = copy_bandwidth(device, nbytes=(256 if quick else 512) * 2**20)
    log(f"device: {device_name(device)}; copy bandwidth {bw:.1f} GB/s (read + write)")
    results = []
    for idx, case in enumerate(cases(quick)):
        if ops and case.op not in ops:
            continue
        times = {}
        for impl in case.impls:
            try:
                times[impl] = _run_impl(case, impl, device, reps)
            except ImportError as exc:
                log(f"  {impl}: skipped ({exc})")
        nbytes = case.min_bytes(case.make_inputs("cpu"))
        for impl, t in times.items():
            r = Result(case.op, case.name, impl, t["fwd"] * 1e3, t["bwd"] * 1e3, t["both"] * 1e3)
            if case.baseline in times:
                r.ratio_vs_baseline = times[case.baseline]["both"] / t["both"]
            r.gbps = nbytes / t["both"] / 1e9
            r.pct_copy_bw = 100.0 * r.gbps / bw
            if memory:
                r.peak_extra_mb = _peak_extra_mb(idx, impl, quick, device, case)
            r.extra["grad_mb"] = case.make_inputs("cpu")[0].numel() * 4 / 2**20
            results.append(r)
    inference, label_memory, resample, optimize_rows = [], None, [], []
    if not ops or "optimize" in ops:
        optimize_rows = run_optimize(quick, device, reps=2 if quick else 3, log=log)
        if device == "cuda":  # the GPU figures: one block, and whole training steps
            optimize_rows += run_blocks(quick, device, reps=5 if quick else 10, log=log)
            optimize_rows += run_train_steps(quick, device, reps=3 if quick else 5, log=log)
        else:  # CPU training steps at 64^3 (128^3 would take minutes a step here)
            optimize_rows += run_train_steps(quick, device, reps=2 if quick else 3, log=log,
                                             shape=(1, 1, 64, 64, 64) if quick else (2, 1, 64, 64, 64))
    if not ops or "resample" in ops:
        resample = run_resample(quick, device, bw, reps=3 if quick else 5, log=log)
    if not ops or "sliding_window" in ops:
        inference = run_sliding_window(quick, device, bw, reps=3 if quick else 5, log=log)
        if not quick and device == "cpu":
            label_memory = label_map_memory()
    return {
        "device": device_name(device),
        "device_type": device,
        "copy_bandwidth_gbps": bw,
        "inference": inference,
        "label_map_memory": label_memory,
        "resample": resample,
        "optimize": optimize_rows,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "quick": quick,
        "results": [asdict(r) for r in results],
    }


# ------------------------------------------------------------------------------------------------
# sliding-window inference: the stitching overhead (time beyond the predictor's own)


def _sw_case(device: str):
    """A cheap 14-class predictor on 192x192x160, roi 96^3, overlap 0.5, gaussian: a per-class scale
    of the window written into a reused buffer, so neither side pays page faults for its outputs
    and the predictor's own time is measured exactly inside each call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1, 192, 192, 160), generator=g).to(device)
    scale = torch.linspace(0.5, 2.0, 14, device=device).view(1, 14, 1, 1, 1)
    buf = torch.empty((2, 14, 96, 96, 96), device=device)
    buf.fill_(0)

    def net(w):
        n = w.shape[0]
        return torch.mul(w, scale, out=buf[:n])

    return x, net, dict(roi_size=(96, 96, 96), sw_batch_size=2, overlap=0.5, mode="gaussian")


def _sw_min_bytes(x, C, roi, nwin, esize=4) -> int:
    """The issue's minimal traffic of stitching in MONAI's order: each window's prediction weighted
    into the output (read it, read + write the output there), then one normalising pass."""
    vol = x[0, 0].numel()
    win = roi[0] * roi[1] * roi[2]
    gather = nwin * win * x.shape[1] * esize * 2        # read the window, write the batch
    stitch = nwin * C * win * esize * 3                 # read the prediction, read + write the output
    final = C * vol * esize * 2 + vol * esize           # normalise in place, read the weight sum
    return gather + stitch + final


def _sw_floor_bytes(x, C, roi, nwin, esize=4) -> int:
    """The floor under any stitching: windows gathered, every prediction read once, every output
    voxel written once."""
    win = roi[0] * roi[1] * roi[2]
    return nwin * win * x.shape[1] * esize * 2 + nwin * C * win * esize + C * x[0, 0].numel() * esize


def _sw_unet_case(device: str):
    """A real predictor: MONAI's DynUNet (6 levels, 14 classes, float32, eval) on the same volume
    and tiling; its outputs are fresh tensors, as any network's."""
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    m = DynUNet(3, 1, 14, kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, 2], upsample_kernel_size=[2] * 5,
                norm_name=("instance", {"affine": True})).to(device).eval()
    x, _, kw = _sw_case(device)
    return x, m, kw


def run_sliding_window(quick: bool, device: str, bw: float, reps: int = 3, log=print) -> list:
    out = _run_sliding_window_case(_sw_case(device), "14-class scale, 192x192x160, roi 96^3, overlap 0.5, gaussian",
                                   device, bw, reps, log)
    if device == "cuda":  # the GPU figure: stitching as a share of a real U-Net's time
        try:
            case = _sw_unet_case(device)
        except ImportError as exc:
            log(f"  sliding window with DynUNet: skipped ({exc})")
        else:
            out += _run_sliding_window_case(case, "DynUNet 14 classes, 192x192x160, roi 96^3, overlap 0.5, gaussian",
                                            device, bw, reps, log)
    return out


def _run_sliding_window_case(case, name: str, device: str, bw: float, reps: int, log) -> list:
    from . import inferers as fi

    x, net, kw = case
    impls = {"fastmed": fi.sliding_window_inference}
    try:
        from monai.inferers import sliding_window_inference as msw

        impls["monai"] = msw
    except ImportError as exc:
        log(f"  monai: skipped ({exc})")
    rows = {}
    for impl, fn in impls.items():
        totals, preds = [], []
        for rep in range(reps + 1):
            fi._Tiling.cache.clear()  # build the weight map every time, as MONAI does
            spent = [0.0]

            def predictor(w):
                _sync(device)
                t0 = time.perf_counter()
                out = net(w)
                _sync(device)
                spent[0] += time.perf_counter() - t0
                return out

            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(x, kw["roi_size"], kw["sw_batch_size"], predictor, kw["overlap"], kw["mode"])
            _sync(device)
            if rep:  # the first run warms up
                totals.append(time.perf_counter() - t0)
                preds.append(spent[0])
            del out
        tot, pr = statistics.median(totals), statistics.median(preds)
        rows[impl] = {"total_ms": tot * 1e3, "predictor_ms": pr * 1e3, "overhead_ms": (tot - pr) * 1e3}
    nwin = 27
    min_ms = _sw_min_bytes(x, 14, kw["roi_size"], nwin) / (bw * 1e9) * 1e3
    floor_ms = _sw_floor_bytes(x, 14, kw["roi_size"], nwin) / (bw * 1e9) * 1e3
    out = []
    for impl, r in rows.items():
        r.update(op="sliding_window", case=name, overhead_share=r["overhead_ms"] / r["total_ms"],
                 impl=impl, min_traffic_ms=min_ms, overhead_vs_min=r["overhead_ms"] / min_ms,
                 floor_traffic_ms=floor_ms, overhead_vs_floor=r["overhead_ms"] / floor_ms)
        if "monai" in rows:
            r["overhead_ratio_vs_monai"] = rows["monai"]["overhead_ms"] / r["overhead_ms"]
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------
# resampling: a CT to 1.5 mm (MONAI Spacing), and logits back to the original geometry as labels


def _ct_case(quick: bool):
    """512x512x200 at (0.8, 0.8, 2.5) mm (the issue's case; the same in --quick)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 512, 512, 200), generator=g) * 300
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    return x, affine


def _median_time(fn, reps: int, device: str = "cpu") -> float:
    """Median seconds of fn() after one warm-up call, the device synchronised around each call."""
    fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
        del out
    return statistics.median(ts)


def run_resample(quick: bool, device: str, bw: float, reps: int = 3, log=print) -> list:
    from . import transforms as ft

    rows = []
    x, affine = _ct_case(quick)
    x = x.to(device)
    nbytes_in = x.numel() * x.element_size()
    fm = ft.Spacing(pixdim=(1.5, 1.5, 1.5), mode="bilinear", dtype=torch.float32)
    out = fm(x, affine=affine, return_affine=True)[0]
    out_shape = tuple(out.shape)
    min_bytes = nbytes_in + out.numel() * 4
    del out
    impls = {"fastmed": lambda: fm(x, affine=affine)}
    try:
        from monai.data import MetaTensor
        from monai.transforms import Spacing as MSpacing

        mx = MetaTensor(x, affine=affine)
        ms = MSpacing(pixdim=(1.5, 1.5, 1.5), mode="bilinear", dtype=torch.float32)
        impls["monai"] = lambda: ms(mx)
    except ImportError as exc:
        log(f"  monai: skipped ({exc})")
    times = {name: _median_time(fn, reps if name == "fastmed" else max(1, reps - 1), device)
             for name, fn in impls.items()}
    case = "512x512x200 (0.8, 0.8, 2.5) mm -> 1.5 mm, trilinear, float32 -> " + "x".join(map(str, out_shape[1:]))
    for name, t in times.items():
        r = {"op": "resample", "case": case, "impl": name, "ms": t * 1e3, "gbps": min_bytes / t / 1e9,
             "pct_copy_bw": 100.0 * min_bytes / t / 1e9 / bw}
        if "monai" in times:
            r["ratio_vs_monai"] = times["monai"] / t
        rows.append(r)

    # logits (14 classes at 1.5 mm) back to the original grid as labels, against resample-then-argmax
    C = 14
    small = (256, 256, 100) if quick else (512, 512, 200)
    orig_aff = torch.diag(torch.tensor([0.8 * 512 / small[0], 0.8 * 512 / small[1], 2.5 * 200 / small[2], 1.0],
                                       dtype=torch.float64))
    lo_shape = [int(round(n * float(orig_aff[i, i]) / 1.5)) for i, n in enumerate(small)]
    lo_aff = torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0], dtype=torch.float64))
    logits = torch.randn((C, *lo_shape), generator=torch.Generator().manual_seed(1)).to(device)
    impls = {"fastmed": lambda: ft.resample_argmax(logits, small, lo_aff, orig_aff)}
    try:
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        ml = MetaTensor(logits, affine=lo_aff)
        sr = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)
        impls["monai"] = lambda: sr(ml, dst_affine=orig_aff, spatial_size=small).argmax(0, keepdim=True)
    except ImportError:
        pass
    times = {name: _median_time(fn, reps if name == "fastmed" else 1, device) for name, fn in impls.items()}
    lab_bytes = logits.numel() * 4 + math.prod(small)
    case = f"{C} logits {'x'.join(map(str, lo_shape))} at 1.5 mm -> labels {'x'.join(map(str, small))}"
    for name, t in times.items():
        r = {"op": "logits_to_labels", "case": case, "impl": name, "ms": t * 1e3, "gbps": lab_bytes / t / 1e9,
             "pct_copy_bw": 100.0 * lab_bytes / t / 1e9 / bw}
        if "monai" in times:
            r["ratio_vs_monai"] = times["monai"] / t
        rows.append(r)
    return rows


def _optimize_models(quick: bool):
    """(name, constructor) of the networks whose eval forward run_optimize times: MONAI's DynUNet
    (the issue's case); in the full run also nnU-Net's PlainConvUNet (3d_fullres-like) and MONAI's
    UNet (residual units, instance norm + PReLU, fused since the eighth session). The first
    two are the training-step networks of run_train_steps."""
    from monai.networks.nets import UNet

    ctors = dict(_train_models(quick))
    out = [("DynUNet (6 levels, instance norm + LeakyReLU)", ctors["DynUNet"])]
    if quick:
        return out
    if "PlainConvUNet" in ctors:
        out.append(("nnU-Net PlainConvUNet (6 stages, 32..320)", ctors["PlainConvUNet"]))
    out.append(("MONAI UNet (16..256, 2 residual units, instance norm + PReLU)", lambda: UNet(
        3, 1, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="instance")))
    return out


def run_optimize(quick: bool, device: str, reps: int = 3, log=print) -> list:
    """fastmed.optimize on MONAI's DynUNet (nnU-Net-like 6 levels, instance norm + LeakyReLU), and in
    the full run nnU-Net's PlainConvUNet and MONAI's UNet: eval forward on 1x1x96^3, original and
    optimized (the default layout, and planar throughout), alternating in the same run."""
    try:
        models = _optimize_models(quick)
    except ImportError as exc:
        log(f"  optimize: skipped ({exc})")
        return []
    from .nn import optimize

    rows = []
    x = torch.randn(1, 1, 96, 96, 96, device=device)
    for name, ctor in models:
        torch.manual_seed(0)
        m = ctor().to(device).eval()
        # the default (CPU inference channels last inside, planar in and out) and planar throughout
        nets = {"monai": m, "fastmed": optimize(m).eval()}
        if device != "cuda":  # on CUDA the default is planar already
            nets["fastmed_planar"] = optimize(m, channels_last=False).eval()
        else:  # channels-last weights, and the Triton convolution (FASTMED_TRITON_CONV=1)
            # with the prologue chain of DynUNet's basic blocks and without it
            nets["fastmed_cl"] = optimize(m, channels_last=True).eval()
            nets["fastmed_cl_triton_conv"] = nets["fastmed_cl"]
            nets["fastmed_cl_triton_conv_nochain"] = nets["fastmed_cl"]
        times = {k: [] for k in nets}
        launches = {}

        def call(k, net):
            from . import nn as fnn

            chain = fnn._conv_pair
            if k.endswith("_nochain"):
                fnn._conv_pair = lambda layers, x: None
            try:
                with _env("FASTMED_TRITON_CONV", "1" if "triton_conv" in k else "0"), _count_triton_conv() as c:
                    net(x)
                launches[k] = c.n  # did the Triton convolution run? (unsuited layers go to cuDNN)
            finally:
                fnn._conv_pair = chain

        with torch.no_grad():
            for k, net in nets.items():  # warm-up
                call(k, net)
            for _ in range(reps):
                for k, net in nets.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    call(k, net)
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        case = f"{name} eval forward 1x1x96^3"
        rows += [{"op": "optimize", "case": case, "impl": k, "ms": med[k] * 1e3, "ratio_vs_monai": med["monai"] / med[k],
                  "fused": len(nets[k]._fastmed_report["fused"]) if k != "monai" else 0,
                  "onednn_convs": len(nets[k]._fastmed_report["onednn"]) if k != "monai" else 0,
                  "upconv": len(nets[k]._fastmed_report["upconv"]) if k != "monai" else 0,
                  **({"triton_conv_launches": launches[k]} if "triton_conv" in k else {})} for k in nets]
        del nets, m
    return rows


class _env:
    """Sets an environment variable for the duration of a with-block (restored after)."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


class _count_triton_conv:
    """Counts the Triton convolution's launches inside a with-block: ``.n`` forward convolutions,
    ``.bwd`` fused backward weight gradients (one per layer whose backward ran fused), so that a row
    labelled with it says whether they really ran (layers they are unsuited to go to cuDNN; a
    compile failure switches them off)."""

    def __enter__(self):
        self.n = self.bwd = 0
        self.patched = []
        try:
            from .kernels import conv_bwd_triton as kb
            from .kernels import conv_triton as kc
        except Exception:  # noqa: BLE001 - no triton
            return self
        for mod, name, attr in ((kc, "conv_fwd", "n"), (kb, "conv_wgrad", "bwd")):
            orig = getattr(mod, name)

            def counted(*a, _orig=orig, _attr=attr, **k):
                setattr(self, _attr, getattr(self, _attr) + 1)
                return _orig(*a, **k)

            setattr(mod, name, counted)
            self.patched.append((mod, name, orig))
        return self

    def __exit__(self, *exc):
        for mod, name, orig in self.patched:
            setattr(mod, name, orig)


def run_blocks(quick: bool, device: str, reps: int = 5, log=print, shape=None, compile: bool = True) -> list:
    """One nnU-Net block (Conv3d 3x3x3 -> InstanceNorm3d(affine) -> LeakyReLU(0.01)) forward +
    backward (input and parameter gradients): eager PyTorch (cuDNN / oneDNN + the two eager
    modules), fastmed.nn.ConvNormAct with the same parameters, and torch.compile of the eager block.
    On CUDA in bfloat16 autocast, channels last (the issue's setting); on the CPU float32."""
    import copy

    from torch import nn

    from .nn import ConvNormAct

    cuda = device == "cuda"
    shape = shape or ((2, 32, 64, 64, 64) if quick else (2, 32, 128, 128, 128))
    N, C = shape[0], shape[1]
    torch.manual_seed(0)
    blk = ConvNormAct(C, C, 3, norm_kwargs={"affine": True}).to(device)
    eager = nn.Sequential(copy.deepcopy(blk.conv), copy.deepcopy(blk.norm), copy.deepcopy(blk.act))
    impls = {"eager": eager, "fastmed": blk}
    if cuda:  # the same module with its convolution by fastmed's Triton implicit GEMM
        impls["fastmed+triton_conv"] = blk
    if compile:
        try:
            impls["torch.compile"] = torch.compile(copy.deepcopy(eager))
        except Exception as exc:  # noqa: BLE001
            log(f"  torch.compile: skipped ({exc})")
    fmt = torch.channels_last_3d if cuda else torch.contiguous_format
    for m in impls.values():
        m.to(memory_format=fmt)
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, device=device, dtype=torch.bfloat16 if cuda else torch.float32).contiguous(memory_format=fmt)
    rows, times, launches = [], {}, {}
    for name, m in impls.items():
        def step(m=m, tc="1" if name.endswith("triton_conv") else "0"):
            with _env("FASTMED_TRITON_CONV", tc), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                y = m(x)
            y.backward(dy)
        try:
            with _count_triton_conv() as cnt:
                times[name] = _time(step, device, reps)  # the warm-up compiles torch.compile's
            launches[name] = (cnt.n, cnt.bwd)
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a working compiler
            log(f"  {name}: skipped ({type(exc).__name__}: {exc})")
    case = (f"Conv3d+InstanceNorm+LeakyReLU fwd+bwd {tuple(shape)}"
            + (", bf16 autocast, channels last" if cuda else ", float32"))
    for name, t in times.items():
        rows.append({"op": "conv_block", "case": case, "impl": name, "ms": t * 1e3,
                     "ratio_vs_eager": times["eager"] / t if "eager" in times else float("nan"),
                     "triton_conv_launches": launches[name][0], "triton_bwd_launches": launches[name][1]})
    return rows


def _train_models(quick: bool):
    """(name, constructor) of the networks whose training step is timed: MONAI's DynUNet and
    nnU-Net's PlainConvUNet (3d_fullres-like, 6 stages, 32..320 features)."""
    from torch import nn

    out = []
    try:
        from monai.networks.nets import DynUNet

        out.append(("DynUNet", lambda: DynUNet(3, 1, 3, kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, 2],
                                               upsample_kernel_size=[2] * 5,
                                               norm_name=("instance", {"affine": True}))))
    except ImportError:
        pass
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        out.append(("PlainConvUNet", lambda: PlainConvUNet(
            1, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2, 2), (2,) * 6, 3, (2,) * 5,
            conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})))
    except ImportError:
        pass
    return out


def run_train_steps(quick: bool, device: str, reps: int = 5, log=print, shape=None) -> list:
    """A whole training step (forward, loss, backward, SGD step) of each network, the original and
    fastmed.optimize(model) alternating in the same run; on CUDA in bfloat16 autocast, channels last,
    and optimize(model) once more with FASTMED_TRITON_CONV=1 (fastmed's Triton convolution where a
    fused block runs conv -> norm -> act itself: DynUNet's blocks). A network that fails (e.g. out of
    memory) is reported and skipped."""
    from .nn import optimize

    cuda = device == "cuda"
    shape = shape or ((2, 1, 64, 64, 64) if quick else (2, 1, 128, 128, 128))
    fmt = torch.channels_last_3d if cuda else torch.contiguous_format
    rows = []
    for name, make in _train_models(quick):
        torch.manual_seed(0)
        orig = make().to(device).to(memory_format=fmt).train()
        nets = {"original": orig, "fastmed": optimize(orig, channels_last=True if cuda else None).train()}
        if cuda:
            nets["fastmed+triton_conv"] = nets["fastmed"]
        x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
        steps = {}
        for k, m in nets.items():
            opt = torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9)

            def step(m=m, opt=opt, tc="1" if k.endswith("triton_conv") else "0"):
                opt.zero_grad(set_to_none=True)
                with _env("FASTMED_TRITON_CONV", tc), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    out = m(x)
                    out = out[0] if isinstance(out, (list, tuple)) else out
                loss = out.float().square().mean()
                loss.backward()
                opt.step()
            steps[k] = step
        times = {k: [] for k in nets}
        launches = dict.fromkeys(nets, (0, 0))
        try:
            for fn in steps.values():
                fn()
            for _ in range(reps):
                for k, fn in steps.items():
                    with _count_triton_conv() as cnt:
                        _sync(device)
                        t0 = time.perf_counter()
                        fn()
                        _sync(device)
                        times[k].append(time.perf_counter() - t0)
                    launches[k] = (cnt.n, cnt.bwd)  # per step
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the other rows still count
            log(f"  {name} training step: skipped ({type(exc).__name__}: {exc})")
            del nets, steps, orig
            if cuda:
                torch.cuda.empty_cache()
            continue
        med = {k: statistics.median(v) for k, v in times.items()}
        saved = {k: _saved_activation_mb(m, x, cuda, k.endswith("triton_conv")) for k, m in nets.items()}
        case = f"{name} training step {tuple(shape)}" + (", bf16 autocast, channels last" if cuda else ", float32")
        rows += [{"op": "train_step", "case": case, "impl": k, "ms": med[k] * 1e3,
                  "ratio_vs_eager": med["original"] / med[k], "triton_conv_launches": launches[k][0],
                  "triton_bwd_launches": launches[k][1], "saved_mb": saved[k]} for k in nets]
    return rows


def _saved_activation_mb(m, x, cuda: bool, triton_conv: bool) -> float:
    """MiB of the distinct activation storages (parameters not counted) that autograd keeps for the
    backward of one training forward: the memory a training step holds between forward and backward."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            _env("FASTMED_TRITON_CONV", "1" if triton_conv else "0"), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        out = m(x)
    del out
    return sum(seen.values()) / 2**20


def format_optimize_table(report: dict) -> str:
    rows = report.get("optimize") or []
    if not rows:
        return ""
    head = ["op", "case", "impl", "ms", "x vs original", "kept for backward MiB"]
    names = {"fastmed": "fastmed.optimize", "fastmed_planar": "optimize(channels_last=False)",
             "fastmed_cl": "optimize(channels_last=True)", "monai": "original model"}
    def impl(r):
        if r["op"] == "optimize" and "triton_conv" not in r["impl"]:
            return names.get(r["impl"], r["impl"])
        if "triton_conv" in r["impl"]:  # did it run? (unsuited layers go to cuDNN)
            return (f"{r['impl']} ({r.get('triton_conv_launches', 0)} Triton conv launches/step"
                    + (f", {r['triton_bwd_launches']} fused backward" if "triton_bwd_launches" in r else "") + ")")
        return r["impl"]

    lines = [head] + [[r["op"], r["case"], impl(r), f"{r['ms']:.1f}",
                       f"{r.get('ratio_vs_monai', r.get('ratio_vs_eager', float('nan'))):.2f}",
                       f"{r['saved_mb']:.0f}" if "saved_mb" in r else ""] for r in rows]
    return _text_table(lines)


def format_resample_table(report: dict) -> str:
    rows = report.get("resample") or []
    if not rows:
        return ""
    head = ["op", "case", "impl", "ms", "x vs MONAI", "GB/s (min traffic)", "% copy BW"]
    lines = [head] + [[r["op"], r["case"], r["impl"], f"{r['ms']:.0f}", f"{r.get('ratio_vs_monai', float('nan')):.1f}",
                       f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.0f}"] for r in rows]
    return _text_table(lines)


def _label_memory_child(args):
    shape, C, roi, overlap, acc_dtype, q = args
    from . import inferers as fi

    torch.manual_seed(0)
    x = torch.randn(shape)
    scale = torch.linspace(-1.0, 1.0, C).view(1, C, 1, 1, 1).half()
    buf = torch.empty((1, C) + tuple(roi), dtype=torch.float16)
    buf.fill_(0)

    def predictor(w):  # a cheap C-class predictor writing fp16 into a reused buffer
        return torch.mul(w.half(), scale, out=buf[: w.shape[0]])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        lab = fi.sliding_window_labels(x, roi, 1, predictor, overlap, "gaussian",
                                       accumulate_dtype=getattr(torch, acc_dtype))
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    q.put({"peak_extra_mb": (peak - base) / 1024.0, "seconds": dt, "labels_shape": list(lab.shape),
           "labels_dtype": str(lab.dtype)})


def label_map_memory(shape=(1, 1, 512, 512, 800), C=117, roi=(96, 96, 96), overlap=0.25,
                     acc_dtype="float16", timeout=1800) -> Optional[dict]:
    """Peak extra CPU memory (RSS) of sliding_window_labels for `C` classes on `shape`, measured
    in a fresh process (the full C-channel float32 result would need C x volume x 4 bytes)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_label_memory_child, args=((shape, C, roi, overlap, acc_dtype, q),))
    p.start()
    p.join(timeout)
    if p.exitcode != 0:
        if p.is_alive():
            p.kill()
        return None
    r = q.get(timeout=5)
    vol = 1
    for n in shape[2:]:
        vol *= n
    r.update(op="sliding_window_labels", case=f"{C} classes, {'x'.join(map(str, shape[2:]))}, roi "
             f"{roi[0]}^3, overlap {overlap}, {acc_dtype} accumulators",
             full_result_fp32_mb=C * vol * 4 / 2**20)
    return r


def _text_table(rows: list) -> str:
    """Rows of cells (the first is the header) as an aligned text table."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_inference_table(report: dict) -> str:
    rows = report.get("inference") or []
    if not rows:
        return ""
    head = ["op", "case", "impl", "total ms", "predictor ms", "stitching ms", "x less than MONAI", "min traffic ms",
            "stitching / min", "floor ms", "stitching / floor"]
    lines = [head]
    for r in rows:
        floor = r.get("floor_traffic_ms")
        lines.append([r["op"], r["case"], r["impl"], f"{r['total_ms']:.0f}", f"{r['predictor_ms']:.0f}",
                      f"{r['overhead_ms']:.0f}", f"{r.get('overhead_ratio_vs_monai', float('nan')):.1f}",
                      f"{r['min_traffic_ms']:.0f}", f"{r['overhead_vs_min']:.1f}",
                      f"{floor:.0f}" if floor else "-", f"{r['overhead_vs_floor']:.1f}" if floor else "-"])
    return _text_table(lines)


def _versions() -> dict:
    import fastmed

    v = {"fastmed": fastmed.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import monai

        v["monai"] = monai.__version__
    except ImportError:
        v["monai"] = None
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    v["build"] = fastmed.build_info()
    return v


def format_table(report: dict) -> str:
    head = ["op", "case", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "x vs MONAI", "GB/s", "% copy BW", "peak extra MB"]
    rows = [head]
    for r in report["results"]:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        rows.append([r["op"], r["case"], r["impl"], f(r["fwd_ms"], ".1f"), f(r["bwd_ms"], ".1f"), f(r["fwd_bwd_ms"], ".1f"),
                     f(r["ratio_vs_baseline"], ".1f"), f(r["gbps"], ".1f"), f(r["pct_copy_bw"], ".0f"),
                     f(r["peak_extra_mb"], ".0f")])
    return _text_table(rows)


def save(report: dict, path: str) -> str:
    """Write the report to ``path``, which must not exist (nor be a link): through a fresh temporary
    file of its own (never an existing one) moved into place without overwriting anything."""
    from .io import _create_temp, _link_new

    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    msg = f"out: {path} exists; fastmed never overwrites a file, choose another name"
    if os.path.lexists(path):
        raise FileExistsError(msg)
    tmp = _create_temp(directory, "." + os.path.basename(path) + ".", ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        _link_new(tmp, path, msg)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def default_result_path(report: dict, root: str = "benches/results") -> str:
    dev = "".join(c if c.isalnum() else "-" for c in report["device"].split("(")[0].strip()).strip("-").lower()
    day = report["date"][:10]
    base = os.path.join(root, f"{dev}-{day}")
    path, i = base + ".json", 2
    while os.path.exists(path):
        path, i = f"{base}-{i}.json", i + 1
    return path
