"""HTML and SVG rendering of the status page, from the status document alone.

Every value that reaches the markup goes through :func:`h` (HTML escaping, quotes included): log-on
names of failed log-ons and unmanaged endpoints, contacts and user agents are chosen by whoever sends
a REGISTER. The stylesheet and the script are package resources inlined under a per-response CSP
nonce, so the page needs no other request and no external asset.

The script (``static/status.js``) re-renders the same tables and chart from ``/status.json``; the
chart geometry here and there follows the same arithmetic step by step so both draw the same curve
(a browser test compares them).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

Doc = Mapping[str, Any]

CHART_WIDTH = 720
CHART_HEIGHT = 200
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 40, 14, 12, 26
HISTORY_HOURS = 24
USAGE_TABLE_ROWS = 100

STATE_LABELS = {"logged_on": "logged on", "logged_off": "logged off", "logon_failed": "log-on failed"}
REASON_LABELS = {"wrong_password": "wrong password", "unknown_user": "unknown user"}


def h(value: object) -> str:
    """Escape any value for HTML text or a quoted attribute; ``None`` shows as a dash."""
    if value is None or value == "":
        return "\u2014"
    return html.escape(str(value), quote=True)


def fmt_time(value: str | None) -> str:
    """``2024-05-01T12:00:03Z`` -> ``2024-05-01 12:00:03`` (the page states that times are UTC)."""
    if not value:
        return "\u2014"
    return value.replace("T", " ").removesuffix("Z")


@cache
def _asset(name: str) -> str:
    return resources.files("forum_bridge.web").joinpath("static", name).read_text(encoding="utf-8")


# --- chart --------------------------------------------------------------------------------------


def _round1(value: float) -> float:
    # Half-up to one decimal, written so that JavaScript's Math.floor gives the very same number.
    return math.floor(value * 10 + 0.5) / 10


def _num(value: float) -> str:
    text = repr(_round1(value))
    return text[:-2] if text.endswith(".0") else text


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Chart:
    """The licence-use chart of the last 24 hours, ready to draw."""

    used_path: str
    area_path: str
    total_path: str
    y_ticks: tuple[tuple[str, int], ...]  # (y coordinate, value)
    x_ticks: tuple[tuple[str, str], ...]  # (x coordinate, label)
    now_used: int
    now_total: int
    peak: int
    busy_seconds: float


def chart(history: Sequence[Doc], generated_at: str) -> Chart:
    """Lay out ``usage_history`` as step curves over the 24 hours before ``generated_at``."""
    end = _parse(generated_at)
    start = end - timedelta(hours=HISTORY_HOURS)
    span = (end - start).total_seconds()
    plot_w = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    plot_h = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    points = [(min(max((_parse(p["at"]) - start).total_seconds(), 0.0), span), p) for p in history]
    ymax = max([1] + [int(p["total"]) for _, p in points] + [int(p["used"]) for _, p in points])

    def x(offset: float) -> str:
        return _num(CHART_LEFT + offset / span * plot_w)

    def y(value: int) -> str:
        return _num(CHART_TOP + plot_h - value / ymax * plot_h)

    def steps(key: str) -> str:
        if not points:
            return ""
        path = [f"M{x(points[0][0])} {y(points[0][1][key])}"]
        for offset, point in points[1:]:
            path.append(f"H{x(offset)} V{y(point[key])}")
        path.append(f"H{x(span)}")
        return " ".join(path)

    used_path = steps("used")
    area_path = f"{used_path} V{y(0)} H{x(points[0][0])} Z" if points else ""
    step = max(1, math.ceil(ymax / 5))
    y_ticks = tuple((y(v), v) for v in range(0, ymax + 1, step))
    x_ticks = tuple(
        (x(span * (HISTORY_HOURS - hrs) / HISTORY_HOURS), f"-{hrs} h" if hrs else "now")
        for hrs in (24, 18, 12, 6, 0)
    )
    busy = 0.0
    for i, (offset, point) in enumerate(points):
        following = points[i + 1][0] if i + 1 < len(points) else span
        if point["total"] > 0 and point["used"] >= point["total"]:
            busy += following - offset
    last = history[-1] if history else {"used": 0, "total": 0}
    return Chart(
        used_path=used_path,
        area_path=area_path,
        total_path=steps("total"),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        now_used=int(last["used"]),
        now_total=int(last["total"]),
        peak=max([int(p["used"]) for _, p in points] or [0]),
        busy_seconds=busy,
    )


def duration(seconds: float) -> str:
    """``4500`` -> ``1 h 15 min``; minutes are cut, not rounded (same as the script)."""
    minutes = math.floor(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def chart_summary(c: Chart) -> str:
    """One sentence saying what the chart shows, for people and screen readers."""
    return (
        f"Now {c.now_used} of {c.now_total} in use. Peak in the last 24 h: {c.peak}. "
        f"All licences busy for {duration(c.busy_seconds)}."
    )


def render_chart(c: Chart) -> str:
    """The inner elements of the chart's ``<svg>``."""
    parts = ['<g class="grid">']
    for ty, value in c.y_ticks:
        parts.append(
            f'<line x1="{CHART_LEFT}" x2="{CHART_WIDTH - CHART_RIGHT}" y1="{ty}" y2="{ty}"></line>'
            f'<text class="ylabel" x="{CHART_LEFT - 6}" y="{ty}">{value}</text>'
        )
    for tx, label in c.x_ticks:
        parts.append(f'<text class="xlabel" x="{tx}" y="{CHART_HEIGHT - 8}">{h(label)}</text>')
    parts.append("</g>")
    parts.append(f'<path class="area" d="{h(c.area_path)}"></path>')
    parts.append(f'<path class="total" d="{h(c.total_path)}"></path>')
    parts.append(f'<path class="used" d="{h(c.used_path)}"></path>')
    return "".join(parts)


# --- tables -------------------------------------------------------------------------------------

Cells = Callable[[Doc], Sequence[str]]


def rows(items: Sequence[Doc], cells: Cells, columns: int, empty: str) -> str:
    """Table body rows; ``cells`` returns already-escaped cell markup."""
    if not items:
        return f'<tr class="empty"><td colspan="{columns}">{h(empty)}</td></tr>'
    return "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells(item)) + "</tr>" for item in items)


def _clipped(value: object) -> str:
    # Long user agents and contacts are cut by CSS; the full text stays in the tooltip.
    return f'<span class="clip" title="{h(value)}">{h(value)}</span>' if value else h(None)


def _badge(kind: str, label: str) -> str:
    return f'<span class="badge {h(kind)}">{h(label)}</span>'


def assignment_cells(a: Doc) -> list[str]:
    """Slot, log-on, call number, since, node."""
    return [h(a["slot"]), h(a["logon"]), h(a["number"]), h(fmt_time(a["since"])), h(a["node"])]


def subscriber_cells(slots: Mapping[str, int]) -> Cells:
    """Cells of a subscriber row; ``slots`` maps a log-on to the licence slot it holds."""

    def cells(s: Doc) -> list[str]:
        contacts = s.get("contacts") or []
        contact = _clipped(s["contact"])
        if len(contacts) > 1:
            contact += f' <span class="muted">(+{len(contacts) - 1})</span>'
        licence = (
            _badge("lic-yes", f"slot {slots[s['logon']]}" if s["logon"] in slots else "yes")
            if s["licensed"]
            else _badge("lic-no", "no")
        )
        if s.get("reserved"):
            licence += _badge("lic-reserved", "reserved")
        state = str(s["state"])
        return [
            h(s["logon"]),
            h(s["number"]),
            _badge(f"st-{state}", STATE_LABELS.get(state, state)),
            licence,
            h(fmt_time(s["last_seen"])),
            contact,
            _clipped(s["user_agent"]),
            h(s["profile"]),
            h(s["node"]),
        ]

    return cells


def failure_cells(f: Doc) -> list[str]:
    """Time, log-on (or, for a summary of a flood, a sample and how many more), reason, source, node."""
    reason = f["reason"] or ""
    count = int(f.get("count") or 1)
    who = h(f["logon"])
    if count > 1:
        who += f' <span class="muted">and {count - 1} more ({h(f.get("distinct", "?"))} names)</span>'
    return [
        h(fmt_time(f["at"])),
        who,
        _badge(f"why-{reason}", REASON_LABELS.get(reason, reason.replace("_", " "))),
        h(f["source"]),
        h(f["node"]),
    ]


def unmanaged_cells(u: Doc) -> list[str]:
    """Endpoint, contact, user agent, source, node, last seen."""
    return [
        h(u["logon"]),
        _clipped(u["contact"]),
        _clipped(u["user_agent"]),
        h(u["source"]),
        h(u["node"]),
        h(fmt_time(u["last_seen"])),
    ]


def usage_cells(p: Doc) -> list[str]:
    """Time, used, total."""
    return [h(fmt_time(p["at"])), h(p["used"]), h(p["total"])]


# --- the page -----------------------------------------------------------------------------------


def _reset_form(csrf: str) -> str:
    return f"""
<form id="reset-form" method="post" action="reset">
  <input type="hidden" name="csrf" value="{h(csrf)}">
  <label for="reset-token">Administrator token</label>
  <input id="reset-token" type="password" name="token" autocomplete="current-password" required>
  <noscript><label class="check"><input type="checkbox" name="confirm" value="yes" required>
    Yes, free every licence</label></noscript>
  <button id="reset-button" type="submit" class="danger">Reset licences</button>
</form>"""


_READ_ONLY = """
<p id="read-only" class="muted">Read-only: no administrator token is configured
(<code>[web] token</code> or <code>FORUM_BRIDGE_WEB_TOKEN</code>).</p>"""


def render_page(
    status: Doc,
    *,
    nonce: str,
    csrf: str | None,
    flash: tuple[str, str] | None = None,
    refresh_seconds: float = 5.0,
) -> str:
    """The whole status page. ``csrf`` is None when resetting is not possible (no token configured).

    ``flash`` is ``(kind, message)`` with kind ``ok`` or ``error``; both strings are escaped here.
    """
    lic = status["licences"]
    c = chart(status["usage_history"], status["generated_at"])
    slots = {a["logon"]: a["slot"] for a in status["assignments"]}
    window = list(status["usage_history"])[-USAGE_TABLE_ROWS:][::-1]
    flash_html = (
        f'<div id="flash" role="status" class="flash {h(flash[0])}">{h(flash[1])}</div>'
        if flash
        else '<div id="flash" role="status" class="flash" hidden></div>'
    )
    reset = _reset_form(csrf) if csrf is not None else _READ_ONLY
    assignments = rows(status["assignments"], assignment_cells, 5, "No licence is held.")
    summary = status_summary(status)
    listing = subscriber_listing(status)
    subscribers = rows(status["subscribers"], subscriber_cells(slots), 9, "No subscriber is provisioned.")
    failed = rows(status["failed_logons"], failure_cells, 5, "No failed log-on.")
    unmanaged = rows(status["unmanaged"], unmanaged_cells, 6, "No unmanaged endpoint.")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<link rel="icon" href="data:,">
<title>forum_bridge: {h(status["node"])}</title>
<style nonce="{h(nonce)}">{_asset("status.css")}</style>
</head>
<body data-refresh="{h(refresh_seconds)}">
<header>
  <h1>forum_bridge <span class="muted">licences</span></h1>
  <p class="meta">node <strong id="node">{h(status["node"])}</strong> &middot; updated
  <time id="generated">{h(fmt_time(status["generated_at"]))}</time> UTC
  <span id="live" class="live" title="refreshes by itself">auto-refresh</span></p>
</header>
<main>
{flash_html}
<section class="top">
  <div class="cards">
    <div class="card"><span class="label">Licences</span>
      <span id="lic-total" class="big">{h(lic["total"])}</span><span class="note">purchased</span></div>
    <div class="card used"><span class="label">In use</span>
      <span id="lic-used" class="big">{h(lic["used"])}</span><span class="note">held by a log-on</span></div>
    <div class="card free"><span class="label">Free</span>
      <span id="lic-free" class="big">{h(lic["free"])}</span><span class="note">for the next call</span></div>
    <div class="card reserved"><span class="label">Reserved</span>
      <span id="lic-reserved" class="big">{h(lic["reserved"])}</span><span class="note">kept for their
      log-ons</span></div>
  </div>
  <div class="panel reset">
    <h2>Reset licences</h2>
    <p class="muted">Frees every licence now. Calls in progress go on and take a licence again
    at their next connection.</p>{reset}
  </div>
</section>

<section class="cards states" aria-label="Subscribers by state">{state_cards(summary)}
</section>

<section class="panel">
  <h2 id="chart-title">Licence use, last 24 hours</h2>
  <svg id="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img"
    aria-labelledby="chart-title chart-summary">{render_chart(c)}</svg>
  <p class="summary"><span id="chart-summary">{h(chart_summary(c))}</span>
  <span class="legend"><span class="key used"></span>in use <span class="key total"></span>licences</span></p>
  <details><summary>As a table</summary>
  <table class="compact"><thead><tr><th>Time (UTC)</th><th>In use</th><th>Licences</th></tr></thead>
  <tbody id="usage">{rows(window, usage_cells, 3, "No licence use recorded.")}</tbody></table>
  </details>
</section>

<section class="panel">
  <h2>Licence assignment <span id="assignments-count" class="count">{len(status["assignments"])}</span></h2>
  <table><thead><tr><th>Slot</th><th>Log-on</th><th>Call number</th><th>Since (UTC)</th><th>Node</th></tr>
  </thead><tbody id="assignments">{assignments}</tbody></table>
</section>

<section class="panel">
  <h2>Subscribers <span id="subscribers-count" class="count">{h(listing["count"])}</span></h2>
  <form id="subscriber-search" class="search" method="get" action="./" role="search">
    <label for="subscriber-q">Find a log-on or call number</label>
    <input id="subscriber-q" type="search" name="q" maxlength="64" autocomplete="off"
      value="{h(listing["search"]) if listing["search"] else ""}">
    <button type="submit">Search</button>
  </form>
  <p class="pager"><span id="subscriber-range">{h(listing["range"])}</span>
    <a id="subscriber-prev" href="{h(listing["prev"])}"{listing["prev_hidden"]}>previous</a>
    <a id="subscriber-next" href="{h(listing["next"])}"{listing["next_hidden"]}>next</a></p>
  <div class="scroll"><table><thead><tr><th>Log-on</th><th>Call number</th><th>State</th><th>Licence</th>
  <th>Last keepalive (UTC)</th><th>Contact</th><th>User agent</th><th>Profile</th><th>Node</th></tr></thead>
  <tbody id="subscribers">{subscribers}</tbody>
  </table></div>
</section>

<section class="panel">
  <h2>Recent failed log-ons <span id="failed-count" class="count">{len(status["failed_logons"])}</span></h2>
  <div class="scroll"><table><thead><tr><th>Time (UTC)</th><th>Log-on</th><th>Reason</th><th>Source</th>
  <th>Node</th></tr></thead>
  <tbody id="failed">{failed}</tbody></table></div>
</section>

<section class="panel">
  <h2>Unmanaged endpoints <span id="unmanaged-count" class="count">{len(status["unmanaged"])}</span></h2>
  <div class="scroll"><table><thead><tr><th>Endpoint</th><th>Contact</th><th>User agent</th><th>Source</th>
  <th>Node</th><th>Last seen (UTC)</th></tr></thead>
  <tbody id="unmanaged">{unmanaged}</tbody></table></div>
</section>
</main>
<script nonce="{h(nonce)}">{_asset("status.js")}</script>
</body>
</html>
"""


def status_summary(status: Doc) -> Doc:
    """Subscribers by state and unmanaged endpoints: the document's ``summary``, or counted."""
    summary: Doc | None = status.get("summary")
    if summary is not None:
        return summary
    states = [s["state"] for s in status["subscribers"]]
    return {
        "subscribers": len(states),
        **{state: states.count(state) for state in STATE_LABELS},
        "unmanaged": len(status["unmanaged"]),
    }


_STATE_CARDS = (
    ("subscribers", "", "Subscribers", "provisioned"),
    ("logged_on", " free", "Logged on", "registered now"),
    ("logged_off", "", "Logged off", "no contact"),
    ("logon_failed", " bad", "Log-on failed", "no call at all"),
    ("unmanaged", "", "Unmanaged", "endpoints"),
)


def state_cards(summary: Doc) -> str:
    """The subscriber summary: one card per state, first on the page."""
    return "".join(
        f'\n  <div class="card{kind}"><span class="label">{label}</span>'
        f'<span id="sum-{key}" class="big">{h(summary.get(key, 0))}</span>'
        f'<span class="note">{note}</span></div>'
        for key, kind, label, note in _STATE_CARDS
    )


def subscriber_listing(status: Doc) -> dict[str, Any]:
    """What the subscriber table's heading and pager say: count, range, links (escaped later)."""
    listing = status.get("subscriber_page") or {}
    shown = len(status["subscribers"])
    matched = int(listing.get("matched", shown))
    offset = int(listing.get("offset", 0))
    limit = listing.get("limit")
    search = str(listing.get("search", ""))
    total = status_summary(status)["subscribers"]
    query = f"q={quote(search)}&" if search else ""
    step = int(limit) if limit else max(shown, 1)
    first, last = (offset + 1, offset + shown) if shown else (0, 0)
    has_prev, has_next = offset > 0, offset + shown < matched
    return {
        "search": search,
        "count": f"{matched} of {total}" if search else str(total),
        "range": f"{first} to {last} of {matched}" if shown else ("No match." if search else ""),
        "prev": f"./?{query}offset={max(offset - step, 0)}",
        "next": f"./?{query}offset={offset + step}",
        "prev_hidden": "" if has_prev else " hidden",
        "next_hidden": "" if has_next else " hidden",
    }


def render_message(title: str, message: str, *, nonce: str) -> str:
    """A small page for answers to form posts without JavaScript (refusals, bad requests)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{h(title)}</title>
<link rel="icon" href="data:,">
<style nonce="{h(nonce)}">{_asset("status.css")}</style></head>
<body><main><section class="panel"><h1>{h(title)}</h1><p id="message">{h(message)}</p>
<p><a href="./">Back to the status page</a></p></section></main></body></html>
"""
