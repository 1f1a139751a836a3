"""Rich tables of the event log for people (scripts use --json)."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dr_bridge.eventlog import timeline


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def console() -> Console:
    """Tables for people: 100 columns when piped, so a log or a pager reads the same as a terminal."""
    import sys

    return Console(width=None if sys.stdout.isatty() else 100)


def print_event_list(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no events in the event log")
        return
    t = Table(title="Events", expand=False)
    for col in ("event", "mod", "status", "opt", "start", "end", "dry"):
        t.add_column(col)
    for r in rows:
        t.add_row(Text(r["event_id"]), str(r["modification_number"]), r["status"], _fmt(r["opt"]), _fmt(r["start"]),
                  r["end"] or "open", "yes" if r.get("dry_run") else "")
    console.print(t)


def _clock(at: str | None, day: str) -> str:
    """HH:MM:SS on the event's start day; the date too when a row falls on another day."""
    if at is None:
        return "-"
    return at[11:19] if at[:10] == day else f"{at[:10]} {at[11:19]}"


TIMELINE_ROWS = 300  # more is a wall of text in a terminal (and seconds to draw): --all, --json and export have all


def print_event_detail(console: Console, d: dict[str, Any], all_rows: bool = False) -> None:
    day = d["effective_start"][:10]
    console.print(f"[bold]Event {escape(d['event_id'])}[/bold]  modification {d['modification_number']}  "
                  f"status [bold]{d['status']}[/bold]  answered {d['opt'] or '-'}"
                  + (f" ({escape(d['opt_reason'])})" if d.get("opt_reason") else ""))
    console.print(f"start {d['start']}  effective start {d['effective_start']}  end {d['end'] or 'open-ended'}"
                  f"{'  [yellow]dry run[/yellow]' if d.get('dry_run') else ''}")
    t = Table(title="Intervals", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("start", "end", "signal", "value"):
        t.add_column(col)
    for i in d["intervals"]:
        t.add_row(i["start"], _fmt(i["end"]), Text(f"{i['signal_name']}/{i['signal_type']}"), _fmt(i["value"]))
    console.print(t)
    print_calls(console, d["actions"])
    rows = timeline(d)
    shown = rows if all_rows or len(rows) <= TIMELINE_ROWS else rows[:TIMELINE_ROWS]
    print_timeline(console, shown, day, f"Timeline (UTC, {day}; {len(d['actions']):,} actions)")
    if len(shown) < len(rows):
        console.print(f"… {len(rows) - len(shown):,} more timeline rows: --all shows them, as do --json and "
                      f"`events export`", markup=False, highlight=False, soft_wrap=True)
        print_problems(console, rows, day)
    print_performance(console, d["performance"])


OUTCOMES = ("accepted", "requested", "unanswered", "planned", "dry_run", "rejected", "failed", "skipped")


def print_calls(console: Console, actions: list[dict[str, Any]]) -> None:
    """How many calls of each kind ended how: the whole event at a glance, however many sessions."""
    if not actions:
        return
    counts: dict[str, dict[str, int]] = {}
    for a in actions:
        if a["purpose"] == "limit":
            what = "limit"
        else:
            what = "restore (clear)" if a["kind"] == "clear_power_limit" else "restore (set)"
        by = counts.setdefault(what, {})
        by[a["status"]] = by.get(a["status"], 0) + 1
    seen = {status for by in counts.values() for status in by}
    columns = [o for o in OUTCOMES if o in seen] + sorted(seen - set(OUTCOMES))
    t = Table(title=f"Calls ({len(actions):,})", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("call")
    for c in columns:
        t.add_column(c, justify="right", style="red" if c in ("rejected", "failed") else None)
    for what, by in counts.items():
        t.add_row(what, *(f"{by[c]:,}" if c in by else "" for c in columns))
    console.print(t)


def print_problems(console: Console, rows: list[dict[str, Any]], day: str, limit: int = 100) -> None:
    """The timeline's calls a charger refused or that failed, wherever they fall in one too long to show whole."""
    bad = [r for r in rows if r["kind"] == "action" and r["outcome"] in ("rejected", "failed")]
    if not bad:
        return
    print_timeline(console, bad[:limit], day, f"Calls refused or failed ({len(bad):,})")
    if len(bad) > limit:
        console.print(f"… {len(bad) - limit:,} more refused or failed calls: --all or `events export`",
                      markup=False, highlight=False, soft_wrap=True)


def print_timeline(console: Console, rows: list[dict[str, Any]], day: str, title: str) -> None:
    """Rows as eventlog.timeline makes them."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("at", no_wrap=True)
    t.add_column("what (detail below)", ratio=1, overflow="fold")  # the detail gets the width that is left
    t.add_column("resource", overflow="fold", max_width=24)
    t.add_column("session", no_wrap=True)
    t.add_column("outcome", no_wrap=True)
    t.add_column("tries", justify="right")
    for r in rows:
        # Text, not markup: ids and details come from the utility and eDRV.
        what = Text(r["what"], style="bold" if r["kind"] in ("event", "interval") else "")
        if r["detail"]:
            what.append("\n" + r["detail"], style="dim")
        # The last 8 hex digits tell sessions apart in a table; --json and export have the full ids.
        session = "…" + r["session_id"][-8:] if r["session_id"] else ""
        style = "red" if r["outcome"] in ("rejected", "failed") else None
        t.add_row(_clock(r["at"], day), what, Text(r["resource_id"] or ""), session, r["outcome"] or "",
                  "" if r["attempts"] is None else str(r["attempts"]), style=style)
    console.print(t)


def print_performance(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("measured reduction: none yet (computed once an interval is over, from eDRV's readings)")
        return
    t = Table(title="Measured reduction", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("interval", "resource", "baseline kW", "mean kW", "down kW", "down %", "asked kW"):
        t.add_column(col, justify="left" if col in ("interval", "resource") else "right")
    for p in rows:
        t.add_row(p["interval_start"], Text(p["resource_id"]), *(_kw(p[k]) for k in ("baseline_kw", "mean_kw",
                  "reduction_kw")), "-" if p["reduction_pct"] is None else f"{p['reduction_pct']:.0f}",
                  _kw(p["requested_kw"]))
    console.print(t)


def _kw(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
