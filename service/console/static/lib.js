// The console's plumbing: the API client (the key from sessionStorage, sent only as a Bearer header),
// DOM building that only ever inserts text (never HTML), and formatting.

const KEY = "sdb.console.key";

// The path prefix the service is served under behind a proxy ("" at the host's root, else like "/sdb"), which
// the server writes in the page (service/routes/console.py): every URL of this server the console asks for or
// links to is url(path), path from the host's root ("/v1/models", "/docs#/…"): a relative one breaks where the
// page's address is the prefix without a trailing slash ("/sdb").
const ROOT = document.querySelector('meta[name="sdb-root"]')?.getAttribute("content") ?? "";
export const url = (path) => ROOT + path;

export const session = {
  me: null, // GET /v1/keys/me of the signed-in key
  get key() { return sessionStorage.getItem(KEY); },
  set(token) { sessionStorage.setItem(KEY, token); },
  clear() { sessionStorage.removeItem(KEY); this.me = null; },
  onUnauthorized: null,
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// One request to the REST API (`path` as url() takes it). `json` sends a JSON body, `body` anything fetch
// takes (FormData, Blob); `token` overrides the stored key (signing in); `raw` returns the Response. Errors are
// ApiError with the API's own code and message.
export async function api(path, { method = "GET", json, body, token, raw = false } = {}) {
  const headers = {};
  const key = token ?? session.key;
  // fetch refuses a header of other than Latin-1 before sending anything, which read as "the server did not answer"
  if (key && /[^\x21-\x7e]/.test(key)) {
    throw new ApiError(0, "invalid_key", "this is not an API key: it holds a space, a quote or an invisible character (copy it again)");
  }
  if (key) headers.Authorization = "Bearer " + key;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let r;
  try {
    r = await fetch(url(path), { method, headers, body, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
  } catch (e) {
    throw new ApiError(0, "network_error", "the server did not answer (" + e.message + ")");
  }
  if (!r.ok) {
    const text = await r.text().catch(() => "");
    let code = "error", message = reason(r, text);
    try {
      const d = JSON.parse(text);
      if (d && typeof d.error === "object") ({ code = code, message = message } = d.error);
      else if (d && typeof d.error === "string") message = d.error;
    } catch { /* not JSON: a proxy's own page, said by its reason */ }
    const err = new ApiError(r.status, code, message);
    if (r.status === 401 && token === undefined && session.onUnauthorized) session.onUnauthorized(err);
    throw err;
  }
  if (raw) return r;
  return r.json();
}

// The standard reason phrases of the statuses a proxy answers with itself (RFC 9110): HTTP/2 carries none, so
// statusText is empty there and a proxy's 413 read as "request failed".
const REASONS = { 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
  408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long", 429: "Too Many Requests",
  431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
  504: "Gateway Timeout" };

// Why a response that is not the API's JSON failed: the <title> of a proxy's HTML error page (nginx's "413 Request
// Entity Too Large"), as text (the page is never parsed as HTML), else "HTTP <status>" and its reason phrase.
function reason(r, text) {
  const title = /<title[^>]*>([^<]*)<\/title>/i.exec(text.slice(0, 10000));
  const said = title ? title[1].replace(/\s+/g, " ").trim().slice(0, 300) : "";
  return said || `HTTP ${r.status} ${r.statusText || REASONS[r.status] || ""}`.trim();
}

export const enc = encodeURIComponent;

// A float32 .npy array (numpy's format 1.0, what np.save writes) of `nested`, an array of `shape` as JSON holds it:
// the binary body /predict and /distill take (docs/api.md, "Binary tensors"), 4 bytes a value where JSON takes
// about 20 (a photo's inputs for a 3x384x384 model were 8.6 MB of JSON, over the server's 8 MiB JSON limit).
export function npyBlob(nested, shape) {
  const values = nested.flat(Infinity);
  const dims = shape.join(", ") + (shape.length === 1 ? "," : "");
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${dims}), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n"; // the data starts 64-byte aligned, as numpy writes it
  const text = "\x93NUMPY\x01\x00" + String.fromCharCode(header.length & 0xff, header.length >> 8) + header;
  const head = Uint8Array.from(text, (c) => c.charCodeAt(0)); // the magic, version 1.0, the header's length, the header
  const data = new DataView(new ArrayBuffer(values.length * 4));
  values.forEach((v, i) => data.setFloat32(i * 4, v, true)); // little-endian, as '<f4' says, whatever the machine's
  return new Blob([head, data], { type: "application/x-npy" });
}

// What the signed-in key may do, as service/auth.py decides it: admin implies everything, distill implies predict.
export function grants(scope) {
  const s = session.me ? session.me.scopes : [];
  return s.includes(scope) || s.includes("admin") || (scope === "predict" && s.includes("distill"));
}

export function allowsModel(name) {
  const m = session.me && session.me.models;
  return !m || m.includes(name);
}

// ------------------------------------------------------------------------------------------- DOM
const PROPS = new Set(["value", "checked", "disabled", "hidden", "selected", "htmlFor", "multiple", "open"]);

// h("p", {class: "x", onclick: fn}, "text", child, [more]) — strings become text nodes, never markup.
export function h(tag, attrs, ...kids) {
  return build(document.createElement(tag), attrs, kids);
}

const SVG = "http://www.w3.org/2000/svg";
export function s(tag, attrs, ...kids) {
  return build(document.createElementNS(SVG, tag), attrs, kids);
}

function build(el, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", v);
    else if (PROPS.has(k)) el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  add(el, kids);
  return el;
}

// Replace an element's children (null and false are nothing, as in h()).
export function put(el, ...kids) {
  el.replaceChildren();
  return add(el, kids);
}

export function add(el, kids) {
  for (const c of [kids].flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// The API's refusal, as it said it: message, status and code.
export function errorBox(err, prefix = "The server refused") {
  return h("div", { class: "error", role: "alert" }, `${prefix}: `, err.message,
    err.status ? h("span", { class: "muted" }, ` (${err.status} ${err.code})`) : null);
}

export function announce(text) {
  const el = document.getElementById("status");
  el.textContent = "";
  setTimeout(() => { el.textContent = text; }, 30);
}

export function table(headers, rows, { caption, numeric = [] } = {}) {
  const num = (i) => (numeric.includes(i) ? "num" : undefined);
  return h("div", { class: "table-wrap" }, h("table", {},
    caption ? h("caption", { class: "visually-hidden" }, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((t, i) => h("th", { scope: "col", class: num(i) }, t)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: num(i) }, c)))))));
}

export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.filter((p) => p && p[1] !== undefined && p[1] !== null && p[1] !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

let ids = 0;
export const uid = (p = "id") => `${p}-${++ids}`;

// ------------------------------------------------------------------------------------------- formatting
export function num(x, digits = 2) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? x.toLocaleString("en") : x.toFixed(digits);
}

export const pct = (x) => (typeof x === "number" ? `${x.toFixed(1)} %` : "–");

// The browser's local time with its offset from UTC (ISO 8601): the CLI and the API's days are UTC, and a time
// without its zone read as either.
export function when(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  const p = (n) => String(n).padStart(2, "0");
  const east = -d.getTimezoneOffset(); // minutes ahead of UTC, at that date (summer time included)
  const zone = `${east < 0 ? "-" : "+"}${p(Math.floor(Math.abs(east) / 60))}:${p(Math.abs(east) % 60)}`;
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())} ${zone}`;
}

export function bytes(n) {
  if (typeof n !== "number") return "–";
  const u = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

export const human = (name) => name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

export const MODES = { sdb: "SDB", nasty: "Nasty", plain: "plain" };

export function policyText(p) {
  if (!p) return "–";
  const base = p.policy === "top_k" ? `top ${p.top_k}` : p.policy;
  return p.decimals ? `${base}, ${p.decimals} decimals` : base;
}

export function statusBadge(status) {
  const cls = { succeeded: "good", failed: "bad", cancelled: "warn" }[status] || "";
  return h("span", { class: `badge ${cls}`, "data-status": status }, status);
}

// Download through fetch (the key goes in the header, never in a URL), then save the blob.
export async function download(path, filename) {
  const r = await api(path, { raw: true });
  const blobUrl = URL.createObjectURL(await r.blob());
  const a = h("a", { href: blobUrl, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(blobUrl), 10000);
}

export const PAGE = 100; // rows the console's lists ask for at a time

// A list's "Show older" button, under a list the API answers a page at a time (newest first): it asks `path` for the
// page after `next` (its answer's), hands its rows (`answer[what]`) to `add`, and hides once no page follows.
// set(next) starts it again from a first page read anew.
export function olderButton(path, what, add) {
  let after = null;
  let generation = 0; // one more each time set() moves the start: a page asked for from the old one is dropped
  const error = h("span");
  const button = h("button", { type: "button", class: "secondary", hidden: true, onclick: async () => {
    const asked = generation;
    button.disabled = true;
    put(error);
    try {
      const r = await api(`${path}${path.includes("?") ? "&" : "?"}limit=${PAGE}&before=${enc(after)}`);
      if (asked !== generation) return; // a create, upload or delete moved the first page meanwhile: ask again
      add(r[what]);
      announce(`${r[what].length} older ${what} shown`);
      set(r.next);
      if (!button.hidden) button.focus(); // the list was drawn again under it: the keyboard stays where it was
    } catch (e) { put(error, errorBox(e)); } finally { button.disabled = false; }
  } }, `Show older ${what}`);
  const set = (next) => {
    if ((next || null) !== after) generation += 1;
    after = next || null;
    button.hidden = !after;
  };
  return { el: h("p", { class: "more" }, button, error), set };
}
