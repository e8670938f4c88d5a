"""The service tier's table: one row per service, printed after the run and written to
build/service-tier.md (the numbers behind the README's service-tier line)."""

from __future__ import annotations

import os
import statistics

from harness import RESULTS
from support import ROOT

TABLE = os.path.join(ROOT, "build", "service-tier.md")


def _table() -> str:
    rows = ["| service | interpreter | attach s (median, max) | events per cycle | requests ok "
            "| failed requests |", "|---|---|---|---|---|---|"]
    for r in RESULTS:
        attach = ("%.2f, %.2f" % (statistics.median(r.attach_s), max(r.attach_s))
                  if r.attach_s else "never attached")
        rows.append("| %s | %s | %s | %s | %d | %d |" % (
            r.service, r.interpreter, attach, ", ".join(map(str, r.events)) or "-", r.ok,
            r.failed))
    return "\n".join(rows) + "\n"


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not RESULTS:
        return
    table = _table()
    os.makedirs(os.path.dirname(TABLE), exist_ok=True)
    with open(TABLE, "w") as f:
        f.write(table)
    terminalreporter.write_sep("-", "service tier (also in %s)" % os.path.relpath(TABLE, ROOT))
    terminalreporter.write(table)
