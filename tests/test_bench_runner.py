"""The benchmark runner: report sections, targets, JSON, PNG, and failures reported, not fatal."""

import json
import struct
import sys

from decodekit.bench.run_all import BENCHMARKS, build_parser, run
from decodekit.bench.targets import TARGETS, check


def test_runner_writes_report_and_survives_a_failing_script(tmp_path):
    args = build_parser().parse_args(["--quick", "--out", str(tmp_path), "--package", "tests.bench_stubs",
                                      "--only", "throughput", "speculative"])
    results = run(args, command="decodekit bench --quick")
    assert results["throughput"]["error"] is None and results["throughput"]["summary"]["quick"] is True
    assert "draft model exploded on purpose" in results["speculative"]["error"]
    report = (tmp_path / "REPORT.md").read_text()
    for section in ("## Targets", "## throughput", "## speculative", "**failed**", "torch", "decodekit bench --quick"):
        assert section in report
    assert "| throughput | tokens/s vs transformers, batch 8 | >= 1.0x | 0.9 | missed |" in report
    assert "| throughput | shared-prefix prefill tokens saved | >= 0.80 | 0.85 | met |" in report
    assert "![throughput_plot](throughput_plot.png)" in report
    assert json.loads((tmp_path / "throughput.json").read_text())["machine"]["torch"]
    assert json.loads((tmp_path / "summary.json").read_text())["speculative"] is None
    png = (tmp_path / "throughput_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 0


def test_every_benchmark_has_targets_and_missing_fields_are_reported():
    assert {t.bench for t in TARGETS} == set(BENCHMARKS)
    rows = check("tree_rollout", {"bench": "tree_rollout", "wall_ratio": 0.5})
    assert ("wall-clock, tree / independent", "<= 0.75", "0.5", "met") in rows
    assert any(verdict.startswith("missing field") for *_, verdict in rows)
    assert all(verdict == "not run" for *_, verdict in check("server_load", None))


def test_entropy_and_speculative_targets():
    points = {"points": [{"threshold": 1.0, "large_share": 0.4, "quality_ratio": 0.97, "wall_ratio_vs_large": 0.8},
                         {"threshold": 3.0, "large_share": 0.1, "quality_ratio": 0.5, "wall_ratio_vs_large": 0.5}]}
    assert check("entropy_switch", points)[0][3] == "met"
    spec = {"mean_speedup": {"ngram": 1.7, "int8": 1.2}, "speedup_vs_hf_assisted": {"ngram": 1.1},
            "greedy_identical": True}
    verdicts = [r[3] for r in check("speculative", spec)]
    assert verdicts == ["met", "missed", "met"]


def test_cli_exposes_bench(monkeypatch):
    from decodekit.cli import build_parser as cli_parser

    args = cli_parser().parse_args(["bench", "--quick", "--only", "throughput"])
    assert args.quick and args.only == ["throughput"] and args.command == "bench"
    assert sys.executable


def test_keep_merges_earlier_results_and_missing_venv_is_reported(tmp_path, monkeypatch):
    import decodekit.bench.run_all as run_all

    base = ["--quick", "--out", str(tmp_path), "--package", "tests.bench_stubs"]
    run(build_parser().parse_args([*base, "--only", "throughput"]), command="first")
    run(build_parser().parse_args([*base, "--only", "speculative", "--keep"]), command="second")
    report = (tmp_path / "REPORT.md").read_text()
    assert "## throughput" in report and "## speculative" in report
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["throughput"]["summary"]["quick"] is True and stored["speculative"]["error"]
    assert stored["throughput"]["date"]

    monkeypatch.setattr(run_all, "ROOT", tmp_path)  # no .venv-peers there
    result = run_all.run_script("constraint_peers", build_parser().parse_args(["--out", str(tmp_path)]))
    assert result["summary"] is None and "make setup-peers" in result["error"]


def test_interleaved_alternates_order_and_paired_ratio_cancels_drift():
    from decodekit.bench.common import interleaved, paired_ratio

    calls = []
    runs = interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and runs == {"a": [1] * 4, "b": [2] * 4}
    calls.clear()
    assert interleaved({"a": lambda: calls.append("a") or 1}, 2, warmup=1) == {"a": [1, 1]} and len(calls) == 3
    machine_speed = [1.0, 0.5, 1.0, 0.4, 1.0]  # the machine slows down in some rounds, both runs alike
    fast = [100 * s for s in machine_speed]
    slow = [90 * s for s in machine_speed]
    assert abs(paired_ratio(slow, fast) - 0.9) < 1e-9


def test_rebuild_writes_the_report_from_each_scripts_results_file(tmp_path):
    base = ["--quick", "--out", str(tmp_path), "--package", "tests.bench_stubs"]
    run(build_parser().parse_args([*base, "--only", "throughput"]), command="first")
    record = json.loads((tmp_path / "throughput.json").read_text())
    record["ratio_bs8"] = 1.23  # as if the script had been re-run on its own
    (tmp_path / "throughput.json").write_text(json.dumps(record))
    results = run(build_parser().parse_args([*base, "--rebuild"]), command="rebuilt")
    assert set(results) == {"throughput"}  # nothing ran: only scripts with a results file
    summary = json.loads((tmp_path / "summary.json").read_text())["throughput"]
    assert summary["ratio_bs8"] == 1.23 and "details" not in summary and "machine" not in summary
    assert "(from throughput.json)" in (tmp_path / "REPORT.md").read_text()
