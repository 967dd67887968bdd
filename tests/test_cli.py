"""The command line and the benchmark tables (formatting only; timing lives in benches/)."""
from __future__ import annotations

import glob
import json
import os

import pytest

from fastmed import bench, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _latest_result():
    files = sorted(glob.glob(os.path.join(ROOT, "benches", "results", "*.json")))
    assert files, "the repository ships its benchmark results in benches/results"
    with open(files[-1]) as f:
        return json.load(f)


def test_tables_format_saved_results():
    report = _latest_result()
    main = bench.format_table(report)
    assert main.splitlines()[0].startswith("op") and "fastmed" in main and "monai" in main
    for text in (bench.format_inference_table(report), bench.format_resample_table(report)):
        if text:
            lines = text.splitlines()
            assert set(lines[1]) <= {"-", "+"} and len(lines) >= 3
            assert all("|" in ln for ln in lines[2:])


def test_info_prints_build(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "cpu" in info["backends"]


def test_bench_refuses_bad_reps(capsys):
    assert cli.main(["bench", "--reps", "0"]) == 2
    assert "--reps" in capsys.readouterr().err


def test_bench_refuses_unknown_ops(capsys):
    """Found by review: `--ops blocks` (or any typo) ran nothing and printed an empty table."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--ops", "blocks"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ops"):
        bench.run(ops=["dice"])
    assert cli._BENCH_OPS == bench.OPS


def test_save_never_overwrites(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{}")
    with pytest.raises(FileExistsError):
        bench.save({"x": 1}, str(path))
    assert path.read_text() == "{}"
    # nor a file (or a link to one) that happens to carry a temporary-looking name
    victim = tmp_path / "precious.txt"
    victim.write_text("user data\n")
    os.symlink(victim, tmp_path / "s.json.tmp")
    (tmp_path / "t.json.tmp").write_text("mine")
    bench.save({"x": 1}, str(tmp_path / "s.json"))
    bench.save({"x": 2}, str(tmp_path / "t.json"))
    assert victim.read_text() == "user data\n" and (tmp_path / "t.json.tmp").read_text() == "mine"
    assert json.loads((tmp_path / "t.json").read_text()) == {"x": 2}
    assert sorted(os.listdir(tmp_path)) == ["precious.txt", "r.json", "s.json", "s.json.tmp", "t.json", "t.json.tmp"]


def test_gpu_block_and_training_step_benchmarks_run(monkeypatch):
    """The code of the GPU-only rows of `fastmed bench --ops optimize` (one block fwd+bwd against
    eager and torch.compile, whole training steps) runs, here on the CPU with tiny shapes."""
    pytest.importorskip("monai")
    import torch
    from torch import nn

    rows = bench.run_blocks(True, "cpu", reps=1, shape=(1, 3, 6, 6, 6), compile=False, log=lambda *a: None)
    assert [r["impl"] for r in rows] == ["eager", "fastmed"] and all(r["ms"] > 0 for r in rows)

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01),
                             nn.Conv3d(4, 2, 1))

    monkeypatch.setattr(bench, "_train_models", lambda quick: [("tiny", tiny)])
    rows += bench.run_train_steps(True, "cpu", reps=1, shape=(1, 1, 8, 8, 8))
    assert [r["impl"] for r in rows[2:]] == ["original", "fastmed"]
    # the activations kept for the backward (plus the norms' statistics, a few bytes): the original
    # keeps the input, the convolution's output (the norm's input), the norm's output (LeakyReLU's
    # input) and LeakyReLU's output (the 1x1 convolution's input); optimize keeps the input and the
    # convolution's output alone (the 1x1 convolution recomputes its input from it)
    vox = 8 ** 3 * 4 / 2**20
    assert rows[2]["saved_mb"] == pytest.approx((1 + 4 + 4 + 4) * vox, rel=1e-2)
    assert rows[3]["saved_mb"] == pytest.approx((1 + 4) * vox, rel=1e-2)
    table = bench.format_optimize_table({"optimize": rows}).splitlines()
    assert len(table) == 2 + 4 and "train_step" in table[-1] and "conv_block" in table[2]


def test_optimize_benchmark_rows(monkeypatch):
    """`fastmed bench --ops optimize` on the CPU: the original, the default optimize() (channels-last
    inference inside) and planar throughout, side by side (a tiny model here)."""
    pytest.importorskip("monai")
    from torch import nn

    def tiny():
        return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01),
                             nn.Conv3d(4, 2, 1))

    monkeypatch.setattr(bench, "_optimize_models", lambda quick: [("tiny", tiny)])
    rows = bench.run_optimize(True, "cpu", reps=1)
    assert [r["impl"] for r in rows] == ["monai", "fastmed", "fastmed_planar"]
    assert all(r["ms"] > 0 and r["fused"] == (0 if r["impl"] == "monai" else 1) for r in rows)
    table = bench.format_optimize_table({"optimize": rows})
    assert "optimize(channels_last=False)" in table and "fastmed.optimize" in table
