// Keys (admin): create with scopes, allowlist, quota and expiry (the secret shown once, with a copy
// button), list with usage, revoke. A key without admin gets the API's refusal, as the API words it.
import { formErrors, labelled } from "./forms.js";
import { PAGE, announce, api, enc, errorBox, h, num, olderButton, put, table, when } from "./lib.js";

const SCOPES = ["predict", "distill", "jobs", "deploy", "admin"];

export async function view(el) {
  el.append(h("h1", { tabindex: -1 }, "API keys"));
  const listSec = h("section", { class: "panel", "aria-labelledby": "keys-h" }, h("h2", { id: "keys-h" }, "Keys"));
  let keys, next, usage;
  try {
    ({ keys, next } = await api(`/v1/keys?limit=${PAGE}`)); // first: a key that may not list keys sees the API's answer, nothing else
  } catch (e) { el.append(errorBox(e)); return; }
  const created = h("div", { "aria-live": "polite" });
  const createSec = h("section", { class: "panel", "aria-labelledby": "newkey-h" }, h("h2", { id: "newkey-h" }, "Create a key"));
  el.append(createSec, created, listSec);
  const show = () => put(listSec, listSec.firstChild, keyTable(keys, usage, refresh), older.el);
  const older = olderButton("/v1/keys", "keys", (more) => { keys = keys.concat(more); show(); });
  const refresh = async () => {
    try {
      let page;
      [page, usage] = await Promise.all([api(`/v1/keys?limit=${PAGE}`), api("/v1/usage?days=30")]);
      keys = page.keys;
      older.set(page.next);
      show();
    } catch (e) { listSec.append(errorBox(e)); }
  };
  createSec.append(createForm(created, refresh));
  listSec.append(h("p", {}, `${keys.length}${next ? " or more" : ""} key(s); loading usage…`));
  refresh();
}

function createForm(created, refresh) {
  const name = h("input", { type: "text", autocomplete: "off" });
  const boxes = SCOPES.map((sc) => h("input", { type: "checkbox", value: sc, id: `scope-${sc}` }));
  const scopeGroup = h("fieldset", { "data-path": "scopes" }, h("legend", {}, "Scopes", h("span", { class: "req" }, " (required)")),
    h("div", { class: "scopes" }, boxes.map((b) => h("label", { htmlFor: b.id }, b, b.value))));
  const scopeErr = h("p", { class: "field-error", id: "scope-err" });
  scopeGroup.append(scopeErr);
  const models = h("input", { type: "text", autocomplete: "off", placeholder: "every model" });
  const quota = h("input", { type: "text", inputmode: "numeric", autocomplete: "off", placeholder: "no quota" });
  const win = h("input", { type: "text", inputmode: "numeric", autocomplete: "off", placeholder: "lifetime" });
  const exp = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", placeholder: "never" });
  const numOr = (inp) => { const v = inp.value.trim(); return v === "" ? undefined : Number.isFinite(Number(v)) ? Number(v) : v; };
  const fields = [
    labelled("name", "Name", name, { hint: "for people: who or what uses the key" }),
    { el: scopeGroup, path: "scopes", aliases: ["scope"], value: () => boxes.filter((b) => b.checked).map((b) => b.value),
      setError(t) { scopeErr.textContent = t; scopeGroup.setAttribute("aria-invalid", "true"); },
      clear() { scopeErr.textContent = ""; scopeGroup.removeAttribute("aria-invalid"); }, focus() { boxes[0].focus(); } },
    labelled("models", "Model allowlist", models, { hint: "comma-separated model names; empty: every model" }),
    labelled("quota", "Sample quota", quota, { hint: "keyed samples the key may be served; empty: no quota" }),
    labelled("quota_window_s", "Quota window (seconds)", win, { aliases: ["quota window"], hint: "the quota restarts in fixed windows counted from 1970 (86400: at 00:00 UTC); empty: lifetime" }),
    labelled("expires_days", "Expires in (days)", exp, { aliases: ["expiry", "expires"], hint: "empty: never" }),
  ];
  const submit = h("button", { type: "submit" }, "Create key");
  const form = h("form", { method: "post", novalidate: true, "aria-label": "Create a key" }, fields.map((f) => f.el), h("div", { class: "row" }, submit));
  const errs = formErrors(form, fields).mount();
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errs.clear();
    const body = { name: name.value.trim(), scopes: fields[1].value() };
    const ms = models.value.split(",").map((x) => x.trim()).filter(Boolean);
    if (ms.length) body.models = ms;
    for (const [k, inp] of [["quota", quota], ["quota_window_s", win], ["expires_days", exp]]) {
      const v = numOr(inp);
      if (v !== undefined) body[k] = v;
    }
    submit.disabled = true;
    try {
      const k = await api("/v1/keys", { method: "POST", json: body });
      form.reset();
      showSecret(created, k);
      refresh();
    } catch (err) { errs.show(err); } finally { submit.disabled = false; }
  });
  return form;
}

// The secret, once: in a read-only field with a copy button, gone when dismissed (never in the page's HTML).
function showSecret(where, k) {
  const field = h("input", { type: "text", readonly: true, value: k.key, id: "new-secret", spellcheck: "false", autocomplete: "off" });
  const note = h("span", { role: "status" });
  const copy = h("button", { type: "button", onclick: async () => {
    try { await navigator.clipboard.writeText(field.value); } catch { field.select(); document.execCommand("copy"); }
    note.textContent = "Copied.";
  } }, "Copy");
  const done = h("button", { type: "button", class: "secondary", onclick: () => { field.value = ""; put(where); announce("secret hidden"); } }, "Done, hide it");
  put(where, h("section", { class: "panel notice", "aria-labelledby": "secret-h" },
    h("h2", { id: "secret-h" }, `Key ${k.name || k.id} created`),
    h("p", {}, "Copy its secret now: the server keeps only a hash and will not show it again."),
    h("div", { class: "secret" }, h("label", { htmlFor: "new-secret", class: "visually-hidden" }, "The new key"), field, copy, done, note)));
  field.focus();
  field.select();
}

function keyTable(keys, usage, refresh) {
  const used = Object.fromEntries(usage.keys.map((q) => [q.key_id, q.quota_used]));
  const sums = {};
  for (const u of usage.usage) {
    const s = (sums[u.key_id] = sums[u.key_id] || { requests: 0, samples: 0 });
    s.requests += u.requests;
    s.samples += u.samples;
  }
  const now = Date.now() / 1000;
  const state = (k) => (k.revoked_at ? "revoked" : k.expires_at && k.expires_at <= now ? "expired" : "active");
  const rows = keys.map((k) => { // newest first, as the API lists them
    const act = h("td");
    const revokeBtn = () => h("button", { type: "button", class: "secondary", "aria-label": `Revoke key ${k.name || k.id}`, onclick: () => {
      put(act, h("span", {}, `Revoke ${k.name || k.id}? `),
        h("button", { type: "button", class: "danger", "data-confirm": k.id, onclick: async () => {
          try { await api(`/v1/keys/${enc(k.id)}`, { method: "DELETE" }); announce(`key ${k.id} revoked`); refresh(); } catch (e) { act.append(errorBox(e)); }
        } }, "Revoke key"), " ",
        h("button", { type: "button", class: "secondary", onclick: () => { put(act, revokeBtn()); act.firstChild.focus(); } }, "Keep"));
      act.querySelector("button").focus();
    } }, "Revoke");
    if (state(k) === "active") act.append(revokeBtn());
    const s = sums[k.id] || { requests: 0, samples: 0 };
    const quota = k.quota === null ? "none" : `${num(used[k.id] ?? 0)} / ${num(k.quota)}${k.quota_window_s ? ` per ${num(k.quota_window_s)} s` : ""}`;
    return h("tr", { "data-key": k.id },
      [k.name || "–", h("code", {}, k.id), k.scopes.join(", "), k.models ? k.models.join(", ") : "every model", quota,
        `${num(s.requests)} req., ${num(s.samples)} samples`, when(k.created_at), k.expires_at ? when(k.expires_at) : "never", state(k)]
        .map((c) => h("td", {}, c)), act);
  });
  return h("div", { class: "table-wrap" }, h("table", { id: "keys-table" }, h("caption", { class: "visually-hidden" }, "API keys, newest first"),
    h("thead", {}, h("tr", {}, ["Name", "Id", "Scopes", "Models", "Quota used", "Usage, 30 days", "Created", "Expires", "State", ""]
      .map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows)));
}
