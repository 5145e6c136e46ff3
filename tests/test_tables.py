"""Terminal tables: compact cells, columns shared by every row, and splitting a wide table to fit."""

from __future__ import annotations

from datetime import datetime, timezone

from launch.views import tables


def test_short_cells_round_floats_and_times_and_keep_the_rest() -> None:
    assert tables.short_cell(65.45000076293945) == "65.45"
    assert tables.short_cell(0.0643778145313263) == "0.06438"
    assert tables.short_cell(123456.7) == "123457"
    assert tables.short_cell(float("nan")) == "nan"
    assert tables.short_cell(500) == "500" and tables.short_cell(None) == "-" and tables.short_cell(True) == "True"
    assert tables.short_cell(datetime(2026, 11, 26, 11, 59, 45, 602000, tzinfo=timezone.utc)) == "2026-11-26 11:59:45"


def test_constant_columns_are_those_after_start_with_one_value() -> None:
    rows = [["a", "x", "1", "same"], ["b", "x", "2", "same"]]
    assert tables.constant_columns(rows, start=1) == [1, 3]
    assert tables.constant_columns(rows, start=2) == [3]
    assert tables.constant_columns(rows[:1], start=0) == []  # one row: nothing is "shared"


def test_column_chunks_fit_the_width_and_lead_with_the_kept_columns() -> None:
    widths = [10, 8, 20, 20, 20, 20, 5]
    chunks = tables.column_chunks(widths, keep=2, width=80)
    assert all(c[:2] == [0, 1] for c in chunks)
    assert [i for c in chunks for i in c[2:]] == list(range(2, 7))  # every column once, in order
    assert all(tables.table_width([widths[i] for i in c]) <= 80 for c in chunks)
    assert chunks == [[0, 1, 2, 3], [0, 1, 4, 5, 6]]  # 71 and 79 characters wide
    assert tables.column_chunks([10, 8, 200], keep=2, width=80) == [[0, 1, 2]]  # too wide alone: its own table
    assert tables.column_chunks([10, 8], keep=2, width=80) == [[0, 1]]
