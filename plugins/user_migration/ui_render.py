"""The migration page as one HTML document: tables and inline SVG charts, no script, no CDN.

Rendered on the server from ``ui_data.page_data`` (figures only), so the page needs nothing but the
browser's own request: it loads in the Airflow UI's iframe with the session's cookie, and refreshes
itself every few seconds while the run is copying. Every value is escaped. No Airflow import.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any
from urllib.parse import urlencode

REFRESH_SECONDS = 5
HISTORY_SERIES = (
    ("inserted", "#2f855a"),
    ("updated", "#3182ce"),
    ("removed", "#c05621"),
    ("rejected", "#c53030"),
)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1a202c;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse;margin:4px 0}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#4a5568;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#718096}.ok{color:#2f855a;font-weight:600}.bad{color:#c53030;font-weight:600}
.warn{color:#b7791f;font-weight:600}.grid{display:flex;flex-wrap:wrap;gap:32px}
.bar{width:220px;height:12px;background:#edf2f7;border-radius:3px;overflow:hidden}
.bar>div{height:100%;background:#3182ce}.bar.done>div{background:#2f855a}.bar.failed>div{background:#c53030}
.pill{display:inline-block;padding:0 8px;border-radius:10px;background:#edf2f7}
a{color:#2b6cb0}
"""


def render(data: dict[str, Any], page_url: str, dag_id: str | None = None) -> str:
    """The whole page. ``page_url``: this page's path (links to other runs add ?run_id=)."""
    run = data.get("run")
    refresh = bool(run and run.get("found") and (run["copying"] or run["state"] == "running"))
    head = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        + (f"<meta http-equiv=refresh content={REFRESH_SECONDS}>" if refresh else "")
        + f"<title>User migration</title><style>{STYLE}</style></head><body>"
    )
    parts = [head, "<h1>User migration</h1>"]
    if dag_id and dag_id != "user_migration":
        parts.append(
            f"<p class=muted>{escape(dag_id)} makes no migration passes; this page shows user_migration's.</p>"
        )
    if not data.get("audit"):
        parts.append("<p>No pass has run yet: migration_audit does not exist in the target database.</p>")
        return "".join([*parts, "</body></html>"])
    parts.append(_run_header(run, data, refresh))
    found = bool(run and run.get("found"))
    if found:
        parts.append(_partitions(run))
    parts.append(
        "<div class=grid>"
        + (f"<div>{_reconciliation(run)}</div>" if found else "")
        + f"<div>{_readiness(data['readiness'])}</div></div>"
    )
    if found:
        parts.append(_rejects_and_fixes(run))
    parts.append(_history(data["history"], page_url))
    parts.append("<p class=muted>Counts and states only: no username, email, phone or password hash.</p>")
    return "".join([*parts, "</body></html>"])


def _run_header(run: dict[str, Any] | None, data: dict[str, Any], refresh: bool) -> str:
    if run is None:
        return "<p>No run of user_migration is on record yet.</p>"
    if not run.get("found"):
        return f"<p>Run <b>{escape(run['run_id'])}</b> is not in migration_audit (it made no pass).</p>"
    state = run["state"]
    css = {"success": "ok", "failed": "bad"}.get(state, "warn")
    return (
        f"<p>Run <b>{escape(run['run_id'])}</b> <span class={css}>{escape(state)}</span>"
        + (" <span class=pill>dry run</span>" if run["dry_run"] else "")
        + f" · started {_time(run['started_at'])}"
        + (f" · finished {_time(run['finished_at'])}" if run["finished_at"] else "")
        + (f" <span class=muted>· refreshes every {REFRESH_SECONDS} s</span>" if refresh else "")
        + f"<br><span class=muted>as of {_time(data['now'])}</span></p>"
    )


def _partitions(run: dict[str, Any]) -> str:
    rows = []
    for p in run["partitions"]:
        state = p["state"]
        label = state + (" (no batch for a while: paused?)" if p["stalled"] else "")
        planned = p["rows_planned"]
        planned_text = "?" if planned is None else ("≈" if p["planned_estimated"] else "") + _n(planned)
        rows.append(
            "<tr>"
            f"<td>{p['partition_no']}</td><td class=muted>ids {p['lo_id']}..{p['hi_id']}</td>"
            f"<td>{escape(label)}</td>"
            f"<td><div class='bar {escape(state)}'><div style='width:{p['share'] * 100:.1f}%'></div></div></td>"
            f"<td class=n>{_n(p['rows_done'])} of {planned_text}</td>"
            f"<td class=n>{_rate(p['rows_per_second'])}</td>"
            f"<td class=n>{_duration(p['seconds_left']) if state == 'running' else ''}</td>"
            f"<td class=muted>{escape(p['path'] or '')}</td>"
            f"<td class=n>{p['attempts']}</td>"
            "</tr>"
        )
    if not rows:
        return "<h2>Partitions</h2><p class=muted>Not planned yet.</p>"
    return (
        "<h2>Partitions</h2><table id=partitions><tr><th>#</th><th>range</th><th>state</th><th>progress</th>"
        "<th>rows done</th><th>rows/s</th><th>time left</th><th>path</th><th>attempts</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _rejects_and_fixes(run: dict[str, Any]) -> str:
    rec = run["reconciliation"] or {}
    rejects = rec.get("rejected_by_reason") or {}
    fixes = rec.get("fixed_by_field") or {}
    return (
        "<div class=grid><div><h2>Rejects by reason</h2>"
        + (_hbars(rejects, "#c53030", "rejects") if rejects else "<p class=muted>None in this pass.</p>")
        + "</div><div><h2>Field fixes</h2>"
        + (_hbars(fixes, "#3182ce", "fixes") if fixes else "<p class=muted>None in this pass.</p>")
        + "</div></div>"
    )


def _reconciliation(run: dict[str, Any]) -> str:
    rec = run["reconciliation"]
    if rec is None:
        return "<h2>Reconciliation</h2><p class=muted>The run has no plan yet.</p>"
    accounted = rec["migrated"] + rec["rejected"] == rec["rows_read"]
    checks = run["checks"]
    passed = sum(1 for c in checks if c["success"])
    failed = [c["expectation"] for c in checks if not c["success"]]
    rows = [
        ("rows planned", _n(rec["planned_rows"])),
        ("rows read", _n(rec["rows_read"])),
        ("migrated", _n(rec["migrated"])),
        ("rejected", _n(rec["rejected"])),
        ("every row accounted for", _accounted(rec, accounted)),
        (
            "changes",
            " · ".join(f"{k} {_n(rec[k])}" for k in ("inserted", "updated", "unchanged", "removed")),
        ),
        ("fixed fields", _n(rec["fixed_fields"])),
        ("changes found by", escape(f"{rec['changes'] or '?'} ({rec['changes_reason'] or ''})")),
        ("partitions done", f"{rec['partitions_done']} of {rec['partitions']}"),
        (
            "checks",
            (
                f"<span class={'ok' if not failed else 'bad'}>{passed}/{len(checks)} passed</span>"
                if checks
                else "<span class=muted>not validated yet</span>"
            )
            + (" · failed: " + escape(", ".join(failed)) if failed else ""),
        ),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<h2>Reconciliation</h2><table id=reconciliation>{body}</table>"


def _accounted(rec: dict[str, Any], accounted: bool) -> str:
    """Whether read = migrated + rejected; only said once every partition is done."""
    if rec["partitions_done"] < rec["partitions"]:
        return f"<span class=warn>not yet: {rec['partitions_done']} of {rec['partitions']} partitions done</span>"
    return "<span class=ok>yes</span>" if accounted else "<span class=bad>no</span>"


def _history(history: list[dict[str, Any]], page_url: str) -> str:
    if not history:
        return "<h2>Passes</h2><p class=muted>None yet.</p>"
    legend = " ".join(
        f"<span><svg width=10 height=10><rect width=10 height=10 fill='{c}'/></svg> {k}</span>"
        for k, c in HISTORY_SERIES
    )
    rows = []
    for h in reversed(history):
        link = f"{escape(page_url)}?{escape(urlencode({'run_id': h['run_id']}))}"
        rows.append(
            f"<tr><td><a href='{link}'>{escape(h['run_id'])}</a></td><td>{escape(h['state'])}"
            + (" (dry run)" if h["dry_run"] else "")
            + f"</td><td class=muted>{_time(h['started_at'])}</td>"
            + "".join(f"<td class=n>{_n(h[k])}</td>" for k, _ in HISTORY_SERIES)
            + "</tr>"
        )
    return (
        f"<h2>Passes</h2><div>{legend}</div>{_grouped_bars(history)}"
        "<table id=history><tr><th>run</th><th>state</th><th>started</th>"
        + "".join(f"<th>{k}</th>" for k, _ in HISTORY_SERIES)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def _readiness(r: dict[str, Any]) -> str:
    items = [
        _last_validation_item(r["last_validation"]),
        _last_pass_item(r["last_pass"]),
        _lease_item(r["lease"]),
        _throttle_item(r["throttle"]),
        _cutover_item(r["cutovers"]),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in items)
    table = f"<h2>Cutover readiness</h2><table id=readiness>{body}</table>"
    if r["cutovers"]:
        table += _cutovers_table(r["cutovers"])
    return table


def _last_validation_item(v: dict[str, Any] | None) -> tuple[str, str]:
    if not v:
        return ("last validation", "<span class=warn>none yet</span>")
    ok = v["passed"] == v["checks"]
    return (
        "last validation",
        f"<span class={'ok' if ok else 'bad'}>{v['passed']}/{v['checks']} checks passed</span> "
        f"<br><span class=muted>{escape(v['run_id'])}, {_time(v['validated_at'])}</span>"
        + ("" if ok else " · failed: " + escape(", ".join(v["failed"]))),
    )


def _last_pass_item(p: dict[str, Any] | None) -> tuple[str, str]:
    if not p:
        return ("last pass's delta", "<span class=warn>no successful pass yet</span>")
    delta = " · ".join(f"{k} {_n(p[k])}" for k, _ in HISTORY_SERIES)
    quiet = not any(p[k] for k in ("inserted", "updated", "removed"))
    return (
        "last pass's delta",
        f"{delta}<br><span class=muted>{escape(p['run_id'])}</span>"
        + (" <span class=ok>no change</span>" if quiet else ""),
    )


def _lease_item(lease: dict[str, Any] | None) -> tuple[str, str]:
    return (
        "writer lease",
        f"held by {escape(lease['run_id'])} ({escape(lease['dag_id'] or '')} on {escape(lease['hostname'] or '?')}), "
        f"since {_time(lease['acquired_at'])}, renewed {_time(lease['renewed_at'])}"
        if lease
        else "<span class=ok>free</span>",
    )


def _throttle_item(t: dict[str, Any]) -> tuple[str, str]:
    return (
        "throttle",
        escape(t["state"]) + (f", {t['sleep_ms']} ms between batches" if t["state"] == "slow" else ""),
    )


def _cutover_item(cutovers: list[dict[str, Any]]) -> tuple[str, str]:
    live = [c for c in cutovers if c["state"] in ("active", "switching")]
    return (
        "cutover",
        f"<span class=warn>{escape(live[0]['state'])}</span> since {_time(live[0]['cut_at'])}"
        if live
        else "none active (the legacy tables are written)",
    )


def _cutovers_table(cutovers: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{c['id']}</td><td>{escape(c['run_id'])}</td><td>{escape(c['state'])}</td>"
        f"<td>{_time(c['cut_at'])}</td><td class=n>{_n(c['source_rows'])}</td><td class=n>{_n(c['target_rows'])}</td>"
        f"<td class=n>{_n(c['rejected_rows'])}</td>"
        f"<td>{'<span class=ok>match</span>' if c['checksums_match'] else '<span class=bad>differ</span>'}</td>"
        f"<td class=n>{c['pause_seconds']:.2f} s</td><td>{_time(c['rolled_back_at']) if c['rolled_back_at'] else ''}</td></tr>"
        for c in cutovers
    )
    return (
        "<h2>Cutovers and rollbacks</h2><table id=cutovers><tr><th>#</th><th>run</th><th>state</th>"
        "<th>cut at</th><th>legacy rows</th><th>target rows</th><th>rejected</th><th>checksums</th>"
        f"<th>write pause</th><th>rolled back at</th></tr>{rows}</table>"
    )


# --- charts ----------------------------------------------------------------------------------------


def _hbars(values: dict[str, int], color: str, what: str) -> str:
    """A horizontal bar chart of ``values`` (label -> count), largest first."""
    items = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    top = max(v for _, v in items) or 1
    label_w, bar_w, row_h = 230, 260, 22
    height = row_h * len(items) + 4
    out = [f"<svg class=chart role=img aria-label='{what}' width={label_w + bar_w + 70} height={height}>"]
    for i, (label, value) in enumerate(items):
        y = i * row_h + 2
        w = max(value / top * bar_w, 1)
        out.append(
            f"<text x={label_w - 6} y={y + 15} text-anchor=end font-size=12>{escape(label)}</text>"
            f"<rect x={label_w} y={y + 3} width={w:.1f} height={row_h - 8} fill='{color}'>"
            f"<title>{escape(label)}: {value}</title></rect>"
            f"<text x={label_w + w + 6:.1f} y={y + 15} font-size=12>{_n(value)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _grouped_bars(history: list[dict[str, Any]]) -> str:
    """Per pass (oldest left), a group of bars: inserted, updated, removed, rejected."""
    width, height, pad_l, pad_b = 760, 200, 50, 34
    top = max((h[k] or 0 for h in history for k, _ in HISTORY_SERIES), default=0) or 1
    group = (width - pad_l) / max(len(history), 1)
    bar = max(min(group / (len(HISTORY_SERIES) + 1), 16), 1)
    plot_h = height - pad_b - 8
    out = [
        f"<svg class=chart role=img aria-label='passes' width={width} height={height}>",
        f"<line x1={pad_l} y1={plot_h + 8} x2={width} y2={plot_h + 8} stroke='#a0aec0'/>",
        f"<text x={pad_l - 6} y=14 text-anchor=end font-size=11>{_n(top)}</text>",
        f"<text x={pad_l - 6} y={plot_h + 8} text-anchor=end font-size=11>0</text>",
    ]
    for i, h in enumerate(history):
        x0 = pad_l + i * group + (group - bar * len(HISTORY_SERIES)) / 2
        for j, (key, color) in enumerate(HISTORY_SERIES):
            value = h[key] or 0
            bh = value / top * plot_h
            if value:
                bh = max(bh, 1.5)
            out.append(
                f"<rect x={x0 + j * bar:.1f} y={plot_h + 8 - bh:.1f} width={bar - 1:.1f} height={bh:.1f} "
                f"fill='{color}'><title>{escape(h['run_id'])} {key}: {value}</title></rect>"
            )
        if len(history) <= 12 or i % max(len(history) // 12, 1) == 0:
            out.append(
                f"<text x={pad_l + i * group + group / 2:.1f} y={height - 18} text-anchor=middle font-size=10>"
                f"{escape(_short(h['run_id']))}</text>"
            )
    out.append("</svg>")
    return "".join(out)


# --- formatting ------------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return "–" if value is None else f"{value:,}"


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _time(value: str | None) -> str:
    if not value:
        return ""
    try:
        when = dt.datetime.fromisoformat(value).astimezone(dt.UTC)
    except ValueError:
        return escape(value)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(run_id: str) -> str:
    return run_id if len(run_id) <= 14 else run_id[:13] + "…"
