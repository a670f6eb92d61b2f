// Charts as inline SVG, drawn from the JSON the API returns: line charts (training curves), horizontal
// bars (the leak audit's advantages) and columns (usage per day). Colours come from console.css classes.
import { add, h, num, s } from "./lib.js";

const W = 560;

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) { hi = lo + 1; lo -= 1; }
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => raw <= st);
  const out = [];
  for (let t = Math.floor(lo / step) * step; out.length < 2 || out[out.length - 1] < hi - step * 1e-9; t += step) {
    out.push(+t.toFixed(10));
  }
  return out;
}

function figure(title, svg, legend, summary) {
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", summary);
  return h("figure", { class: "chart" }, h("figcaption", {}, title), svg,
    legend && legend.length > 1 ? h("ul", { class: "legend" },
      legend.map((name, i) => h("li", {}, h("span", { class: `sw c${i % 6}`, "aria-hidden": "true" }), name))) : null);
}

// A series whose x goes back (a phase that trains several students in turn) is drawn as one line per run.
function runs(points) {
  const out = [];
  for (const p of points) {
    if (!out.length || p[0] < out[out.length - 1][out[out.length - 1].length - 1][0]) out.push([]);
    out[out.length - 1].push(p);
  }
  return out;
}

// series: [{name, points: [[x, y], ...]}]
export function lineChart(title, series, { xLabel = "epoch" } = {}) {
  series = series.filter((se) => se.points.length);
  const H = 240, L = 52, R = 14, T = 12, B = 38;
  const xs = series.flatMap((se) => se.points.map((p) => p[0]));
  const ys = series.flatMap((se) => se.points.map((p) => p[1])).filter(Number.isFinite);
  const xt = ticks(Math.min(...xs), Math.max(...xs)), yt = ticks(Math.min(...ys), Math.max(...ys));
  const [x0, x1, y0, y1] = [xt[0], xt[xt.length - 1], yt[0], yt[yt.length - 1]];
  const X = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0 || 1)) * (H - T - B);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H });
  add(svg, [
    s("g", { class: "grid" }, yt.map((t) => s("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t) }))),
    s("g", { class: "axis" }, s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B }),
      s("line", { x1: L, x2: L, y1: T, y2: H - B })),
    yt.map((t) => s("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end" }, num(t, 3))),
    xt.map((t) => s("text", { x: X(t), y: H - B + 15, "text-anchor": "middle" }, num(t, 1))),
    s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xLabel),
    series.map((se, i) => runs(se.points.filter((p) => Number.isFinite(p[1]))).map((pts) => (pts.length === 1
      ? s("circle", { class: `c${i % 6}`, cx: X(pts[0][0]), cy: Y(pts[0][1]), r: 3 })
      : s("polyline", { class: `c${i % 6}`, points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ") })))),
  ]);
  const summary = `${title}: ` + series.map((se) => {
    const p = se.points;
    return `${se.name} from ${num(p[0][1], 3)} to ${num(p[p.length - 1][1], 3)} over ${p.length} points`;
  }).join("; ");
  return figure(title, svg, series.map((se) => se.name), summary);
}

// bars: [{label, value}]; values above `threshold` are drawn as leaks.
export function barChart(title, bars, { threshold = null, xLabel = "" } = {}) {
  const rowH = 22, L = 150, R = 48, T = 8, B = 34;
  const H = T + B + rowH * bars.length;
  const vals = bars.map((b) => b.value).concat(threshold === null ? [] : [threshold], [0]);
  const xt = ticks(Math.min(...vals), Math.max(...vals));
  const [x0, x1] = [xt[0], xt[xt.length - 1]];
  const X = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H });
  add(svg, [
    s("g", { class: "grid" }, xt.map((t) => s("line", { x1: X(t), x2: X(t), y1: T, y2: H - B }))),
    xt.map((t) => s("text", { x: X(t), y: H - B + 14, "text-anchor": "middle" }, num(t, 2))),
    s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xLabel),
    bars.map((b, i) => {
      const y = T + i * rowH;
      const leak = threshold !== null && b.value > threshold;
      return s("g", {},
        s("text", { x: L - 6, y: y + 15, "text-anchor": "end" }, b.label),
        s("rect", { class: leak ? "leak" : "safe", x: Math.min(X(0), X(b.value)), y: y + 4,
          width: Math.max(1, Math.abs(X(b.value) - X(0))), height: rowH - 8 }, s("title", {}, `${b.label}: ${num(b.value, 2)}`)),
        b.value >= 0 ? s("text", { x: X(b.value) + 4, y: y + 15 }, num(b.value, 2))
          : s("text", { x: X(b.value) - 4, y: y + 15, "text-anchor": "end" }, num(b.value, 2)));
    }),
    s("line", { class: "zero", x1: X(0), x2: X(0), y1: T, y2: H - B }),
    threshold === null ? null : s("line", { class: "thr", x1: X(threshold), x2: X(threshold), y1: T, y2: H - B }),
  ]);
  const summary = `${title}: ` + bars.map((b) => `${b.label} ${num(b.value, 2)}`).join(", ")
    + (threshold === null ? "" : `; threshold ${threshold}`);
  return figure(title, svg, null, summary);
}

// categories: ["2026-01-01", ...]; series: [{name, values: [...]}] (one value per category)
export function columnChart(title, categories, series, { yLabel = "" } = {}) {
  const H = 220, L = 52, R = 10, T = 12, B = 46;
  const yt = ticks(0, Math.max(1, ...series.flatMap((se) => se.values)));
  const y1 = yt[yt.length - 1];
  const Y = (y) => H - B - (y / (y1 || 1)) * (H - T - B);
  const slot = (W - L - R) / Math.max(1, categories.length);
  const bw = Math.max(2, (slot * 0.8) / series.length);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H });
  const every = Math.ceil(categories.length / 8);
  add(svg, [
    s("g", { class: "grid" }, yt.map((t) => s("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t) }))),
    yt.map((t) => s("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end" }, num(t, 0))),
    s("text", { x: L + 6, y: T + 10 }, yLabel),
    categories.map((c, i) => (i % every ? null
      : s("text", { x: L + slot * i + slot / 2, y: H - B + 14, "text-anchor": "middle" }, c.slice(5)))),
    series.map((se, j) => se.values.map((v, i) => s("rect", {
      class: `c${j % 6}`, x: L + slot * i + slot * 0.1 + j * bw, y: Y(v), width: bw, height: Math.max(0, H - B - Y(v)),
    }, s("title", {}, `${categories[i]} ${se.name}: ${v}`)))),
    s("g", { class: "axis" }, s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B })),
  ]);
  const summary = `${title}: ` + series.map((se) => `${se.name} ${se.values.reduce((a, b) => a + b, 0)} in all`).join(", ")
    + ` over ${categories.length} days`;
  return figure(title, svg, series.map((se) => se.name), summary);
}

// A job's training curves (report.json's `curves`: phase → points with x and metrics), one chart per phase
// and kind of metric (accuracies apart from losses: they have different scales).
export function curveCharts(curves) {
  const out = [];
  for (const [phase, points] of Object.entries(curves || {})) {
    if (!points.length) continue;
    const names = [...new Set(points.flatMap((p) => Object.keys(p)))]
      .filter((n) => !["epoch", "step", "steps", "x", "attempt"].includes(n) && points.some((p) => typeof p[n] === "number"));
    const groups = [names.filter((n) => /acc/.test(n)), names.filter((n) => !/acc/.test(n))];
    for (const group of groups.filter((g) => g.length)) {
      const series = group.map((n) => ({ name: n, points: points.filter((p) => typeof p[n] === "number").map((p) => [p.x, p[n]]) }));
      out.push(lineChart(`${phase}: ${group.join(", ")}`, series));
    }
  }
  return out;
}
