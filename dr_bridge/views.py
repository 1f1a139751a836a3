"""Rich tables of the event log for people (scripts use --json)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


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
        t.add_row(r["event_id"], str(r["modification_number"]), r["status"], _fmt(r["opt"]), _fmt(r["start"]),
                  r["end"] or "open", "yes" if r.get("dry_run") else "")
    console.print(t)


def print_event_detail(console: Console, d: dict[str, Any]) -> None:
    console.print(f"[bold]Event {d['event_id']}[/bold]  modification {d['modification_number']}  "
                  f"status [bold]{d['status']}[/bold]  answered {d['opt'] or '-'} ({d.get('opt_reason') or ''})")
    console.print(f"start {d['start']}  effective start {d['effective_start']}  end {d['end'] or 'open-ended'}"
                  f"{'  [yellow]dry run[/yellow]' if d.get('dry_run') else ''}")
    t = Table(title="Intervals")
    for col in ("start", "end", "signal", "value"):
        t.add_column(col)
    for i in d["intervals"]:
        t.add_row(i["start"], _fmt(i["end"]), f"{i['signal_name']}/{i['signal_type']}", _fmt(i["value"]))
    console.print(t)
    t = Table(title=f"Actions ({len(d['actions'])})")
    for col in ("at", "session", "resource", "call", "limit", "status", "tries"):
        t.add_column(col, no_wrap=True)
    t.add_column("detail", overflow="fold")
    for a in d["actions"]:
        call = ("clear" if a["kind"] == "clear_power_limit" else "set") + f" ({a['purpose']})"
        limit = "-" if a["limit"] is None else f"{a['limit']:g} {'A' if a['unit'] == 'current' else 'W'}"
        # The last 8 hex digits tell sessions apart in a table; --json has the full ids.
        t.add_row(a["at"][11:19], "…" + a["session_id"][-8:], a["resource_id"], call, limit, a["status"],
                  str(a["attempts"]), a["detail"])
    console.print(t)
    if d["opt_outs"]:
        t = Table(title="Opt-outs")
        for col in ("at", "resource", "reason", "source", "sent", "acknowledged"):
            t.add_column(col)
        for o in d["opt_outs"]:
            t.add_row(o["at"], o["resource_id"] or "(whole event)", o["reason"], o["source"], str(o["sent"]),
                      str(o["acknowledged"]))
        console.print(t)
