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


def test_save_never_overwrites(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{}")
    with pytest.raises(FileExistsError):
        bench.save({"x": 1}, str(path))
    assert path.read_text() == "{}"
