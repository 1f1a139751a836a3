// The event page's chart: power per resource (solid) and the limit sent (dashed steps), intervals shaded.
// After uPlot draws, the container gets data-drawn="N series" so a headless browser can check it.
(function () {
  "use strict";
  const el = document.getElementById("chart");
  const note = document.getElementById("chart-note");
  if (!el) return;
  const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#393b79", "#637939"];

  function say(text) { note.textContent = text; }

  function shadeIntervals(intervals) {
    return function (u) {
      const ctx = u.ctx, top = u.bbox.top, height = u.bbox.height;
      const right = u.bbox.left + u.bbox.width;
      ctx.save();
      intervals.forEach(function (iv, k) {
        const x0 = Math.max(u.bbox.left, u.valToPos(iv.start, "x", true));
        const x1 = Math.min(right, iv.end === null ? right : u.valToPos(iv.end, "x", true));
        if (x1 <= x0) return;
        ctx.fillStyle = k % 2 ? "rgba(255, 165, 0, 0.16)" : "rgba(255, 165, 0, 0.10)";
        ctx.fillRect(x0, top, x1 - x0, height);
        ctx.fillStyle = "#8a5a00";
        ctx.font = 12 * devicePixelRatio + "px sans-serif";
        ctx.fillText(iv.label, x0 + 4 * devicePixelRatio, top + 14 * devicePixelRatio);
      });
      ctx.restore();
    };
  }

  function draw(data) {
    const series = [{}], columns = [data.x];
    data.resources.forEach(function (r, k) {
      const colour = COLOURS[k % COLOURS.length];
      series.push({label: r.resource_id + " power", stroke: colour, width: 2, spanGaps: false,
                   value: function (u, v) { return v === null ? "-" : v.toFixed(2) + " kW"; }});
      columns.push(r.power);
      series.push({label: r.resource_id + " limit", stroke: colour, width: 1.5, dash: [6, 4],
                   paths: uPlot.paths.stepped({align: 1}), points: {show: false},
                   value: function (u, v) { return v === null ? "none" : v.toFixed(2) + " kW"; }});
      columns.push(r.limit);
    });
    const withData = columns.slice(1).filter(function (c) {
      return c.some(function (v) { return v !== null; });
    }).length;
    const opts = {
      width: Math.max(600, el.clientWidth), height: 380,
      scales: {x: {time: true}, y: {range: function (u, min, max) { return [0, Math.max(1, max * 1.1)]; }}},
      axes: [{}, {label: "kW"}],
      series: series,
      hooks: {
        drawClear: [shadeIntervals(data.intervals)],
        draw: [function () { el.dataset.drawn = withData + " series"; }],
      },
    };
    new uPlot(opts, columns, el);
    if (data.omitted.length) {
      say(data.omitted.length + " more resources not drawn; chart one at a time: ");
      data.omitted.forEach(function (r) {
        const a = document.createElement("a");
        a.href = location.pathname + "?resource=" + encodeURIComponent(r);
        a.textContent = r;
        note.appendChild(a);
        note.appendChild(document.createTextNode(" "));
      });
    } else if (!withData) {
      say("nothing to draw: no readings from eDRV and no limit in force for this event");
    }
  }

  fetch(el.dataset.src, {credentials: "same-origin"})
    .then(function (r) { if (!r.ok) throw new Error("chart data: HTTP " + r.status); return r.json(); })
    .then(draw)
    .catch(function (err) { el.dataset.drawn = "error"; say(String(err)); });
})();
