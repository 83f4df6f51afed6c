"""BENCHMARKS.md is joined from the sections the benchmarks write: each section says how and where
its figures were measured, the order is fixed, and a section never written says how to write it."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import results, write_benchmarks


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def test_a_section_names_its_command_commit_and_machine_and_links_its_plots(folder: Path) -> None:
    path = results.write_section("scaling", "Scaling", "| L | s |\n|---|---|\n| 10 | 1.0 |", plots=("scaling",))
    text = path.read_text()
    assert path == folder / "scaling.md"
    assert text.startswith("## Scaling\n")
    assert f"at commit {results.commit()}," in text
    assert f"Machine: {results.machine()}; load average" in text
    assert "\n\n| L | s |\n|---|---|\n| 10 | 1.0 |\n" in text  # the table starts after a blank line
    assert "![scaling](benchmarks/results/scaling.png)" in text
    assert [p.name for p in folder.iterdir()] == ["scaling.md"]  # no temporary file left behind


def test_the_file_keeps_the_benchmarks_order_and_says_what_was_never_run(folder: Path, tmp_path: Path) -> None:
    results.write_section("tune", "Tune", "tune body")
    results.write_section("peers", "Peers", "peers body")
    out = tmp_path / "BENCHMARKS.md"
    text = write_benchmarks.assemble({"tune": (1, 12.0)}, out)
    assert out.read_text() == text
    assert text.index("## Peers") < text.index("## Tune")  # BENCHES order, not the order they were written
    assert "| [tune](#tune) |" in text and "exit 1 in 12 s (failed: see its output)" in text
    assert "| [peers](#peers) |" in text and "not run (section kept)" in text
    assert "Not run yet: `python benchmarks/scaling_bench.py`." in text
    assert text.count("<a id=") == len(write_benchmarks.BENCHES)


def test_an_unknown_section_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert write_benchmarks.main(["--only", "tune,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown section nope: use --list to see them"
