// Jobs: a form per job kind generated from its params schema (GET /v1/job-kinds), a live list (polling),
// and one job's progress, log tail, metrics, curves, artifacts, report and cancel.
import { curveCharts, lineChart } from "./charts.js";
import { formErrors, labelled, schemaForm } from "./forms.js";
import { accuracyHeading, accuracyRows, auditChart, checkTable, heldOut } from "./models.js";
import {
  add, announce, api, bytes, download, enc, errorBox, facts, grants, h, human, num, olderButton, pct, put, statusBadge,
  table, when,
} from "./lib.js";

const ACTIVE = ["queued", "running"];
const progressBar = (j, label) => h("progress", { max: 1, value: j.progress, "aria-label": label || `progress of job ${j.id.slice(0, 8)}` });

// ------------------------------------------------------------------------------------------- the list
export async function list(el, { query }, ctx) {
  el.append(h("h1", { tabindex: -1 }, "Jobs"));
  const submit = h("section", { class: "panel", "aria-labelledby": "new-h" }, h("h2", { id: "new-h" }, "Submit a job"));
  const jobsSec = h("section", { class: "panel", "aria-labelledby": "list-h" },
    h("h2", { id: "list-h" }, grants("admin") ? "Every key's jobs" : "This key's jobs"));
  el.append(submit, jobsSec);
  newJobForm(submit, query);
  const tbody = h("tbody");
  const empty = h("p", { hidden: true }, "No jobs yet.");
  const wrap = h("div", { class: "table-wrap", hidden: true });
  jobsSec.append(empty, add(wrap, h("table", { id: "jobs-table" },
    h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
    h("thead", {}, h("tr", {}, ["Job", "Kind", "Status", "Progress", "Step or result", "Created", ""].map((t) => h("th", { scope: "col" }, t)))),
    tbody)));
  const rows = new Map();
  const notice = h("div"); // a failed refresh's error, one at a time, gone once a refresh is answered
  // The poll reads the newest page; older pages are read on asking, appended, and then left as they were read.
  let olderShown = false;
  const older = olderButton("/v1/jobs", "jobs", (more) => {
    olderShown = true;
    for (const j of more) {
      let r = rows.get(j.id);
      if (!r) { r = jobRow(j, refresh); rows.set(j.id, r); tbody.append(r.tr); }
      r.update(j);
    }
  });
  jobsSec.append(older.el, notice);
  const refresh = async () => {
    let jobs, next;
    try {
      ({ jobs, next } = await api("/v1/jobs?limit=50"));
    } catch (e) { put(notice, errorBox(e)); return false; }
    if (!ctx.alive()) return false;
    put(notice);
    empty.hidden = jobs.length > 0;
    wrap.hidden = jobs.length === 0;
    jobs.forEach((j, i) => {
      let r = rows.get(j.id);
      if (!r) { r = jobRow(j, refresh); rows.set(j.id, r); }
      r.update(j);
      if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
    });
    if (!olderShown) older.set(next); // once older pages are shown, the button goes on from the oldest of them
    return jobs.some((j) => ACTIVE.includes(j.status));
  };
  ctx.poll(refresh, await refresh(), { fast: 1000, slow: 5000, notice });
}

// A row made once and updated in place: its Cancel button was rebuilt on every poll while the job ran, so a click
// whose press and release straddled a poll was lost, and focus fell off the page.
function jobRow(j, refresh) {
  const status = h("td"), step = h("td"), bar = progressBar(j), percent = h("span");
  const link = h("a", { href: `#/jobs/${enc(j.id)}`, class: "mono" }, j.id.slice(0, 8));
  const cancel = cancelButton(j.id, `Cancel job ${j.id.slice(0, 8)}`, "Cancel", link, refresh);
  const tr = h("tr", { "data-job": j.id }, h("td", {}, link), h("td", {}, j.kind), status, h("td", {}, bar, " ", percent),
    step, h("td", {}, when(j.created_at)), h("td", {}, cancel.el));
  let shown = null;
  return {
    tr,
    update(j) {
      const key = `${j.status}|${j.progress}|${j.step}|${j.cancel_requested}`;
      if (key === shown) return;
      shown = key;
      put(status, statusBadge(j.status));
      showProgress(bar, percent, j);
      step.textContent = j.error || (ACTIVE.includes(j.status) ? j.step : j.message || j.step);
      cancel.show(ACTIVE.includes(j.status) && !j.cancel_requested);
    },
  };
}

function showProgress(bar, percent, j) {
  bar.value = j.progress;
  percent.textContent = `${Math.round(j.progress * 100)} %`;
}

// A job's Cancel button, made once: show(false) hides it, and moves the focus it had to `after` (a keyboard user
// keeps their place); a refusal is said beside it until the next click.
function cancelButton(id, label, text, after, asked = () => {}) {
  const error = h("span");
  let asking = false;
  const button = h("button", { type: "button", class: "secondary", "aria-label": label, onclick: async () => {
    if (asking) return; // one request per click, however often it is pressed while the first is out
    asking = true;
    put(error);
    try {
      await api(`/v1/jobs/${enc(id)}/cancel`, { method: "POST" });
      announce("cancel asked");
      asked();
    } catch (e) { put(error, errorBox(e)); } finally { asking = false; }
  } }, text);
  return {
    el: h("span", {}, button, error),
    show(on) {
      if (button.hidden === !on) return;
      const focused = document.activeElement === button;
      button.hidden = !on;
      if (focused && !on) after.focus();
    },
  };
}

async function newJobForm(sec, query) {
  let info, files = [], models = [];
  try {
    [info, files, models] = await Promise.all([api("/v1/job-kinds"),
      (grants("jobs") ? api("/v1/files").then((r) => r.files) : Promise.resolve([])),
      api("/v1/models").then((r) => r.models).catch(() => [])]);
  } catch (e) { sec.append(errorBox(e)); return; }
  const ctx = { files, models, datasets: info.datasets, architectures: info.architectures };
  const kinds = Object.fromEntries(info.kinds.map((k) => [k.name, k]));
  const pick = h("select", {}, h("option", { value: "" }, "Choose a kind…"), info.kinds.map((k) => h("option", { value: k.name }, k.name)));
  const kindF = labelled("kind", "Job kind", pick);
  const about = h("p", { class: "hint" });
  const body = h("div");
  const form = h("form", { method: "post", novalidate: true, "aria-label": "New job" }, kindF.el, about, body);
  const submit = h("button", { type: "submit" }, "Submit job");
  let current = null, errs = formErrors(form, [kindF]);
  const show = (name, prefill = {}) => {
    put(body);
    about.textContent = name ? kinds[name].description : "";
    current = name ? schemaForm(kinds[name].params_schema, ctx, prefill) : null;
    errs = formErrors(form, [kindF, ...(current ? current.fields : [])]);
    if (current) body.append(current.el, h("div", { class: "row" }, submit), errs.error);
  };
  pick.addEventListener("change", () => show(pick.value));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errs.clear();
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: { kind: pick.value, params: current.params() } });
      announce(`job ${job.id.slice(0, 8)} queued`);
      location.hash = `#/jobs/${enc(job.id)}`;
    } catch (err) { errs.show(err); } finally { submit.disabled = false; }
  });
  sec.append(form);
  const kind = query.get("kind");
  if (kind && kinds[kind]) {
    pick.value = kind;
    show(kind, Object.fromEntries([...query.entries()].filter(([k]) => k !== "kind")));
  }
}

// ------------------------------------------------------------------------------------------- one job
export async function detail(el, { params: [id] }, ctx) {
  el.append(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")));
  const title = h("h1", { tabindex: -1 }, `Job ${id.slice(0, 8)}`);
  // Made once and updated in place as the job moves: the Cancel button and the open Parameters stay put
  const state = h("p"), bar = progressBar({ id, progress: 0 }, "progress"), percent = h("span"), outcome = h("div");
  const cancel = cancelButton(id, null, "Cancel job", title);
  cancel.show(false);
  const head = h("div", { class: "bigprogress", hidden: true }, state, h("p", {}, bar, " ", percent), outcome, cancel.el);
  const infoFacts = h("div");
  let paramsBox = null; // the job's parameters, which do not change: made once, so that it stays open once opened
  const info = h("section", { class: "panel", "aria-labelledby": "info-h" }, h("h2", { id: "info-h" }, "Details"), infoFacts);
  const metrics = h("section", { class: "panel", "aria-labelledby": "met-h" }, h("h2", { id: "met-h" }, "Metrics"));
  const curves = h("section", { class: "panel", id: "curves", "aria-labelledby": "cur-h" }, h("h2", { id: "cur-h" }, "Training curves"));
  const report = h("section", { class: "panel", id: "report", hidden: true, "aria-labelledby": "rep-h" }, h("h2", { id: "rep-h" }, "Report"));
  const arts = h("section", { class: "panel", "aria-labelledby": "art-h" }, h("h2", { id: "art-h" }, "Artifacts"));
  const logPre = h("pre", { class: "log", tabindex: 0, "aria-label": "log tail" });
  const logSec = h("section", { class: "panel", "aria-labelledby": "log-h" }, h("h2", { id: "log-h" }, "Log"), logPre);
  const notice = h("div"); // a failed poll's error, shown until the next answer
  el.append(title, head, notice, info, metrics, curves, report, arts, logSec);
  const live = {}; // metric → [[x, value]] seen while polling (report.json has the full curves at the end)
  let offset = 0, lines = [], finished = false, lastKey = "";
  const tick = async () => {
    let j;
    try {
      j = await api(`/v1/jobs/${enc(id)}`);
    } catch (e) {
      // One refused poll (a 429, a server restarting) stopped the page for good, its status and Cancel gone:
      // it says so and polls on, unless the job is gone or not this key's
      put(notice, errorBox(e, "Could not refresh"));
      return ctx.alive() && e.status !== 404 && e.status !== 403;
    }
    if (!ctx.alive()) return false;
    put(notice);
    title.textContent = `Job ${j.id.slice(0, 8)}: ${j.kind}`;
    const key = `${j.status}|${j.progress}|${j.step}|${j.cancel_requested}`;
    if (key !== lastKey) {
      lastKey = key;
      head.hidden = false;
      put(state, statusBadge(j.status), " ", j.step === j.status ? "" : j.step, j.cancel_requested && ACTIVE.includes(j.status) ? " (cancel asked)" : "");
      showProgress(bar, percent, j);
      put(outcome, j.error ? h("p", { class: "error", role: "alert" }, j.error) : j.message ? h("p", {}, j.message) : null);
      cancel.show(ACTIVE.includes(j.status) && !j.cancel_requested);
      put(infoFacts, facts([["Kind", j.kind], ["Status", j.status], ["Created", when(j.created_at)],
        ["Started", when(j.started_at)], ["Finished", when(j.finished_at)], ["Worker", j.worker], ["Attempts", j.attempts],
        ["Backend", j.backend], ["Owner", j.owner]]));
      if (!paramsBox) info.append(paramsBox = h("details", {}, h("summary", {}, "Parameters"), h("pre", {}, JSON.stringify(j.params, null, 2))));
    }
    const mrows = Object.entries(j.metrics || {}).filter(([, v]) => typeof v === "number");
    const plotted = mrows.filter(([k]) => k !== "attempt");
    put(metrics, metrics.firstChild, mrows.length ? table(["Metric", "Value"], mrows.map(([k, v]) => [k, num(v, 4)]), { numeric: [1] })
      : h("p", {}, "None yet."));
    if (ACTIVE.includes(j.status) && plotted.length) {
      const x = (Date.now() / 1000 - (j.started_at || j.created_at));
      for (const [k, v] of plotted) (live[k] = live[k] || []).push([x, v]);
      const groups = [Object.keys(live).filter((k) => /acc/.test(k)), Object.keys(live).filter((k) => !/acc/.test(k))];
      put(curves, curves.firstChild, h("p", { class: "hint" }, "Live, as polled; the full curves come with the report."),
        groups.filter((g) => g.length).map((g) => lineChart(`${j.step.split(" ")[0]}: ${g.join(", ")}`,
          g.map((k) => ({ name: k, points: live[k] })), { xLabel: "seconds" })));
    }
    try { // the log tail
      for (let more = true; more;) {
        const c = await api(`/v1/jobs/${enc(id)}/logs?offset=${offset}&limit=65536`);
        more = c.next_offset > offset && c.text.length > 0 && !c.done && c.next_offset - offset >= 65536;
        offset = c.next_offset;
        if (c.text) {
          lines = lines.concat(c.text.split("\n").filter(Boolean)).slice(-300);
          const atEnd = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 4;
          logPre.textContent = lines.join("\n");
          if (atEnd) logPre.scrollTop = logPre.scrollHeight;
        }
      }
    } catch { /* the log is best effort; the status above says what matters */ }
    if (!ACTIVE.includes(j.status) && !finished) {
      finished = true;
      announce(`job ${j.status}`);
      await ended(j, curves, report, arts, ctx);
    }
    return ACTIVE.includes(j.status);
  };
  ctx.poll(tick, await tick(), { fast: 1000, notice });
}

async function ended(j, curves, report, arts, ctx) {
  let names = [];
  try {
    ({ artifacts: names } = await api(`/v1/jobs/${enc(j.id)}/artifacts`));
  } catch (e) { arts.append(errorBox(e)); }
  if (!ctx.alive()) return;
  arts.append(names.length ? table(["Artifact", "Size", ""], names.map((a) => [a.name, bytes(a.size),
    h("button", { type: "button", class: "secondary", "aria-label": `Download ${a.name}`, "data-artifact": a.name, onclick: async (e) => {
      try { await download(`/v1/jobs/${enc(j.id)}/artifacts/${enc(a.name)}`, a.name); announce(`downloaded ${a.name}`); } catch (err) { e.target.after(errorBox(err)); }
    } }, "Download")]), { numeric: [1], caption: "Artifacts" }) : h("p", {}, "No artifacts."));
  if (!names.some((a) => a.name === "report.json")) {
    const why = j.status === "succeeded" ? "No curves recorded." : `No report: the job ${j.status}.`;
    if (curves.querySelector("figure")) curves.append(h("p", {}, why, " The curves above are as they were polled."));
    else put(curves, curves.firstChild, h("p", {}, why));
    return;
  }
  let r;
  try {
    r = await api(`/v1/jobs/${enc(j.id)}/artifacts/report.json`);
  } catch (e) { report.hidden = false; report.append(errorBox(e)); return; }
  if (!ctx.alive()) return;
  const charts = curveCharts(r.curves);
  put(curves, curves.firstChild, charts.length ? charts : h("p", {}, "This job recorded no training curves."));
  report.hidden = false;
  add(report, j.kind === "wrap" ? wrapReport(j, r) : j.kind === "audit" ? auditReport(r.audit)
    : facts([["Summary", r.summary], ...Object.entries(j.result || {}).map(([k, v]) => [human(k), typeof v === "object" ? JSON.stringify(v) : String(v)])]));
}

function wrapReport(j, r) {
  const res = j.result || {}, check = (r.report || {}).check, m = r.metrics || {};
  const out = [h("p", {}, r.summary || "", res.deployed ? [" ", h("a", { href: `#/models/${enc(res.model)}?version=${enc(res.version)}` }, `Open ${res.model} version ${res.version}`)] : "")];
  out.push(accuracyHeading(check && check.val_size), table(["Figure", "Value"], accuracyRows(m), { numeric: [1], caption: "Accuracy of the box" }));
  if (check) {
    out.push(h("h3", {}, "The wrap's self-check"), h("p", {}, "Self-check: ", h("span", { class: `badge ${check.passed ? "good" : "bad"}` }, check.passed ? "passed" : "refused"),
      ` after ${(check.attempts || []).length} attempt(s) on ${heldOut(check.val_size)}.`));
    out.push(checkTable(check.figures, check.thresholds));
  }
  return out;
}

function auditReport(a) {
  if (!a) return h("p", {}, "No audit in the report.");
  return [h("p", {}, "Verdict: ", h("span", { class: `badge ${a.verdict === "protected" ? "good" : "bad"}`, "data-verdict": a.verdict }, a.verdict),
    ` — ${a.target} on ${a.dataset}, policy ${a.policy}; largest advantage ${num(a.max_advantage)} points (${a.worst_attack}), threshold ${a.config.threshold}.`),
  auditChart(a),
  h("details", {}, h("summary", {}, "Every attack"), table(["Attack", "Accuracy", "Advantage"],
    Object.entries(a.attacks).map(([n, x]) => [n, pct(x.acc), x.label_only ? (n === a.reference ? "(reference)" : "labels only") : num(x.advantage)]),
    { numeric: [1, 2] }))];
}
