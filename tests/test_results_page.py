"""The results page: a benchmark rewrites its own section, keeps the others, names the machine."""
import argparse
import sys

import pytest

from distzo2_lab.bench.results import (
    RESULTS_PATH,
    add_results_option,
    machine_line,
    printed_to_results,
    write_section,
)


def test_write_section_replaces_its_section_and_keeps_the_others(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nintro stays\n")
    write_section("efficiency", "| a |\n|---|\n| 1 |", str(page))
    write_section("planner", "planner table", str(page))
    write_section("efficiency", "| a |\n|---|\n| 2 |", str(page), command="python benchmarks/efficiency.py")
    text = page.read_text()
    assert "intro stays" in text and "planner table" in text
    assert "| 2 |" in text and "| 1 |" not in text
    assert text.count("<!-- results:efficiency -->") == 1 and text.count("<!-- /results:efficiency -->") == 1
    assert "`python benchmarks/efficiency.py`" in text


def test_each_section_names_the_machine_it_was_measured_on(tmp_path):
    page = tmp_path / "results.md"
    write_section("offload", "table", str(page))
    section = page.read_text().split("<!-- results:offload -->")[1]
    line = machine_line()
    assert line.startswith("Machine: ") and "cores" in line and "torch " in line
    assert line.split(";")[0] in section


def test_section_name_with_markup_is_refused(tmp_path):
    with pytest.raises(ValueError, match="results section name"):
        write_section("a -->", "x", str(tmp_path / "r.md"))


def test_results_option_is_off_by_default_and_takes_an_optional_path():
    p = argparse.ArgumentParser()
    add_results_option(p)
    assert p.parse_args([]).results is None
    assert p.parse_args(["--results"]).results == RESULTS_PATH
    assert p.parse_args(["--results", "x.md"]).results == "x.md"


def test_printed_table_goes_into_the_page_without_its_json_lines(tmp_path, monkeypatch, capsys):
    page = tmp_path / "results.md"
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--quick"])
    with printed_to_results("x", str(page)):
        print("col  value")
        print('{"json": 1}')
    assert "col  value" in capsys.readouterr().out
    text = page.read_text()
    assert "col  value" in text and '"json"' not in text and "--quick" in text


def test_nothing_is_written_without_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with printed_to_results("x", None):
        print("table")
    assert list(tmp_path.iterdir()) == []
