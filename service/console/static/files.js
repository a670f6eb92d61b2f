// Files: upload (checked by the server before it is kept), list, delete.
import { formErrors, labelled } from "./forms.js";
import { PAGE, announce, api, bytes, enc, errorBox, grants, h, olderButton, put, table, url, when } from "./lib.js";

const PURPOSES = ["weights", "dataset", "image", "bundle"];
export async function view(el) {
  el.append(h("h1", { tabindex: -1 }, "Files"));
  const listSec = h("section", { class: "panel", "aria-labelledby": "files-h" }, h("h2", { id: "files-h" }, "Your files"));
  let files = [];
  const show = () => put(listSec, listSec.firstChild, files.length ? fileTable(files, refresh) : h("p", { id: "no-files" }, "No files yet."), older.el);
  const older = olderButton("/v1/files", "files", (more) => { files = files.concat(more); show(); });
  const refresh = async () => {
    try {
      const r = await api(`/v1/files?limit=${PAGE}`);
      files = r.files;
      older.set(r.next);
      show();
      return true;
    } catch (e) { put(listSec, listSec.firstChild, errorBox(e)); return false; }
  };
  if (!(await refresh())) { el.append(listSec); return; }
  el.append(h("section", { class: "panel", "aria-labelledby": "up-h" }, h("h2", { id: "up-h" }, "Upload"), uploadForm(refresh),
    grants("deploy") ? h("p", { class: "hint", id: "deploy-how" }, deployHowTo(true)) : null), listSec);
}

// How a deploy key serves a bundle: the console has no deploy form, the CLI and the API do (POST /v1/models).
export function deployHowTo(onFilesPage = false) {
  return h("span", {}, "To serve a bundle (.sdb): ", h("code", {}, "sdb models deploy PATH"), " from your machine, or upload it ",
    onFilesPage ? "here" : ["on the ", h("a", { href: "#/files" }, "Files"), " page"], " with the purpose bundle and deploy its id: ",
    h("code", {}, "sdb models deploy file-…"), " or ", h("code", {}, 'POST /v1/models {"file": "file-…"}'), " (",
    h("a", { href: url("/docs#/models/deploy_v1_models_post") }, "API docs"), ").");
}

function uploadForm(refresh) {
  const file = h("input", { type: "file" });
  const purpose = h("select", {}, h("option", { value: "" }, "Choose…"), PURPOSES.map((p) => h("option", { value: p }, p)));
  const shared = h("input", { type: "checkbox" });
  const fields = [
    labelled("file", "File", file, { required: true, hint: "weights: safetensors or a torch state dict; dataset: an ImageFolder zip or an .npz; image: PNG or JPEG; bundle: a .sdb" }),
    labelled("purpose", "Purpose", purpose, { required: true }),
  ];
  if (grants("admin")) fields.push(labelled("shared", "Shared with every key", shared, { check: true }));
  const submit = h("button", { type: "submit" }, "Upload");
  const form = h("form", { method: "post", novalidate: true, "aria-label": "Upload a file" }, fields.map((f) => f.el), h("div", { class: "row" }, submit));
  const errs = formErrors(form, fields, "file").mount();
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errs.clear();
    const body = new FormData();
    if (file.files[0]) body.append("file", file.files[0], file.files[0].name);
    body.append("purpose", purpose.value);
    if (shared.checked) body.append("shared", "true");
    submit.disabled = true;
    try {
      const f = await api("/v1/files", { method: "POST", body });
      form.reset();
      announce(`uploaded ${f.filename} as ${f.id}`);
      await refresh();
    } catch (err) { errs.show(err); } finally { submit.disabled = false; }
  });
  return form;
}

function fileTable(files, refresh) {
  return table(["File", "Id", "Purpose", "Size", "Format", "Created", ""], files.map((f) => {
    const act = h("span");
    const del = () => h("button", { type: "button", class: "secondary", "aria-label": `Delete ${f.filename}`, onclick: () => {
      put(act, `Delete ${f.filename}? `, h("button", { type: "button", class: "danger", "data-confirm": f.id, onclick: async () => {
        try { await api(`/v1/files/${enc(f.id)}`, { method: "DELETE" }); announce(`deleted ${f.filename}`); refresh(); } catch (e) { act.append(errorBox(e)); }
      } }, "Delete file"), " ", h("button", { type: "button", class: "secondary", onclick: () => { put(act, del()); act.firstChild.focus(); } }, "Keep"));
      act.querySelector("button").focus();
    } }, "Delete");
    act.append(del());
    return [f.filename, h("code", {}, f.id), f.purpose + (f.shared ? " (shared)" : ""), bytes(f.bytes), f.format, when(f.created_at), act];
  }), { numeric: [3], caption: "Files" });
}
