// Models: every hosted model and version; one model's protection report, leak audit, usage, and "try it".
import { barChart, columnChart } from "./charts.js";
import { deployHowTo } from "./files.js";
import { labelled } from "./forms.js";
import {
  MODES, allowsModel, api, announce, enc, errorBox, facts, grants, h, human, npyBlob, num, pct, policyText, put, table,
  url, when,
} from "./lib.js";

export async function list(el) {
  el.append(h("h1", { tabindex: -1 }, "Models"));
  let models;
  try {
    ({ models } = await api("/v1/models"));
  } catch (e) { el.append(errorBox(e)); return; }
  if (!models.length) {
    el.append(h("p", { class: "notice" }, "No model is served yet. ", howToServe()));
    return;
  }
  // One row per served version (GET /v1/models lists each), linked to that version's page
  el.append(table(["Model", "Version", "Task", "Mode", "Output policy", "Keyed path", "Public accuracy"],
    models.map((m) => [h("a", { href: `#/models/${enc(m.name)}?version=${enc(m.version)}`, "aria-label": `${m.name} version ${m.version}` }, m.name),
      m.version, m.task, MODES[m.mode] || m.mode, policyText(m.output_policy), m.distillable ? "yes" : "no",
      pct((m.metrics || {}).public_acc)]), { caption: "Hosted models" }));
}

function howToServe() {
  const ways = [];
  if (grants("jobs")) ways.push(h("a", { href: "#/jobs?kind=wrap" }, "Wrap one with a job"), ". ");
  if (grants("deploy")) ways.push(deployHowTo());
  return ways.length ? ways : "A key with the jobs scope can wrap one, and one with the deploy scope deploy a bundle.";
}

export async function detail(el, { params: [name], query }, ctx) {
  el.append(h("p", {}, h("a", { href: "#/models" }, "← All models")), h("h1", { tabindex: -1 }, name));
  const version = query.get("version");
  let m;
  try {
    m = await api(`/v1/models/${enc(name)}${version ? `?version=${enc(version)}` : ""}`);
  } catch (e) { el.append(errorBox(e)); return; }
  if (!ctx.alive()) return;
  const pick = h("select", { onchange: (e) => { location.hash = `#/models/${enc(name)}?version=${enc(e.target.value)}`; } },
    m.versions.map((v) => h("option", { value: v, selected: v === m.version }, v)));
  el.append(h("div", { class: "row" }, labelled("version", "Version", pick).el));
  el.append(h("section", { class: "panel", "aria-labelledby": "sum-h" }, h("h2", { id: "sum-h" }, "Summary"), facts([
    ["Task", m.task], ["Mode", MODES[m.mode] || m.mode], ["Output policy", policyText(m.output_policy)],
    ["Keyed path", m.distillable ? "yes: distillable logits for keys with the distill scope" : "no"],
    ["Input", `${m.input.name} ${JSON.stringify(m.input.shape)} ${m.input.dtype}`],
    ["Labels", m.labels.length ? `${m.labels.length}: ${m.labels.slice(0, 12).join(", ")}${m.labels.length > 12 ? ", …" : ""}` : "–"],
    ["Temperature", m.temperature], ["Added", when(m.added_at)],
  ])));
  el.append(protection(m));
  const audit = h("section", { class: "panel", "aria-labelledby": "audit-h" }, h("h2", { id: "audit-h" }, "Leak audit"));
  const usage = h("section", { class: "panel", "aria-labelledby": "use-h" }, h("h2", { id: "use-h" }, "Usage"));
  el.append(audit, usage, tryIt(m));
  leakAudit(audit, m, ctx);
  usageChart(usage, m, ctx);
}

// The wrap's self-check, as the bundle's meta.json carries it (GET /v1/models/{name}: metrics, protection).
function protection(m) {
  const sec = h("section", { class: "panel", "aria-labelledby": "prot-h" }, h("h2", { id: "prot-h" }, "Protection report"));
  const p = m.protection, rows = accuracyRows(m.metrics);
  if (!rows.length && !p) {
    sec.append(h("p", {}, "This bundle carries no protection report (a plain model, or one wrapped before the self-check)."));
    return sec;
  }
  if (rows.length) sec.append(accuracyHeading(p && p.held_out), table(["Figure", "Value"], rows, { numeric: [1], caption: "Accuracy of the box" }));
  if (p) {
    sec.append(h("h3", {}, "The wrap's self-check"), h("p", {}, `On ${heldOut(p.held_out)}: `,
      h("span", { class: `badge ${p.passed ? "good" : "bad"}` }, p.passed ? "passed" : "refused")), checkTable(p.figures, p.thresholds));
  }
  return sec;
}

// A wrapped bundle's accuracies are its self-check's, measured on training inputs the wrap held out from fitting
// the box (sdb_core/protect/check.py: val_size of them), not on the data set's test split; a bundle without a
// self-check says nothing of where its figures come from.
export const heldOut = (n) => `${num(n)} held-out training inputs`;

export function accuracyHeading(n) {
  return typeof n === "number" ? h("h3", {}, `Accuracy on ${heldOut(n)} (the self-check's)`) : h("h3", {}, "Accuracy, as the bundle records it");
}

export function accuracyRows(metrics) {
  return [["teacher_acc", "Teacher accuracy"], ["public_acc", "Public accuracy"], ["keyed_acc", "Keyed accuracy"],
    ["agreement", "Agreement"]].filter(([k]) => typeof (metrics || {})[k] === "number").map(([k, label]) => [label, pct(metrics[k])]);
}

// The self-check's figures beside the threshold each one is held to (sdb_core/protect/check.py's Thresholds).
// A Map, not an object: a figure a bundle names "constructor" read Object's own property, and the page stopped there.
const HELD = new Map([["public_drop", ["max_accuracy_drop", "≤"]], ["keyed_drop", ["max_keyed_drop", "≤"]],
  ["leak_margin", ["min_leak_margin", "≥"]], ["guessed_key_share", ["min_guessed_key_share", "≥"]]]);

// A figure's unit by its name, as the rest of the page writes them: accuracies in %, their drops and margins (and
// those of their thresholds) in points; a guessed key's share, or a name the console does not know, bare.
function withUnit(name, v) {
  if (typeof v !== "number") return num(v);
  if (/(_acc|^labels_only|^kd_public)$/.test(name)) return `${num(v)} %`;
  if (/(_drop|_drop_se|_margin)$/.test(name)) return `${num(v)} ${Math.abs(v) === 1 ? "point" : "points"}`;
  return num(v);
}

export function checkTable(figures, thresholds) {
  const used = new Set();
  const rows = Object.entries(figures || {}).map(([k, v]) => {
    const [t, op] = HELD.get(k) || [];
    const held = t && thresholds && Object.hasOwn(thresholds, t);
    if (held) used.add(t);
    return [human(k), withUnit(k, v), held ? `${op} ${withUnit(t, thresholds[t])} (${human(t).toLowerCase()})` : ""];
  });
  for (const [t, v] of Object.entries(thresholds || {})) if (!used.has(t)) rows.push([human(t), "", withUnit(t, v)]);
  return table(["Figure", "Measured", "Threshold"], rows, { numeric: [1], caption: "Self-check figures and thresholds" });
}

// The newest leak audit of this version among the key's jobs (the server finds it by its target, however many audits
// are newer), with its chart drawn from report.json.
async function leakAudit(sec, m, ctx) {
  if (!grants("jobs")) {
    sec.append(h("p", {}, "Leak audits are jobs: a key with the jobs scope runs them and reads their verdicts."));
    return;
  }
  try {
    const { jobs: [job] } = await api(`/v1/jobs?kind=audit&status=succeeded&model=${enc(m.name)}&version=${enc(m.version)}&limit=1`);
    if (!ctx.alive()) return;
    if (!job) {
      sec.append(h("p", {}, "No leak audit of this version yet. ",
        h("a", { href: `#/jobs?kind=audit&target.model=${enc(m.name)}&target.version=${enc(m.version)}` }, "Run one"), "."));
      return;
    }
    const r = job.result;
    sec.append(h("p", {}, "Verdict: ", h("span", { class: `badge ${r.verdict === "protected" ? "good" : "bad"}`, "data-verdict": r.verdict }, r.verdict),
      ` under the ${r.policy} policy; worst attack ${r.worst_attack} `, `(${num(job.metrics.max_advantage)} points). `,
      h("a", { href: `#/jobs/${enc(job.id)}` }, "The audit job")));
    const report = await api(`/v1/jobs/${enc(job.id)}/artifacts/report.json`);
    if (ctx.alive()) sec.append(auditChart(report.audit));
  } catch (e) { sec.append(errorBox(e)); }
}

export function auditChart(a) {
  const bars = Object.entries(a.attacks).filter(([, x]) => !x.label_only).map(([n, x]) => ({ label: n, value: x.advantage }));
  return barChart(`Distillation advantage over labels only (${a.reference}), points`, bars,
    { threshold: a.config.threshold, xLabel: "advantage, points (dashed: threshold)" });
}

async function usageChart(sec, m, ctx) {
  try {
    const { usage } = await api(`/v1/usage?model=${enc(m.name)}&days=30`);
    if (!ctx.alive()) return;
    const whose = grants("admin") ? "every key's" : "this key's";
    if (!usage.length) {
      sec.append(h("p", {}, `No keyed requests to this model in the last 30 days (${whose}; requests without a key are not counted).`));
      return;
    }
    const days = [];
    for (let t = Date.now() - 29 * 86400e3; t <= Date.now(); t += 86400e3) days.push(new Date(t).toISOString().slice(0, 10));
    const kinds = [...new Set(usage.map((u) => u.kind))].sort();
    const series = kinds.map((k) => ({ name: k, values: days.map((d) => usage.filter((u) => u.kind === k && u.day === d).reduce((a, u) => a + u.samples, 0)) }));
    sec.append(columnChart(`Samples served per day, last 30 days (${whose})`, days, series, { yLabel: "samples" }));
    const total = (k) => usage.filter((u) => u.kind === k).reduce((a, u) => a + u.samples, 0);
    sec.append(h("p", {}, kinds.map((k) => `${k}: ${num(total(k))} samples`).join(" · ")));
  } catch (e) { sec.append(errorBox(e)); }
}

// ------------------------------------------------------------------------------------------- try it
function tryIt(m) {
  const sec = h("section", { class: "panel", "aria-labelledby": "try-h" }, h("h2", { id: "try-h" }, "Try it"));
  if (!["classification", "multilabel"].includes(m.task) || m.input.shape.length !== 3) {
    sec.append(h("p", {}, `A ${m.task} model: try it through its API route.`));
    return sec;
  }
  const keyed = m.distillable && grants("distill") && allowsModel(m.name);
  const sdb = m.mode === "sdb" ? " An SDB box's public scores are its public form: only the top-1 depends on the "
    + "image; the near-ties to two fixed classes are the same for every image of a class." : "";
  sec.append(h("p", { class: "hint" }, (keyed
    ? "The public top-k (what anyone gets) beside the keyed logits (what this distill key gets)."
    : "The public top-k, what anyone gets. A key with the distill scope for this model also sees the keyed logits.")
    + sdb));
  const file = h("input", { type: "file", accept: "image/png,image/jpeg" });
  const topk = h("input", { type: "text", inputmode: "numeric", value: String(Math.min(5, m.labels.length || 5)) });
  const fileF = labelled("file", "Image (PNG or JPEG)", file, { hint: "choose a file, or drop one on this box" });
  const kF = labelled("top_k", "Top k", topk);
  const drop = h("div", { class: "drop" }, fileF.el);
  const samples = h("div", { class: "samples", role: "group", "aria-label": "Test images" });
  const out = h("div", { "aria-live": "polite" });
  sec.append(drop, kF.el, samples, out);
  let last = null;
  const run = async (blob, filename) => {
    last = [blob, filename];
    fileF.clear(); kF.clear();
    put(out, h("p", {}, "Asking the model…"));
    const form = new FormData();
    form.append("file", blob, filename);
    if (topk.value.trim()) form.append("top_k", topk.value.trim()); // left empty: the API's default, not a 422
    const q = `?version=${enc(m.version)}`;
    const preview = h("img", { class: "preview", src: URL.createObjectURL(blob), alt: `the image sent: ${filename}` });
    let pub;
    try {
      pub = await api(`/v1/models/${enc(m.name)}/predict${q}`, { method: "POST", body: form });
    } catch (e) {
      put(out);
      (/top_k/.test(e.message) ? kF : fileF).setError(`${e.message} (${e.status} ${e.code})`);
      return;
    }
    const cols = h("div", { class: "grid2" }, h("div", {}, h("h3", {}, "Public path"), predictionTable(pub.predictions[0])));
    put(out, h("div", { class: "row" }, preview, h("p", {}, `${m.name} version ${pub.version}: `,
      h("strong", { "data-top": pub.predictions[0].labels[0] }, `predicted ${pub.predictions[0].labels[0]}`))), cols);
    announce(`predicted ${pub.predictions[0].labels[0]}`);
    if (!keyed) return;
    const keyedCol = h("div", {}, h("h3", {}, "Keyed logits (distill)"));
    cols.append(keyedCol);
    try {
      const f2 = new FormData();
      f2.append("file", blob, filename);
      const x = await api(`/v1/models/${enc(m.name)}/inputs${q}`, { method: "POST", body: f2 });
      // as .npy: the same values as JSON took 5 times the bytes, past the JSON body limit for a 3x384x384 photo
      const d = await api(`/v1/models/${enc(m.name)}/distill${q}`, { method: "POST", body: npyBlob(x.inputs, x.shape) });
      keyedCol.append(logitTable(d.logits[0], m.labels));
    } catch (e) { keyedCol.append(errorBox(e)); }
  };
  file.addEventListener("change", () => { if (file.files[0]) run(file.files[0], file.files[0].name); });
  topk.addEventListener("change", () => { if (last) run(...last); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) run(f, f.name);
  });
  loadSamples(samples, m, run);
  return sec;
}

async function loadSamples(box, m, run) {
  let index;
  try {
    index = await (await fetch(url("/console/static/samples/index.json"), { credentials: "omit" })).json();
  } catch { return; }
  const set = index.sets.find((st) => JSON.stringify(st.shape) === JSON.stringify(m.input.shape));
  if (!set) return;
  box.append(h("p", { class: "hint" }, `Or pick a test image of the embedded ${set.name} set:`));
  for (const smp of set.samples) {
    const src = url(`/console/static/samples/${smp.file}`);
    box.append(h("button", { type: "button", "aria-label": `test image of a ${smp.label} from ${set.name}`, "data-sample": smp.file,
      onclick: async () => run(await (await fetch(src)).blob(), smp.file) },
    h("img", { src, alt: "" }), h("span", { "aria-hidden": "true" }, smp.label)));
  }
}

function predictionTable(p) {
  const rows = p.labels.map((l, i) => [String(i + 1), l, p.scores ? [h("meter", { min: 0, max: 1, value: p.scores[i], "aria-hidden": "true" }), " ", num(p.scores[i], 4)] : "–"]);
  return table(["Rank", "Label", "Score"], rows, { caption: "Public top-k" });
}

const TOP_LOGITS = 100; // rows the keyed table shows at first: a model of 50,000 classes drew them all

// The keyed logits, highest first, with their softmax: the top TOP_LOGITS rows, and a button that shows them all.
function logitTable(z, labels) {
  let max = -Infinity; // once, in a loop: Math.max(...z) for each value was quadratic, and overflowed the stack
  for (const v of z) if (v > max) max = v;
  const e = z.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  const order = z.map((v, i) => i).sort((a, b) => z[b] - z[a]);
  const rows = (n) => order.slice(0, n).map((i) => [labels[i] ?? String(i), num(z[i], 3),
    [h("meter", { min: 0, max: 1, value: e[i] / sum, "aria-hidden": "true" }), " ", num(e[i] / sum, 4)]]);
  const box = h("div", { tabindex: -1 }); // where the keyboard goes once its button is gone
  const showAll = () => {
    put(box, table(["Label", "Logit", "Softmax"], rows(order.length), { numeric: [1], caption: "Keyed logits" }));
    box.focus();
    announce(`all ${num(order.length)} classes shown`);
  };
  put(box, table(["Label", "Logit", "Softmax"], rows(TOP_LOGITS), { numeric: [1], caption: "Keyed logits" }),
    order.length > TOP_LOGITS ? h("p", { class: "more" }, `The ${TOP_LOGITS} highest of ${num(order.length)} classes. `,
      h("button", { type: "button", class: "secondary", onclick: showAll }, `Show all ${num(order.length)}`)) : null);
  return box;
}
