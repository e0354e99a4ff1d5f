"""Attention-backend tests: run Triton kernels through its interpreter when there is no GPU, and print at the
end of the run which backends of the matrix ran and which were skipped, with their reasons."""

from __future__ import annotations

import os
import re
from collections import defaultdict

import torch

# Must be set before Triton defines the kernels (it decides at decoration time); a GPU run uses the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_MATRIX = "test_backend_matrix.py::test_backend_matrix"
_results: dict[str, dict[str, object]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skips": 0,
                                                                   "skipped": defaultdict(int)})


def pytest_runtest_logreport(report):
    if _MATRIX not in report.nodeid:
        return
    match = re.search(r"\[([A-Z0-9_]+)-", report.nodeid)
    if not match:
        return
    entry = _results[match.group(1)]
    if report.when == "call" and report.passed:
        entry["passed"] += 1
    elif report.failed:
        entry["failed"] += 1
    elif report.skipped:
        entry["skips"] += 1
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for part in reason.removeprefix("Skipped: ").split("; "):
            entry["skipped"][part] += 1


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    tr = terminalreporter
    tr.section("attention backend matrix")
    for name in sorted(_results):
        entry = _results[name]
        tr.write_line(f"{name}: {entry['passed']} passed, {entry['failed']} failed, {entry['skips']} skipped")
        for reason, count in sorted(entry["skipped"].items(), key=lambda kv: -kv[1]):
            tr.write_line(f"    {count:3d}x {reason}")
