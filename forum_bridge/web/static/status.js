// Status page of forum_bridge: re-renders tables and chart from status.json every few seconds and
// sends the reset form with fetch. Inlined under the response's CSP nonce.
//
// Data from the bridge is only ever put into the page as text (textContent, setAttribute on plain
// attributes, SVG path data), never parsed as markup: log-on names and user agents come from the
// network. The chart arithmetic mirrors page.py step by step so both draw the very same curve.
(function () {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const W = 720, H = 200, LEFT = 40, RIGHT = 14, TOP = 12, BOTTOM = 26, HOURS = 24, USAGE_ROWS = 100;
  const STATE = { logged_on: "logged on", logged_off: "logged off", logon_failed: "log-on failed" };
  const REASON = { wrong_password: "wrong password", unknown_user: "unknown user" };
  const DASH = "\u2014";
  const refreshMs = Math.max(1, Number(document.body.dataset.refresh) || 5) * 1000;
  const PAGE = 100;
  const params = new URLSearchParams(window.location.search);
  // Which subscribers the table shows: a search and an offset, as the server rendered them.
  const listing = { q: params.get("q") || "", offset: Math.max(0, Number(params.get("offset")) || 0) };
  let timer = null;

  function txt(v) {
    return v === null || v === undefined || v === "" ? DASH : String(v);
  }
  function time(v) {
    return v ? String(v).replace("T", " ").replace(/Z$/, "") : DASH;
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      node.setAttribute(k, v);
    }
    node.append(...children);
    return node;
  }
  function badge(kind, label) {
    return el("span", { class: "badge " + kind }, label);
  }
  function clipped(v) {
    return v ? el("span", { class: "clip", title: String(v) }, String(v)) : DASH;
  }
  function setText(id, value) {
    document.getElementById(id).textContent = String(value);
  }

  function fill(id, items, cells, columns, empty) {
    const body = document.getElementById(id);
    const rows = items.length
      ? items.map((item) => el("tr", {}, ...cells(item).map((cell) => el("td", {}, cell))))
      : [el("tr", { class: "empty" }, el("td", { colspan: String(columns) }, empty))];
    body.replaceChildren(...rows);
  }

  // --- chart (same arithmetic as page.py) -------------------------------------------------------

  function round1(v) {
    return Math.floor(v * 10 + 0.5) / 10;
  }
  function num(v) {
    return String(round1(v));
  }

  function chart(history, generatedAt) {
    const end = Date.parse(generatedAt);
    const start = end - HOURS * 3600 * 1000;
    const span = (end - start) / 1000;
    const plotW = W - LEFT - RIGHT;
    const plotH = H - TOP - BOTTOM;
    const points = history.map((p) => [Math.min(Math.max((Date.parse(p.at) - start) / 1000, 0), span), p]);
    const ymax = Math.max(1, ...points.map(([, p]) => p.total), ...points.map(([, p]) => p.used));
    const x = (offset) => num(LEFT + offset / span * plotW);
    const y = (value) => num(TOP + plotH - value / ymax * plotH);
    const steps = (key) => {
      if (!points.length) return "";
      const path = ["M" + x(points[0][0]) + " " + y(points[0][1][key])];
      for (const [offset, point] of points.slice(1)) {
        path.push("H" + x(offset) + " V" + y(point[key]));
      }
      path.push("H" + x(span));
      return path.join(" ");
    };
    const usedPath = steps("used");
    const step = Math.max(1, Math.ceil(ymax / 5));
    const yTicks = [];
    for (let v = 0; v <= ymax; v += step) yTicks.push([y(v), v]);
    const xTicks = [24, 18, 12, 6, 0].map((hrs) => [x(span * (HOURS - hrs) / HOURS), hrs ? "-" + hrs + " h" : "now"]);
    let busy = 0;
    points.forEach(([offset, point], i) => {
      const following = i + 1 < points.length ? points[i + 1][0] : span;
      if (point.total > 0 && point.used >= point.total) busy += following - offset;
    });
    const last = history.length ? history[history.length - 1] : { used: 0, total: 0 };
    return {
      usedPath,
      areaPath: points.length ? usedPath + " V" + y(0) + " H" + x(points[0][0]) + " Z" : "",
      totalPath: steps("total"),
      yTicks,
      xTicks,
      nowUsed: last.used,
      nowTotal: last.total,
      peak: Math.max(0, ...points.map(([, p]) => p.used)),
      busy,
    };
  }

  function duration(seconds) {
    const minutes = Math.floor(seconds / 60);
    return minutes >= 60 ? Math.floor(minutes / 60) + " h " + (minutes % 60) + " min" : minutes + " min";
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawChart(status) {
    const c = chart(status.usage_history, status.generated_at);
    const grid = svg("g", { class: "grid" });
    for (const [ty, value] of c.yTicks) {
      grid.append(svg("line", { x1: LEFT, x2: W - RIGHT, y1: ty, y2: ty }));
      grid.append(svg("text", { class: "ylabel", x: LEFT - 6, y: ty }, String(value)));
    }
    for (const [tx, label] of c.xTicks) {
      grid.append(svg("text", { class: "xlabel", x: tx, y: H - 8 }, label));
    }
    document.getElementById("chart").replaceChildren(
      grid,
      svg("path", { class: "area", d: c.areaPath }),
      svg("path", { class: "total", d: c.totalPath }),
      svg("path", { class: "used", d: c.usedPath }),
    );
    setText("chart-summary", "Now " + c.nowUsed + " of " + c.nowTotal + " in use. Peak in the last 24 h: " +
      c.peak + ". All licences busy for " + duration(c.busy) + ".");
  }

  // --- tables -----------------------------------------------------------------------------------

  function render(status) {
    setText("node", status.node);
    setText("generated", time(status.generated_at));
    setText("lic-total", status.licences.total);
    setText("lic-used", status.licences.used);
    setText("lic-free", status.licences.free);
    setText("lic-reserved", status.licences.reserved);
    drawChart(status);
    fill("usage", status.usage_history.slice(-USAGE_ROWS).reverse(),
      (p) => [time(p.at), txt(p.used), txt(p.total)], 3, "No licence use recorded.");

    const slots = new Map(status.assignments.map((a) => [a.logon, a.slot]));
    setText("assignments-count", status.assignments.length);
    fill("assignments", status.assignments,
      (a) => [txt(a.slot), txt(a.logon), txt(a.number), txt(time(a.since)), txt(a.node)],
      5, "No licence is held.");

    const summary = status.summary || {};
    for (const key of ["subscribers", "logged_on", "logged_off", "logon_failed", "unmanaged"]) {
      setText("sum-" + key, summary[key] === undefined ? "?" : summary[key]);
    }
    const page = status.subscriber_page || { matched: status.subscribers.length, offset: 0 };
    const shown = status.subscribers.length;
    setText("subscribers-count", listing.q ? page.matched + " of " + summary.subscribers : summary.subscribers);
    setText("subscriber-range", shown ? (page.offset + 1) + " to " + (page.offset + shown) + " of " + page.matched
      : (listing.q ? "No match." : ""));
    document.getElementById("subscriber-prev").hidden = page.offset <= 0;
    document.getElementById("subscriber-next").hidden = page.offset + shown >= page.matched;
    fill("subscribers", status.subscribers, (s) => {
      const contacts = s.contacts || [];
      const contact = el("span", {}, clipped(s.contact));
      if (contacts.length > 1) contact.append(" ", el("span", { class: "muted" }, "(+" + (contacts.length - 1) + ")"));
      // A fragment, so the cell holds the same badges side by side as the server renders.
      const licence = document.createDocumentFragment();
      licence.append(s.licensed
        ? badge("lic-yes", slots.has(s.logon) ? "slot " + slots.get(s.logon) : "yes")
        : badge("lic-no", "no"));
      if (s.reserved) licence.append(badge("lic-reserved", "reserved"));
      return [
        txt(s.logon), txt(s.number), badge("st-" + s.state, STATE[s.state] || s.state), licence,
        txt(time(s.last_seen)), contact, clipped(s.user_agent), txt(s.profile), txt(s.node),
      ];
    }, 9, "No subscriber is provisioned.");

    setText("failed-count", status.failed_logons.length);
    fill("failed", status.failed_logons, (f) => {
      const reason = f.reason || "";
      const who = el("span", {}, txt(f.logon));
      if ((f.count || 1) > 1) {
        who.append(" ", el("span", { class: "muted" }, "and " + (f.count - 1) + " more (" + txt(f.distinct) + " names)"));
      }
      return [
        txt(time(f.at)), who, badge("why-" + reason, REASON[reason] || reason.replaceAll("_", " ")),
        txt(f.source), txt(f.node),
      ];
    }, 5, "No failed log-on.");

    setText("unmanaged-count", status.unmanaged.length);
    fill("unmanaged", status.unmanaged,
      (u) => [txt(u.logon), clipped(u.contact), clipped(u.user_agent), txt(u.source), txt(u.node),
        txt(time(u.last_seen))],
      6, "No unmanaged endpoint.");
  }

  // --- refresh loop and reset form ---------------------------------------------------------------

  function setLive(up) {
    const live = document.getElementById("live");
    live.classList.toggle("down", !up);
    live.textContent = up ? "auto-refresh" : "bridge not answering, retrying";
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const query = new URLSearchParams({ limit: String(PAGE), offset: String(listing.offset) });
      if (listing.q) query.set("q", listing.q);
      const answer = await fetch("status.json?" + query, { cache: "no-cache", headers: { Accept: "application/json" } });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      render(await answer.json());
      setLive(true);
    } catch (err) {
      setLive(false);
    } finally {
      timer = setTimeout(refresh, refreshMs);
    }
  }

  function flash(kind, message) {
    const box = document.getElementById("flash");
    box.className = "flash " + kind;
    box.textContent = message;
    box.hidden = false;
  }

  const form = document.getElementById("reset-form");
  if (form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!window.confirm("Free every licence now? Calls in progress go on.")) return;
      const body = new URLSearchParams(new FormData(form));
      body.set("confirm", "yes");
      const button = document.getElementById("reset-button");
      button.disabled = true;
      try {
        const answer = await fetch(form.action, { method: "POST", body, headers: { Accept: "application/json" } });
        const doc = await answer.json().catch(() => ({}));
        if (answer.ok) {
          flash("ok", doc.message || "Licences reset.");
          form.reset();
        } else {
          flash("error", answer.status + ": " + (doc.message || answer.statusText));
        }
      } catch (err) {
        flash("error", "The bridge did not answer: " + err.message);
      } finally {
        button.disabled = false;
        refresh();
      }
    });
  }

  // Search and paging without reloading the page; the links and the form still work without script.
  function show(q, offset) {
    listing.q = q;
    listing.offset = Math.max(0, offset);
    const query = new URLSearchParams();
    if (listing.q) query.set("q", listing.q);
    if (listing.offset) query.set("offset", String(listing.offset));
    window.history.replaceState(null, "", window.location.pathname + (query.size ? "?" + query : ""));
    refresh();
  }
  const search = document.getElementById("subscriber-q");
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => show(search.value.trim(), 0), 250);
  });
  document.getElementById("subscriber-search").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(typing);
    show(search.value.trim(), 0);
  });
  document.getElementById("subscriber-prev").addEventListener("click", (event) => {
    event.preventDefault();
    show(listing.q, listing.offset - PAGE);
  });
  document.getElementById("subscriber-next").addEventListener("click", (event) => {
    event.preventDefault();
    show(listing.q, listing.offset + PAGE);
  });

  // A flash from a form post without JavaScript came in the query string; drop it so a reload
  // does not show it again (a search and an offset stay).
  if (params.has("reset") || params.has("freed")) {
    params.delete("reset");
    params.delete("freed");
    window.history.replaceState(null, "", window.location.pathname + (params.size ? "?" + params : ""));
  }
  timer = setTimeout(refresh, refreshMs);
})();
