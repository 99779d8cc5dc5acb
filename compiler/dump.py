"""IR dumps: ``000_input.txt``, ``{i:03d}_{pass}.txt`` per pass, and an HTML index.

After MLIR's ``--mlir-print-ir-after-all`` and TVM's instrumented pass dumps: the IR after
every pass in numbered files, plus ``index.html`` with one row per pass (changed?, stats,
time, node counts) and a side-by-side diff of what each pass changed.
"""

from __future__ import annotations

import difflib
import html
import re
from pathlib import Path

from kiln.pass_manager import PipelineReport


def _file_name(index: int, name: str) -> str:
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.txt"


def _stats_text(stats: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items()) or "-"


def summary_table(report: PipelineReport) -> str:
    """A fixed-width text table of a pipeline run."""
    rows = [("#", "pass", "changed", "nodes", "time (ms)", "stats")]
    for r in report.records:
        nodes = f"{r.nodes_before} -> {r.nodes_after}"
        changed = "skipped" if r.skipped else ("yes" if r.modified else "no")
        rows.append((str(r.index), r.name, changed, nodes, f"{r.seconds * 1e3:.1f}", _stats_text(r.stats)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"total: {report.seconds * 1e3:.1f} ms")
    return "\n".join(lines)


def write_dump(directory: Path, report: PipelineReport) -> Path:
    """Write the dump files for ``report`` (which must hold IR text) into ``directory``."""
    if report.input_ir is None:
        raise ValueError("the report holds no IR text; run the pass manager with record_ir=True")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "000_input.txt").write_text(report.input_ir)
    previous = report.input_ir
    rows: list[str] = []
    differ = difflib.HtmlDiff(wrapcolumn=110)
    for r in report.records:
        status = "skipped" if r.skipped else ("changed" if r.modified else "unchanged")
        cells = (
            f"<td>{r.index}</td><td>{html.escape(r.name)}</td><td class='{status}'>{status}</td>"
            f"<td>{r.nodes_before} &rarr; {r.nodes_after}</td><td>{r.seconds * 1e3:.1f}</td>"
            f"<td>{html.escape(_stats_text(r.stats))}</td>"
        )
        if r.skipped or r.ir is None:
            rows.append(f"<tr>{cells}<td></td></tr>")
            continue
        name = _file_name(r.index, r.name)
        (directory / name).write_text(r.ir)
        link = f"<a href='{name}'>{name}</a>"
        if r.modified:
            table = differ.make_table(
                previous.splitlines(), r.ir.splitlines(), "before", f"after {r.name}", context=True, numlines=2
            )
            rows.append(f"<tr>{cells}<td>{link}</td></tr><tr><td colspan='7'><details><summary>diff</summary>{table}</details></td></tr>")
        else:
            rows.append(f"<tr>{cells}<td>{link}</td></tr>")
        previous = r.ir
    style = (
        "body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        ".changed{color:#064} .skipped{color:#888} .diff_add{background:#cfc} .diff_chg{background:#ffa}"
        ".diff_sub{background:#fcc} table.diff{font-family:monospace;font-size:12px}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kiln IR dump</title><style>{style}</style></head>"
        f"<body><h1>kiln pipeline</h1><p><a href='000_input.txt'>000_input.txt</a> (captured graph); "
        f"total {report.seconds * 1e3:.1f} ms</p><table><tr><th>#</th><th>pass</th><th>status</th><th>nodes</th>"
        f"<th>ms</th><th>stats</th><th>IR</th></tr>{''.join(rows)}</table></body></html>"
    )
    (directory / "index.html").write_text(page)
    return directory


__all__ = ["summary_table", "write_dump"]
