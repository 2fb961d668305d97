"""The benchmark scripts run end to end and write the figures they print."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import data_speed, load, quality, report, step
from benchmarks.__main__ import default_budget
from model.errors import UserError
from tests.conftest import ROOT, run_script
from tests.test_cli import assert_clean_error
from training.config import TrainConfig


def test_quality_benchmark_trains_scores_and_writes_medians(corpus_file, tmp_path):
    result = run_script(
        "-m",
        "benchmarks.quality",
        "--corpus",
        str(corpus_file),
        "--runs",
        "2",
        "--train-flags",
        "--preset tiny --max-steps 10",
        "--max-minutes",
        "1",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    (budget,) = json.loads((tmp_path / "quality.json").read_text())["budgets"]
    assert [r["seed"] for r in budget["runs"]] == [1, 2] and all(r["steps"] == 10 for r in budget["runs"])
    assert all(r["scored_step"] == 10 and "checkpoint" not in r for r in budget["runs"])  # no deleted folder
    low, high = sorted(r["bpb"] for r in budget["runs"])
    assert budget["median_bpb"] == (low + high) / 2 and 0 < low <= high < 8
    assert all(0 < r["mfu"] < 1.5 and r["curve"][-1][0] > 0 for r in budget["runs"])
    # The size the suite picks the generation model by, as the training log printed it.
    assert all(r["model"].startswith(f"{r['parameters'] / 1e6:.2f}M parameters") for r in budget["runs"])
    assert f"{budget['median_bpb']:.3f}" in (tmp_path / "quality.md").read_text()


def test_the_suite_writes_json_markdown_and_a_plot_with_every_figure(corpus_file, tmp_path):
    result = run_script(
        "-m",
        "benchmarks",
        "--corpus",
        str(corpus_file),
        "--quick",
        "--runs",
        "1",
        "--budgets",
        "1",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "benchmarks.json").read_text())
    assert "GFLOP/s" in figures["machine"] and 0 < figures["mfu"] < 1.5
    generation = figures["generation"]
    # The temporary run folders are gone: the JSON says which run, not where it was.
    assert "checkpoint" not in generation and generation["model"] == "1 min budget, seed 1"
    assert not [run for run in figures["quality"][0]["runs"] if "checkpoint" in run]
    assert generation["bytes_per_second_within_context"] > 0 and generation["bytes_per_second_past_context"] > 0
    assert generation["tokens_past_context"] == 4 * generation["context"] and generation["first_token_ms"] > 0
    assert generation["prompt_bytes"] <= 1000
    data = figures["data"]
    assert data["bpe_seconds_0.1MB"] > 0 and data["bpe_seconds_1MB"] > 0 and data["prepare_seconds_1MB"] > 0
    assert 50 < data["prepare_peak_mb_1MB"] < 4096
    table = (tmp_path / "benchmarks.md").read_text()
    assert f"{figures['quality'][0]['median_bpb']:.3f}" in table and "time to first token" in table
    assert f"| BPE training (s), 0.1 MB | {data['bpe_seconds_0.1MB']:g} |  |  |" in table  # no target, still shown
    # A quick run's figures are a tiny model's: labelled so, and not judged against the real targets.
    assert figures["quick"] and "| val bits/byte, quick run: tiny preset, 20 steps, --max-minutes 1 (median) |" in table
    model_rows = [line for line in table.splitlines() if "quick run" in line]
    assert len(model_rows) == 5 and all(line.endswith("|  |  |") for line in model_rows), table
    assert "min budget" not in table and "min model" not in table
    assert (tmp_path / "loss_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_says_whether_a_longer_budget_ended_worse_than_a_shorter_one():
    def steady_row(medians: dict[float, float]) -> tuple[str, str, str, str]:
        quality = [{"minutes": minutes, "median_bpb": bpb, "runs": []} for minutes, bpb in medians.items()]
        (row,) = [row for row in report.rows({"quality": quality}) if row[2] == "each <= the shorter budget's"]
        return row

    assert steady_row({5: 1.946, 1.5: 1.997, 15: 1.946}) == (
        "val bits/byte, 1.5 / 5 / 15 min (medians)",
        "1.997 / 1.946 / 1.946",
        "each <= the shorter budget's",
        "yes",
    )
    assert steady_row({1.5: 1.997, 5: 1.946, 15: 1.982})[3] == "no"
    assert not [
        row for row in report.rows({"quality": [{"minutes": 5, "median_bpb": 1.9}]}) if "<= the shorter" in row[2]
    ]


def test_bad_suite_input_is_one_line(tmp_path):
    result = run_script("-m", "benchmarks", "--corpus", "no/such/file.txt")
    assert_clean_error(result, "is not a file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1") * 50)
    for tool in ("benchmarks", "benchmarks.quality"):
        result = run_script("-m", tool, "--corpus", str(latin1), "--out", str(tmp_path / "out"), timeout=60)
        assert_clean_error(result, "latin1.txt is not UTF-8 text \\(byte 3\\); convert it")


def test_a_failing_training_run_is_one_line_with_its_reason(corpus_file, tmp_path):
    flags = ["--train-flags", "--preset tiny --n-layer 0", "--runs", "1", "--max-minutes", "1"]
    result = run_script("-m", "benchmarks.quality", "--corpus", str(corpus_file), *flags, "--out", str(tmp_path))
    assert_clean_error(result, "^error: train.py failed: .*n-layer")


@pytest.mark.parametrize("part", ["dropout", "attention"])
def test_the_step_breakdown_times_every_part_for_ours_and_stock(tmp_path, part):
    small = ["--n-layer", "1", "--n-embd", "64", "--context", "32", "--batch-size", "4", "--vocab-size", "300"]
    out = tmp_path / "step.json"
    result = run_script("-m", "benchmarks.step", *small, "--steps", "2", "--rounds", "2", "--compare", part,
                        "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["version"] for r in results] == ["ours", "stock"]
    for figures in results:
        assert set(figures["ms"]) == {"forward", "backward", "clip", "adamw", "muon"}
        assert all(ms > 0 for ms in figures["ms"].values()) and len(figures["step_ms_each_round"]) == 2
        assert 0 < figures["mfu"] < figures["mfu_forward_backward"] < 1.5


def test_mfu_and_generation_are_the_default_budgets_even_when_a_longer_one_is_measured():
    # The targets are about the default model (`python train.py`, 5 minutes): a 15-minute budget's bigger
    # model generates more slowly and must not stand in for it; without the default the longest does.
    budgets = [{"minutes": minutes, "median_mfu": mfu} for minutes, mfu in ((1.5, 0.36), (5.0, 0.55), (15.0, 0.58))]
    assert default_budget(budgets)["minutes"] == TrainConfig.max_minutes == 5.0
    assert default_budget(budgets[:1] + [{"minutes": 1.0}])["minutes"] == 1.5
    generation = {"bytes_per_second_within_context": 7000, "tokens_within_context": 256}
    labels = [row[0] for row in report.rows({"mfu": 0.55, "default_minutes": 5.0, "generation": generation})]
    assert labels == [
        "MFU of the default training step, the 5 min runs",
        "generation bytes/s, batch 1, 256 tokens (within context), the 5 min model",
    ]


@pytest.mark.parametrize("tool", ["benchmarks", "benchmarks.quality", "benchmarks.step", "benchmarks.data_speed"])
def test_an_out_that_cannot_be_written_is_refused_before_measuring(tool, corpus_file, tmp_path):
    (tmp_path / "a_file").write_text("")
    corpus = ["--corpus", str(corpus_file)] if tool in ("benchmarks", "benchmarks.quality") else []
    result = run_script("-m", tool, *corpus, "--out", str(tmp_path / "a_file" / "out"), timeout=60)
    assert_clean_error(result, "cannot create (--out|the folder of --out) ")


def _child_running(pid: int, script: str) -> int | None:
    """The pid of `pid`'s child process whose command line holds `script`, if one runs."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        try:
            if script.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:  # it ended meanwhile
            continue
    return None


def test_sigterm_stops_the_suite_as_ctrl_c_does_with_its_training_run_and_temporary_folder(corpus_file, tmp_path):
    temporary = tmp_path / "tmp"  # where the suite's TemporaryDirectory (corpus split, cache, runs) goes
    temporary.mkdir()
    flags = ["--quick", "--runs", "1", "--budgets", "1", "--skip", "generation", "data"]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--corpus", str(corpus_file), *flags, "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(temporary)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, train = time.monotonic() + 120, None
    while train is None and time.monotonic() < deadline and process.poll() is None:
        train = _child_running(process.pid, "train.py")
        time.sleep(0.02)
    assert train, "the suite never started train.py"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    left_running = Path(f"/proc/{train}").exists()
    if left_running:  # the test's own orphan: stopped here, not left to other tests
        os.kill(train, signal.SIGKILL)
    assert (process.returncode, stderr.strip()) == (128 + signal.SIGTERM, "terminated")
    assert not left_running, "train.py was left running"
    assert not [p.name for p in temporary.iterdir() if p.name.startswith("tmp")]


def test_a_full_disk_keeps_the_earlier_files_prints_the_figures_and_fails_in_one_line(corpus_file, tmp_path):
    """A real full disk: a small 'tmpfs', filled up, in a private mount namespace (unshare)."""
    suite = [sys.executable, "-m", "benchmarks", "--corpus", str(corpus_file), "--skip", "quality", "data"]
    script = f"""
set -e
mount -t tmpfs -o size=256k tmpfs {tmp_path}/small
mkdir {tmp_path}/small/out
echo earlier > {tmp_path}/small/out/benchmarks.json
dd if=/dev/zero of={tmp_path}/small/fill bs=4k 2> /dev/null || true
set +e
{" ".join(suite)} --out {tmp_path}/small/out > {tmp_path}/stdout.txt 2> {tmp_path}/stderr.txt
echo $? > {tmp_path}/code.txt
cat {tmp_path}/small/out/benchmarks.json > {tmp_path}/after.txt
ls -a {tmp_path}/small/out > {tmp_path}/listing.txt
"""
    (tmp_path / "small").mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    error = (tmp_path / "stderr.txt").read_text()
    assert (tmp_path / "code.txt").read_text().strip() == "2", error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert "could not write" in error and "No space left on device" in error and "printed above" in error
    assert "| figure | measured | target | met |" in (tmp_path / "stdout.txt").read_text()  # the figures came first
    assert (tmp_path / "after.txt").read_text() == "earlier\n"  # not emptied
    assert ".tmp-" not in (tmp_path / "listing.txt").read_text()


def test_without_quality_runs_no_plot_is_claimed_and_an_earlier_one_is_removed(tmp_path):
    (tmp_path / "loss_vs_time.png").write_bytes(b"an earlier run's plot")
    # No --corpus: only the quality runs use one, and the table names none.
    result = run_script("-m", "benchmarks", "--skip", "quality", "data", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Corpus" not in (tmp_path / "benchmarks.md").read_text()
    assert "generation is timed on the quality runs' model: --skip quality skips it too" in result.stdout
    assert not (tmp_path / "loss_vs_time.png").exists()
    wrote = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {tmp_path / 'benchmarks.json'}, {tmp_path / 'benchmarks.md'}"]
    assert f"removed an earlier run's {tmp_path / 'loss_vs_time.png'}" in result.stdout


def test_without_matplotlib_the_suite_says_how_to_install_it_before_measuring(corpus_file, tmp_path):
    without = "import runpy, sys; sys.modules['matplotlib'] = None; runpy.run_module('benchmarks', run_name='__main__')"
    result = run_script("-c", without, "--corpus", str(corpus_file), "--quick", "--out", str(tmp_path))
    assert_clean_error(result, r"matplotlib, which is not installed; pip install -e '\.\[bench\]'")
    assert result.stdout == ""  # nothing measured


def test_the_plot_says_what_its_curves_and_its_time_axis_are():
    run = {"curve": [[10.0, 2.5], [80.0, 2.1]], "eval_tokens": 65536}
    fig = report.draw({"corpus": "c.txt", "quality": [{"minutes": 1.5, "runs": [run]}]})
    (ax,) = fig.axes
    assert ax.get_title() == "Validation loss against training time: c.txt"  # not "wall time"
    assert "start-up and evaluation pauses not counted" in ax.get_xlabel()
    (caption,) = [text.get_text() for text in fig.texts]
    assert "evaluations during training, on 65,536 validation tokens" in caption
    assert "the whole validation text" in caption


def test_budgets_are_finite_positive_and_each_given_once_before_anything_runs(corpus_file):
    for budgets, message in (([0.5, 0.5], "names 0.5 more than once"), ([1.5, 1.50], "names 1.5 more than once"),
                             ([float("nan")], "takes positive numbers of minutes, got nan"),
                             ([float("inf")], "takes .* got inf"), ([1, 0], "takes .* got 0")):  # fmt: skip
        with pytest.raises(UserError, match=f"^--budgets {message}"):
            quality.check_arguments(str(corpus_file), 1, budgets, [], "--budgets")
    result = run_script("-m", "benchmarks", "--corpus", str(corpus_file), "--budgets", "nan", "--out", "/nonexistent")
    assert_clean_error(result, "^error: --budgets takes positive numbers of minutes, got nan$")


def test_a_corpus_too_small_or_empty_is_refused_up_front_by_its_flag(tmp_path):
    empty, blank, short = tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "short.txt"
    empty.write_text("")
    blank.write_text("  \n\n \n")
    short.write_text("Some words, but not many.\n" * 5)  # 130 bytes
    for corpus in (empty, blank):
        with pytest.raises(UserError, match=f"^--corpus {corpus} has no text"):
            quality.check_arguments(str(corpus), 1, [1], [], "--budgets")
    tiny = ["--preset", "tiny", "--max-steps", "2"]  # a 64-token window: 117 bytes make one
    assert quality.check_arguments(str(short), 1, [1], tiny, "--budgets") == short
    with pytest.raises(UserError, match=f"^--corpus {short} is too small for these runs: .* 256 tokens; give a longer"):
        quality.check_arguments(str(short), 1, [1], [], "--budgets")  # the cpu preset's 256-token window
    with pytest.raises(UserError, match="one training window of 500 tokens"):
        quality.check_arguments(str(short), 1, [1], [*tiny, "--context", "500"], "--budgets")


def test_a_corpus_that_tokenizes_too_short_is_told_about_corpus_not_the_suites_temporary_files(tmp_path):
    corpus = tmp_path / "repeats.txt"
    corpus.write_text("ab" * 400)  # 720 bytes to train on, but BPE makes them a few tokens
    flags = ["--preset", "tiny", "--max-steps", "2"]
    with pytest.raises(UserError) as refused:
        quality.measure(corpus, [1], 1, flags, tmp_path)
    message = str(refused.value)
    assert "train.txt" not in message and "--context" not in message, message
    assert message.startswith("train.py failed: the training text is shorter than one window of 64 tokens; "
                              f"give a longer --corpus than {corpus}")  # fmt: skip


def test_corpus_tinyshakespeare_is_downloaded_into_the_data_cache_or_refused_in_one_line_offline(tmp_path):
    # The README's benchmark commands name it, so they work in a fresh clone.
    readme = (ROOT / "README.md").read_text().split("## Benchmarks", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].split() for line in readme.splitlines() if "python -m benchmarks" in line]
    assert commands and all(words[words.index("--corpus") + 1] == "tinyshakespeare" for words in commands)
    program = (
        "import sys; from benchmarks.quality import resolve_corpus; from model.errors import run_cli; "
        "run_cli(lambda: print(resolve_corpus('tinyshakespeare', sys.argv[1])))"
    )
    proxy = "http://127.0.0.1:9"  # nothing listens there: as good as no network
    result = run_script("-c", program, str(tmp_path), env={"https_proxy": proxy, "HTTPS_PROXY": proxy})
    assert_clean_error(result, "^error: could not download https://.*tinyshakespeare.*check your connection")
    assert not list(tmp_path.iterdir())


def test_train_flags_are_split_as_a_shell_splits_them(corpus_file, tmp_path):
    result = run_script("-m", "benchmarks.quality", "--corpus", str(corpus_file), "--train-flags", "--preset 'tiny",
                        "--out", str(tmp_path))  # fmt: skip
    assert_clean_error(result, "^error: --train-flags cannot be split as a shell would \\(No closing quotation\\)")


def test_medians_leave_out_runs_without_an_mfu_and_the_table_says_which_step_was_scored():
    runs = [
        {"bpb": 2.0, "wall_seconds": 90, "mfu": 0.40, "tokens_per_sec": 9000, "steps": 500, "scored_step": 500},
        {"bpb": 2.1, "wall_seconds": 95, "mfu": None, "tokens_per_sec": None, "steps": 480, "scored_step": 450},
        {"bpb": 2.2, "wall_seconds": 99, "mfu": 0.50, "tokens_per_sec": 11000, "steps": 510, "scored_step": 510},
    ]
    summary = quality.summarise(runs)
    assert summary["median_mfu"] == 0.45 and summary["median_tokens_per_sec"] == 10000  # not 0.40 and 9000
    assert quality.summarise(runs[1:2])["median_mfu"] is None
    for run in runs:
        run["model"] = "1.7M parameters"
    (row,) = quality.table([{"minutes": 1.5, "runs": runs, **summary}]).splitlines()[2:]
    assert "| 500, 480 (scored at 450), 510 | 45% |" in row


def test_the_first_token_target_is_the_one_in_targets(monkeypatch):
    monkeypatch.setitem(report.TARGETS, "first_token_ms", 20)
    generation = {"first_token_ms": 30.0, "prompt_bytes": 1000}
    (row,) = report.rows({"generation": generation})
    assert row == ("time to first token, 1000-byte prompt (ms)", "30", "<= 20", "no")


def test_data_speed_takes_finite_sizes_of_a_useful_minimum_and_tells_a_failed_preparation_in_one_line(tmp_path):
    for megabytes, prepare, message in (([1], float("nan"), "--prepare-megabytes .* got nan"),
                                        ([float("inf")], 1, "--megabytes .* got inf"),
                                        ([1], 1e-7, "--prepare-megabytes takes sizes of 0.01 MB or more .* got 1e-07")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            data_speed.check_sizes(megabytes, prepare)
    result = run_script("-m", "benchmarks.data_speed", "--prepare-megabytes", "nan", timeout=60)
    assert_clean_error(result, "^error: --prepare-megabytes takes sizes of 0.01 MB or more")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match=f"^preparing empty.txt failed: {empty} has no text; give a corpus") as failed:
        data_speed.prepare_seconds_and_peak(empty, tmp_path / "cache")
    assert "\n" not in str(failed.value)


def test_the_load_test_refuses_a_url_nothing_answers_at_in_one_line(tmp_path):
    result = run_script("-m", "benchmarks.load", "--url", "http://127.0.0.1:1/", "--users", "1", "--seconds", "2",
                        "--out", str(tmp_path / "load.json"), timeout=120)  # fmt: skip
    assert_clean_error(result, "^error: cannot reach the chat UI at http://127.0.0.1:1/ .*Connection refused")
    assert not (tmp_path / "load.json").exists()


def test_the_server_memory_peak_counts_the_reading_at_the_end():
    figures = load.memory_figures([(0.5, 300.0), (4.0, 320.0), (8.0, 315.0)], seconds=10, end=330.0)
    assert figures == {"server_mb_settled": 320.0, "server_mb_end": 330.0, "server_mb_peak": 330.0,
                       "server_mb_growth": 10.0}  # fmt: skip


def step_arguments(**typed) -> argparse.Namespace:
    values = dict(n_layer=5, n_embd=None, dropout=None, context=256, batch_size=16, vocab_size=2048, steps=8, rounds=4)
    return argparse.Namespace(**{**values, **typed})


def test_the_step_benchmark_times_the_budget_rules_model_and_refuses_what_train_py_refuses():
    default = step.model_config(step_arguments())
    assert (default.n_layer, default.n_embd, default.n_head, default.dropout) == (5, 320, 5, 0.2)  # README's 5 x 320
    assert step.model_config(step_arguments(n_layer=4)).dropout == 0.1  # the Zen 4's 5-minute 4 x 256
    with pytest.raises(UserError, match="^--n-embd 65 does not split into 1 heads of an even size"):
        step.model_config(step_arguments(n_embd=65))
    with pytest.raises(UserError, match="^--n-embd 200 does not split into 3 heads"):
        step.model_config(step_arguments(n_embd=200))
    with pytest.raises(UserError, match=r"^--dropout must be in \[0, 1\), got 1.5"):
        step.model_config(step_arguments(dropout=1.5))


@pytest.mark.parametrize("tool, name", [("benchmarks.step", "step.json"), ("benchmarks.load", "load.json")])
def test_the_default_out_is_in_the_repository_wherever_the_command_runs(tool, name, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "COLUMNS": "500"}
    result = run_script("-m", tool, "--help", cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"(default: {ROOT / 'benchmarks' / 'results' / name})" in result.stdout
