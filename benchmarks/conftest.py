"""Readable benchmark output: one pytest-benchmark group per operation and shape (so its "(1.0)"
ratios compare backends of the same operation), a narrower default table, and at the end a short
summary of each backend's median against the reference backend measured in the same run:

    op                                  shape             backend     median ms   x reference
    hj_residual_forward_backward        d16-w128-n4096    reference        43.2          1.00
                                                          torch            27.7          1.56

Flags given on the command line (--benchmark-columns, --benchmark-sort, --benchmark-group-by)
win over these defaults.
"""
from __future__ import annotations

import pytest

# pytest-benchmark's default columns (ten, ~230 characters wide) and sort order
_DEFAULT_COLUMNS = ["min", "max", "mean", "stddev", "median", "iqr", "outliers", "ops", "rounds",
                    "iterations"]
_COLUMNS = ["min", "median", "max", "iqr", "rounds"]
_MEDIANS: list[tuple[str, str, str, float]] = []  # (operation, shape, backend, median seconds)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Before pytest-benchmark reads its options: groups and a narrow table unless chosen."""
    option = config.option
    if getattr(option, "benchmark_columns", None) == _DEFAULT_COLUMNS:
        option.benchmark_columns = list(_COLUMNS)
    if getattr(option, "benchmark_sort", None) == "min":
        option.benchmark_sort = "name"  # within a group: the backends in a fixed order


def _operation(item) -> tuple[str, str, str]:
    """(operation, the other parameters' id, backend) of a benchmark test item."""
    op = item.originalname.removeprefix("test_")
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return op, "", ""
    backend = str(callspec.params.get("backend", ""))
    # the id without the backend's token ("torch-ops" holds a dash itself, hence not a split)
    rest = f"-{callspec.id}-".replace(f"-{backend}-", "-", 1).strip("-") if backend else callspec.id
    return op, rest, backend


@pytest.fixture(autouse=True)
def _group_per_operation(request):
    """Put each benchmark in the group of its operation and shape; record its median."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    op, shape, backend = _operation(request.node)
    benchmark.group = f"{op} {shape}".strip()
    yield
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _MEDIANS.append((op, shape, backend, stats.stats.median))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    write = terminalreporter.write_line
    write("")
    write("per operation: median of each backend, and the reference's median / its median "
          "(> 1: faster than reference), all from this run")
    write(f"{'op':<34} {'shape':<18} {'backend':<12} {'median ms':>10} {'x reference':>12}")
    groups: dict[tuple[str, str], list] = {}
    for op, shape, backend, median in _MEDIANS:
        groups.setdefault((op, shape), []).append((backend, median))
    for (op, shape), rows in groups.items():
        ref = dict(rows).get("reference")
        for k, (backend, median) in enumerate(rows):
            ratio = f"{ref / median:12.2f}" if ref else f"{'-':>12}"
            write(f"{op if k == 0 else '':<34} {shape if k == 0 else '':<18} {backend:<12} "
                  f"{median * 1e3:10.3f} {ratio}")
