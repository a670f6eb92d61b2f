// Forms: one built from a job kind's params JSON schema (the pydantic model POST /v1/jobs validates
// with), and the mapping of an API error onto the field it is about. The browser validates nothing
// itself: the API's answer is the one shown, next to its field.
import { h, human, uid } from "./lib.js";

// ------------------------------------------------------------------------------------------- errors
// A form: {fields: [{path, aliases, value(), setError(msg), clear(), focus()}], error: <p>, fallback: path}
export function formErrors(formEl, fields, fallback = null) {
  const error = h("p", { class: "form-error", role: "alert" });
  return {
    fields, error, fallback,
    clear() { error.textContent = ""; fields.forEach((f) => f.clear()); },
    show(err) { showError(this, err); },
    mount(where = formEl) { where.append(error); return this; },
  };
}

function fieldFor(form, part, paths) {
  const known = (p) => {
    while (p) { // a list item (teachers.0.model) or a sub-field falls to the nearest field the form has
      const f = form.fields.find((x) => x.path === p);
      if (f) return f;
      p = p.includes(".") ? p.slice(0, p.lastIndexOf(".")) : "";
    }
    return null;
  };
  let m = part.match(/^(?:params\.)?([A-Za-z_][\w.]*): /); // pydantic's "field.sub: message"
  if (m) { const f = known(m[1]); if (f) return f; }
  for (const f of [...form.fields].sort((a, b) => b.path.length - a.path.length)) { // "quota must be >= 0"
    for (const w of [f.path, ...(f.aliases || [])]) {
      const word = w.toLowerCase().replace(/_/g, " "), lower = part.toLowerCase();
      if ((lower.startsWith(word) && !/[a-z0-9]/.test(lower.charAt(word.length))) || part.startsWith(w + " ")) return f;
    }
  }
  for (m of part.matchAll(/'([^']+)'/g)) { // a value the form sent, quoted in the message
    const f = form.fields.find((x) => { const v = x.value(); return v !== undefined && String(v) === m[1]; });
    if (f) return f;
  }
  m = part.match(/\bfor ([A-Za-z_][\w.]*)/); // "unknown data set 'x' for data"
  if (m) { const f = known(m[1]); if (f) return f; }
  return paths ? known(form.fallback || "") : null;
}

function showError(form, err) {
  form.clear();
  const msg = err.message || String(err);
  // "a: why; b.c: why" (pydantic's errors, one per field) in parts; a "; " inside one message stays in it
  const isField = (p) => { const m = p.match(/^(?:params\.)?([A-Za-z_][\w.]*): /); return m && fieldFor(form, m[0], false); };
  const parts = [];
  for (const p of msg.split("; ")) {
    if (parts.length && !isField(p)) parts[parts.length - 1] += "; " + p;
    else parts.push(p);
  }
  const placed = new Map();
  for (const part of parts) {
    const f = fieldFor(form, part, true);
    if (f) placed.set(f, [...(placed.get(f) || []), part.replace(/^params\./, "")]);
  }
  for (const [f, texts] of placed) f.setError(texts.join("; "));
  const first = [...placed.keys()][0];
  const code = err.status ? ` (${err.status} ${err.code})` : "";
  form.error.textContent = placed.size
    ? `Not saved${code}: the server refused ${placed.size === 1 ? "a field" : placed.size + " fields"}; each says why.`
    : `Not saved${code}: ${msg}`;
  if (first) first.focus();
}

// A labelled control with its hint and its error line, wired for screen readers.
export function labelled(path, label, control, { hint, required, aliases, value, check = false } = {}) {
  const id = control.id || (control.id = uid("f"));
  const errId = `${id}-err`, hintId = `${id}-hint`;
  const err = h("p", { class: "field-error", id: errId });
  control.setAttribute("aria-describedby", [hint ? hintId : "", errId].filter(Boolean).join(" "));
  const lab = h("label", { htmlFor: id }, label, required ? h("span", { class: "req" }, " (required)") : null);
  const el = h("div", { class: check ? "field check" : "field", "data-path": path },
    check ? [control, lab] : [lab, control], hint ? h("p", { class: "hint", id: hintId }, hint) : null, err);
  return {
    el, path, aliases,
    value: value || (() => control.value),
    setError(text) {
      err.textContent = text;
      control.setAttribute("aria-invalid", "true");
      for (let d = el.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
    },
    clear() { err.textContent = ""; control.removeAttribute("aria-invalid"); },
    focus() { control.focus(); },
  };
}

// ------------------------------------------------------------------------------------------- schema → form
function resolve(prop, defs) {
  let p = prop, nullable = false;
  if (p.anyOf) {
    const rest = p.anyOf.filter((x) => x.type !== "null");
    nullable = rest.length < p.anyOf.length;
    if (rest.length === 1) {
      const { anyOf, ...outer } = p; // eslint-disable-line no-unused-vars
      p = { ...rest[0], ...outer };
    }
  }
  if (p.$ref) {
    const { $ref, ...outer } = p;
    p = { ...defs[$ref.split("/").pop()], ...outer };
  }
  return { p, nullable };
}

// What a string field lists: data sets, architectures, hosted models, or the key's files of a purpose.
function suggestions(name, p, ctx) {
  const d = `${name} ${p.description || ""}`.toLowerCase();
  const files = (purpose) => ctx.files.filter((f) => f.purpose === purpose).map((f) => [f.id, `${f.filename} (${f.purpose})`]);
  if (name === "arch" || name === "student") return ctx.architectures.map((a) => [a, "architecture"]);
  if (name === "model") return ctx.models.map((m) => [m.name, `hosted model, ${m.mode}`]);
  if (/data set|dataset/.test(d)) return [...ctx.datasets.map((n) => [n, "embedded data set"]), ...files("dataset")];
  if (/image/.test(d) && /file id/.test(d)) return files("image");
  if (/weights/.test(d)) return files("weights");
  if (/bundle/.test(d)) return files("bundle");
  return null;
}

function leaf(path, name, p, required, ctx) {
  const label = human(name);
  const hintBits = [p.description, p.default !== undefined && p.default !== null ? `default ${JSON.stringify(p.default)}` : ""];
  const hint = hintBits.filter(Boolean).join(" · ");
  const opts = { hint, required };
  if (p.enum) {
    const sel = h("select", {}, h("option", { value: "" }, required ? "Choose…" : `default${p.default !== undefined ? ` (${p.default})` : ""}`),
      p.enum.map((v) => h("option", { value: String(v) }, String(v))));
    return labelled(path, label, sel, { ...opts, value: () => (sel.value === "" ? undefined : p.enum.find((v) => String(v) === sel.value)) });
  }
  if (p.type === "boolean") {
    const box = h("input", { type: "checkbox", checked: !!p.default });
    return labelled(path, label, box, { ...opts, check: true, value: () => (box.checked === !!p.default ? undefined : box.checked) });
  }
  if (p.type === "integer" || p.type === "number") {
    const inp = h("input", { type: "text", inputmode: p.type === "integer" ? "numeric" : "decimal", autocomplete: "off",
      placeholder: p.default !== undefined && p.default !== null ? String(p.default) : "" });
    return labelled(path, label, inp, { ...opts, value: () => {
      const v = inp.value.trim();
      return v === "" ? undefined : Number.isFinite(Number(v)) ? Number(v) : v; // the API says what is wrong
    } });
  }
  if (p.type === "array" && p.items && !p.items.$ref && ["integer", "number", "string"].includes(p.items.type)) {
    const t = p.items.type;
    const inp = h("input", { type: "text", autocomplete: "off", placeholder: "comma-separated" });
    return labelled(path, label, inp, { ...opts, hint: [hint, "comma-separated"].filter(Boolean).join(" · "), value: () => {
      const v = inp.value.trim();
      if (v === "") return undefined;
      return v.split(",").map((x) => x.trim()).filter(Boolean).map((x) => (t === "string" || !Number.isFinite(Number(x)) ? x : Number(x)));
    } });
  }
  if (p.type === "array" || p.type === "object") { // lists of objects: JSON, as the API takes it
    const ta = h("textarea", { spellcheck: "false", placeholder: p.type === "array" ? '[{"model": "…"}]' : "{}" });
    return labelled(path, label, ta, { ...opts, hint: [hint, "JSON"].filter(Boolean).join(" · "), value: () => {
      const v = ta.value.trim();
      if (v === "") return undefined;
      try { return JSON.parse(v); } catch { return v; } // sent as text: the API's error names the field
    } });
  }
  const inp = h("input", { type: "text", autocomplete: "off", spellcheck: "false",
    placeholder: p.default !== undefined && p.default !== null ? String(p.default) : "" });
  const list = suggestions(name, p, ctx);
  let extra = null;
  if (list && list.length) {
    const id = uid("list");
    inp.setAttribute("list", id);
    extra = h("datalist", { id }, list.map(([v, l]) => h("option", { value: v, label: l })));
  }
  const f = labelled(path, label, inp, { ...opts, hint: list ? [hint, "type or pick from the list"].filter(Boolean).join(" · ") : hint,
    value: () => (inp.value.trim() === "" ? undefined : inp.value.trim()) });
  if (extra) f.el.append(extra);
  return f;
}

function objectField(path, name, p, required, ctx, defs, fields) {
  const fs = h("fieldset", { "data-path": path }, h("legend", {}, human(name), required ? h("span", { class: "req" }, " (required)") : null));
  if (p.description) fs.append(h("p", { class: "hint" }, p.description));
  const kids = build(p, ctx, defs, fields, path ? path + "." : "", fs);
  const err = h("p", { class: "field-error" });
  fs.append(err);
  const f = {
    el: fs, path,
    value() {
      const o = {};
      for (const k of kids) { const v = k.value(); if (v !== undefined) o[k.key] = v; }
      return Object.keys(o).length || required ? o : undefined;
    },
    setError(text) { err.textContent = text; fs.setAttribute("aria-invalid", "true"); for (let d = fs.closest("details"); d; d = d.parentElement.closest("details")) d.open = true; },
    clear() { err.textContent = ""; fs.removeAttribute("aria-invalid"); },
    focus() { (fs.querySelector("input, select, textarea") || fs).focus(); },
  };
  return f;
}

const RESOURCES = ["cpus", "gpus", "seed"];

function build(schema, ctx, defs, fields, prefix, container, split = false) {
  const required = new Set(schema.required || []);
  const kids = [];
  const more = split ? h("details", {}, h("summary", {}, "More settings (defaults apply when left empty)")) : null;
  const res = split ? h("details", {}, h("summary", {}, "Resources (a Ray cluster's CPUs and GPUs, the seed)")) : null;
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const { p } = resolve(prop, defs);
    const path = prefix + name;
    const req = required.has(name);
    const f = p.type === "object" && p.properties ? objectField(path, name, p, req, ctx, defs, fields) : leaf(path, name, p, req, ctx);
    f.key = name;
    fields.push(f);
    kids.push(f);
    (split && RESOURCES.includes(name) ? res : split && !req ? more : container).append(f.el);
  }
  if (split) container.append(more, res);
  return kids;
}

// The form of a job kind: {el, params(), errors}
export function schemaForm(schema, ctx, prefill = {}) {
  const defs = schema.$defs || {};
  const fields = [];
  const el = h("div", { class: "schema-form" });
  const top = build(schema, ctx, defs, fields, "", el, true);
  for (const [path, v] of Object.entries(prefill)) {
    const f = fields.find((x) => x.path === path);
    const c = f && f.el.querySelector("input, select, textarea");
    if (c) c.value = v;
  }
  return {
    el, fields,
    params() {
      const o = {};
      for (const k of top) { const v = k.value(); if (v !== undefined) o[k.key] = v; }
      return o;
    },
  };
}

