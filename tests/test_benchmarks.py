"""The benchmark scripts run end to end and write the figures they print."""

from __future__ import annotations

import json

from tests.conftest import run_script


def test_quality_benchmark_trains_scores_and_writes_medians(corpus_file, tmp_path):
    result = run_script(
        "-m",
        "benchmarks.quality",
        "--corpus",
        str(corpus_file),
        "--runs",
        "2",
        "--preset",
        "tiny",
        "--max-steps",
        "10",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [1, 2] and all(r["steps"] == 10 for r in summary["runs"])
    low, high = sorted(r["bpb"] for r in summary["runs"])
    assert summary["median_bpb"] == (low + high) / 2 and 0 < low <= high < 8
    assert f"{summary['median_bpb']:.4f}" in (tmp_path / "quality.md").read_text()
