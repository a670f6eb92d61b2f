// The console's entry: sign in and out, the sections the key's scopes open, and a hash router
// (#/models, #/models/NAME, #/jobs, #/jobs/ID, #/keys, #/files). No secret ever goes in a URL.
import * as files from "./files.js";
import * as jobs from "./jobs.js";
import * as keys from "./keys.js";
import { ApiError, api, errorBox, grants, h, put, session } from "./lib.js";
import * as models from "./models.js";

const $ = (id) => document.getElementById(id);
const view = $("view");

const ROUTES = [
  [/^\/(models)?$/, models.list, "models"],
  [/^\/models\/([^/]+)$/, models.detail, "models"],
  [/^\/jobs$/, jobs.list, "jobs"],
  [/^\/jobs\/([^/]+)$/, jobs.detail, "jobs"],
  [/^\/keys$/, keys.view, "keys"],
  [/^\/files$/, files.view, "files"],
];

let current = null; // the shown view's context: its timers stop when another view replaces it

function context() {
  const timers = new Set();
  let alive = true;
  return {
    alive: () => alive,
    // Call fn again in `fast` ms while it returns true, else in `slow` ms (null: stop). One call that throws
    // stopped every later refresh of the page for good: its error goes in `notice` (as a refused refresh's does,
    // gone with the next answer) and the polling goes on at the pace it had.
    poll(fn, active, { fast = 1000, slow = null, notice } = {}) {
      const next = (on) => {
        if (!alive || (!on && slow === null)) return;
        const t = setTimeout(async () => {
          timers.delete(t);
          let again = on;
          try {
            again = await fn();
          } catch (e) {
            if (alive && notice) put(notice, errorBox(e, "Could not refresh"));
            if (!(e instanceof ApiError)) console.error(e); // a bug in the page: said in the browser's console too
          }
          next(again);
        }, on ? fast : slow);
        timers.add(t);
      };
      next(active);
    },
    stop() { alive = false; timers.forEach(clearTimeout); timers.clear(); },
  };
}

function scopeAllows(scope) {
  if (!scope) return true;
  if (scope === "files") return grants("jobs") || grants("deploy");
  return grants(scope);
}

async function route() {
  if (!session.me) return;
  const raw = location.hash.startsWith("#/") ? location.hash.slice(1) : "/models";
  const [path, qs] = raw.split("?");
  if (current) current.stop();
  current = context();
  // Each view draws into a page of its own: what it adds after an await (an error, a late section) lands in a
  // detached page once another view or the sign-in form has replaced it, never under them.
  const page = h("div", { class: "page" });
  put(view, page);
  const hit = ROUTES.map(([re, fn, section]) => [path.match(re), fn, section]).find(([m]) => m);
  let params = null;
  try {
    params = hit ? hit[0].slice(1).map(decodeURIComponent) : null;
  } catch { /* a % that starts no escape (#/models/%): no such page, not an uncaught URIError on a blank one */ }
  for (const a of document.querySelectorAll("#nav a")) {
    if (hit && a.dataset.section === hit[2]) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!hit || !params) {
    page.append(h("h1", { tabindex: -1 }, "Not found"), h("p", {}, "No such page. ", h("a", { href: "#/models" }, "Models")));
    return;
  }
  const fn = hit[1];
  const ctx = current;
  const done = fn(page, { params, query: new URLSearchParams(qs || "") }, ctx);
  const heading = page.querySelector("h1");
  if (heading && document.activeElement !== $("signin-key")) heading.focus({ preventScroll: true });
  await done;
}

function showSignedIn() {
  const me = session.me;
  $("signin").hidden = true;
  $("nav").hidden = false;
  for (const a of document.querySelectorAll("#nav a")) a.hidden = !scopeAllows(a.dataset.scope);
  $("who").hidden = false;
  put($("who-name"), h("span", {}, me.name || "API key", " "), h("code", {}, me.id),
    h("span", { class: "muted" }, ` · ${me.scopes.join(", ")}`));
}

function showSignIn(message = "") {
  if (current) current.stop();
  current = null;
  put(view);
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("signin-key").value = "";
  $("signin-error").textContent = message;
  if (message) $("signin-key").setAttribute("aria-invalid", "true");
  else $("signin-key").removeAttribute("aria-invalid");
}

function signOut(message = "") {
  session.clear();
  history.replaceState(null, "", location.pathname);
  showSignIn(message);
  $("signin-key").focus();
}

async function signIn(e) {
  e.preventDefault();
  const input = $("signin-key");
  const token = input.value.trim();
  $("signin-error").textContent = "";
  try {
    session.me = await api("/v1/keys/me", { token });
  } catch (err) {
    input.setAttribute("aria-invalid", "true");
    $("signin-error").textContent = `${err.message} (${err.status} ${err.code})`;
    input.focus();
    return;
  }
  input.value = "";
  session.set(token);
  showSignedIn();
  route();
}

async function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut());
  // The skip link's own #main replaced the route in the address: a reload then showed Models
  document.querySelector("a.skip").addEventListener("click", (e) => { e.preventDefault(); $("main").focus(); });
  window.addEventListener("hashchange", () => { if (location.hash.startsWith("#/")) route(); });
  session.onUnauthorized = (err) => signOut(`Signed out: ${err.message} (${err.status} ${err.code})`);
  if (session.key) {
    try {
      session.me = await api("/v1/keys/me");
    } catch (err) {
      // Only the key's own refusal (401: unknown, revoked, expired) signs out; a 429 or a server that does not
      // answer for now keeps it in the tab, to try again on reload
      if (err.status === 401) signOut(`${err.message} (${err.status} ${err.code})`);
      else $("signin-error").textContent = `${err.message} (${err.status} ${err.code}); your key is kept: reload to try again`;
    }
  }
  if (session.me) {
    showSignedIn();
    route();
  } else {
    showSignIn($("signin-error").textContent);
    $("signin-key").focus();
  }
  document.documentElement.dataset.ready = String(Math.round(performance.now()));
}

start();
