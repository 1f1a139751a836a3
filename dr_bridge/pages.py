"""The read-only event-log pages on the bridge's HTTP server: the events list; per event its timeline, the
measured reduction and a chart of power per resource against the limits sent; the chart's JSON; the export.

Server-rendered HTML with everything escaped (event ids, resource ids and details come from the utility and
eDRV). The chart is uPlot, served from the package's static/ directory, so the page works with no internet.
GET only. Database reads run in a worker thread: a 10,000-action event must not stall the daemon's loop.

Token (CONTRACT.md `http.token_env`): when set, every path but the webhook, /healthz, /livez, /readyz and
/metrics needs `Authorization: Bearer <token>`. A browser opens `/events?token=<token>` once: the bridge answers with an
HttpOnly cookie and a redirect to the same URL without the token, so the token leaves the address bar.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from html import escape
from importlib.resources import files
from typing import Any, Callable
from urllib.parse import quote, urlencode

from aiohttp import web

from dr_bridge.chart import chart_data
from dr_bridge.eventlog import actions_csv, event_detail, list_events, parse_iso, timeline
from dr_bridge.store import Store

STATIC = files("dr_bridge") / "static"
COOKIE = "dr_bridge_token"
ACTIONS_PER_PAGE = 1000  # a page stays quick to load and to scroll; the export has every row at once


def mount(app: web.Application, store: Callable[[], Store], cfg) -> None:
    """Add the pages to an aiohttp app; `store` gives the bridge's Store when a request comes."""
    pages = _Pages(store, cfg)
    app.router.add_get("/", _home)
    app.router.add_get("/events", pages.event_list)
    app.router.add_get("/events/{event_id}", pages.event_page)
    app.router.add_get("/events/{event_id}/chart.json", pages.chart_json)
    app.router.add_get("/events/{event_id}/export.{fmt:csv|json}", pages.export)
    app.router.add_static("/static", str(STATIC))


async def _home(request: web.Request) -> web.Response:
    raise web.HTTPFound("/events")


def token_middleware(token: str | None, required: bool, exempt: set[str]):
    """`required` with no `token`: the variable that token_env names is unset; refuse rather than open up."""

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path in exempt or not required:
            return await handler(request)
        if token is None:
            return web.Response(status=503, text="the page token is not set on the server (http.token_env)\n")
        header = request.headers.get("Authorization", "")
        if _same(header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None, token) \
                or _same(request.cookies.get(COOKIE), token):
            return await handler(request)
        if _same(request.query.get("token"), token):
            rest = {k: v for k, v in request.query.items() if k != "token"}
            response = web.HTTPSeeOther(request.rel_url.raw_path + ("?" + urlencode(rest) if rest else ""))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            return response
        return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"},
                            text="a token is needed: Authorization: Bearer <token>, or open ?token=<token> once\n")

    return check


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class _Pages:
    def __init__(self, store: Callable[[], Store], cfg):
        self.store = store
        self.cfg = cfg

    async def event_list(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            since = parse_iso(q.get("since"))
        except ValueError:
            raise web.HTTPBadRequest(text="since: not an ISO 8601 time\n") from None
        # Given the configured stations, a resource's events include those aimed at its group or the whole
        # VEN, as `events list --resource` finds them.
        rows = await asyncio.to_thread(list_events, self.store(), since=since, status=q.get("status") or None,
                                       resource=q.get("resource") or None,
                                       stations=self.cfg.stations() if self.cfg is not None else None)
        return _html(render_list(rows, dict(q)))

    async def event_page(self, request: web.Request) -> web.Response:
        try:
            page = max(1, int(request.query.get("page", "1")))
        except ValueError:
            raise web.HTTPBadRequest(text="page: not a number\n") from None
        store = self.store()

        def load() -> tuple[dict[str, Any] | None, dict[str, int]]:
            return (event_detail(store, request.match_info["event_id"], ACTIONS_PER_PAGE,
                                 (page - 1) * ACTIONS_PER_PAGE), store.action_counts(request.match_info["event_id"]))

        d, counts = await asyncio.to_thread(load)
        if d is None:
            raise web.HTTPNotFound(text="no such event in the event log\n")
        return _html(render_event(d, counts, page, resource=request.query.get("resource")))

    async def chart_json(self, request: web.Request) -> web.Response:
        d = await self._detail(request)
        data = await asyncio.to_thread(chart_data, self.store(), self.cfg, d, request.query.get("resource"))
        return web.json_response(data)

    async def export(self, request: web.Request) -> web.Response:
        d = await self._detail(request)
        name = quote(d["event_id"], safe="")
        if request.match_info["fmt"] == "csv":
            return web.Response(text=actions_csv(d), content_type="text/csv", headers={
                "Content-Disposition": f"attachment; filename*=UTF-8''{name}.csv"})
        return web.Response(text=json.dumps(d, indent=2), content_type="application/json")

    async def _detail(self, request: web.Request) -> dict[str, Any]:
        d = await asyncio.to_thread(event_detail, self.store(), request.match_info["event_id"])
        if d is None:
            raise web.HTTPNotFound(text="no such event in the event log\n")
        return d


def _html(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# --- rendering ------------------------------------------------------------------------------------------
def e(v: Any) -> str:
    return "" if v is None else escape(str(v), quote=True)


def _page(title: str, body: str, head: str = "") -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="stylesheet" href="/static/pages.css">{head}</head><body>{body}</body></html>')


def _table(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _event_href(event_id: str, **query: str) -> str:
    return f"/events/{quote(event_id, safe='')}" + ("?" + urlencode(query) if query else "")


def render_list(rows: list[dict[str, Any]], query: dict[str, str]) -> str:
    body = ["<h1>Events</h1><p class=note>newest first</p><form method=get class=filters>"]
    for name, hint in (("since", "ISO time"), ("status", "pending|active|completed|cancelled"),
                       ("resource", "resource_id")):
        body.append(f'<label>{name} <input name="{name}" value="{e(query.get(name))}" placeholder="{hint}">'
                    "</label>")
    body.append("<button>filter</button></form>")
    if not rows:
        body.append("<p>no events in the event log</p>")
    trs = [f'<tr class="status-{e(r["status"])}"><td><a href="{e(_event_href(r["event_id"]))}">{e(r["event_id"])}'
           f'</a></td><td>{e(r["modification_number"])}</td><td>{e(r["status"])}</td><td>{e(r["opt"] or "-")}</td>'
           f'<td>{e(r["start"])}</td><td>{e(r["end"] or "open-ended")}</td>'
           f'<td>{"dry run" if r.get("dry_run") else ""}</td></tr>' for r in reversed(rows)]
    if rows:
        body.append(_table(["event", "mod", "status", "answered", "start", "end", ""], trs, "events"))
    return _page("dr-bridge events", "".join(body))


def render_event(d: dict[str, Any], counts: dict[str, int] | None = None, page: int = 1,
                 resource: str | None = None) -> str:
    """One event; `d` holds the actions of `page` (all of them when `counts` is not given)."""
    eid = d["event_id"]
    counts = counts if counts is not None else _count(d["actions"])
    tally = ", ".join(f'<span class="st-{e(k)}">{v} {e(k)}</span>' for k, v in sorted(counts.items())) or "none"
    body = [f'<p><a href="/events">all events</a></p><h1>Event <span id="event-id">{e(eid)}</span></h1>',
            f'<p class="summary">status <b>{e(d["status"])}</b> · answered <b>{e(d["opt"] or "-")}</b>'
            f'{" (" + e(d["opt_reason"]) + ")" if d.get("opt_reason") else ""} · modification '
            f'{e(d["modification_number"])}{" · <b>dry run</b>" if d.get("dry_run") else ""}<br>'
            f'start {e(d["start"])} · effective start {e(d["effective_start"])} · end {e(d["end"] or "open-ended")}'
            f'<br>{sum(counts.values())} actions: {tally} · {len(d["opt_outs"])} opt-outs · export '
            f'<a href="{e(_event_href(eid))}/export.csv">CSV</a> '
            f'<a href="{e(_event_href(eid))}/export.json">JSON</a></p>']
    src = _event_href(eid) + "/chart.json" + ("?" + urlencode({"resource": resource}) if resource else "")
    body.append(f'<h2>Power per resource</h2><div id="chart" data-src="{e(src)}"></div>'
                '<p id="chart-note" class="note">solid: measured power; dashed steps: the limit sent; '
                'shaded: the intervals</p>')
    body.append("<h2>Measured reduction</h2>" + _performance(d["performance"]))
    body.append(f"<h2>Timeline (UTC, {e(d['effective_start'][:10])})</h2>"
                + _timeline(d, page, sum(counts.values())))
    head = ('<link rel="stylesheet" href="/static/uPlot.min.css"><script src="/static/uPlot.iife.min.js"></script>'
            '<script src="/static/event.js" defer></script>')
    return _page(f"dr-bridge event {eid}", "".join(body), head)


def _count(actions: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in actions:
        counts[a["status"]] = counts.get(a["status"], 0) + 1
    return counts


def _performance(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="note">none yet: computed once an interval is over, from eDRV\'s readings</p>'

    def kw(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    trs = [f'<tr><td>{e(p["interval_start"])}</td><td>{e(p["resource_id"])}</td><td>{kw(p["baseline_kw"])}</td>'
           f'<td>{kw(p["mean_kw"])}</td><td>{kw(p["reduction_kw"])}</td>'
           f'<td>{"-" if p["reduction_pct"] is None else round(p["reduction_pct"])}</td>'
           f'<td>{kw(p["requested_kw"])}</td></tr>' for p in rows]
    return _table(["interval", "resource", "baseline kW", "mean kW", "down kW", "down %", "asked kW"], trs,
                  "performance num")


def _clock(at: str, day: str) -> str:
    """The time to the millisecond (calls a few ms apart stay in order); the date only off the event's day."""
    clock = at[11:23].rstrip("Z")
    return clock if at[:10] == day else f"{at[:10]} {clock}"


def _timeline(d: dict[str, Any], page: int, total: int) -> str:
    """The page's actions, and the other entries that fall among them (page 1: all before, last: all after)."""
    pages = max(1, -(-total // ACTIONS_PER_PAGE))
    acts = d["actions"]
    lo = acts[0]["at"] if acts and page > 1 else None
    hi = acts[-1]["at"] if acts and page < pages else None
    day, trs = d["effective_start"][:10], []
    for r in timeline(d):
        if r["kind"] != "action" and ((lo and parse_iso(r["at"]) < parse_iso(lo))
                                      or (hi and parse_iso(r["at"]) > parse_iso(hi))):
            continue
        trs.append(f'<tr class="{r["kind"]} st-{e(r["outcome"])}"><td>{e(_clock(r["at"], day))}</td>'
                   f'<td>{e(r["what"])}</td><td>{e(r["resource_id"])}</td><td class="id">{e(r["session_id"])}</td>'
                   f'<td>{e(r["outcome"])}</td><td>{e(r["attempts"])}</td><td>{e(r["detail"])}</td></tr>')
    nav = ""
    if pages > 1:
        first = (page - 1) * ACTIONS_PER_PAGE + 1
        links = [f'<a href="{e(_event_href(d["event_id"], page=str(p)))}">{label}</a>'
                 for p, label in ((page - 1, "previous"), (page + 1, "next")) if 1 <= p <= pages]
        nav = (f'<p class="note">actions {first}–{min(total, first + ACTIONS_PER_PAGE - 1)} of {total} '
               f'(page {page} of {pages}) {" ".join(links)} · the CSV export has every row</p>')
    return nav + _table(["at", "what", "resource", "session", "outcome", "tries", "detail"], trs, "timeline") + nav
