// Small DOM and formatting helpers. Every text goes in through textContent (never innerHTML),
// so nothing the server or a client chose (labels, model ids, names) can become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function usd(micro) {
  const v = Number(micro || 0) / 1e6;
  if (v !== 0 && Math.abs(v) < 0.01) return "$" + v.toFixed(6).replace(/0+$/, "");
  return "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

export const num = (n) => Number(n || 0).toLocaleString("en-US");

export function when(unixSeconds) {
  if (!unixSeconds) return "—";
  return new Date(unixSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "";
  const s = Math.round(Date.now() / 1000 - unixSeconds);
  const abs = Math.abs(s);
  const text = abs < 90 ? `${abs} s` : abs < 5400 ? `${Math.round(abs / 60)} min` : `${Math.round(abs / 3600)} h`;
  return s >= 0 ? `${text} ago` : `in ${text}`;
}

export const badge = (text, kind = "plain") => h("span", { class: `badge ${kind}` }, text);

export function table(columns, rows, empty = "Nothing yet.") {
  // columns: [{label, num?}], rows: arrays of cells (Node or text), or {cells, attrs}
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.label)));
  const body = rows.length
    ? rows.map((r) => {
        const cells = Array.isArray(r) ? r : r.cells;
        return h("tr", Array.isArray(r) ? {} : r.attrs,
          cells.map((cell, i) => h("td", { class: columns[i]?.num ? "num" : null }, cell)));
      })
    : [h("tr", {}, h("td", { class: "empty", colspan: columns.length }, empty))];
  return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
}

export function card(label, value, sub) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label),
    h("div", { class: "value" }, value), sub ? h("div", { class: "sub" }, sub) : null);
}

export function pageHead(title, subtitle, ...tools) {
  return h("div", { class: "page-head" },
    h("div", {}, h("h1", {}, title), subtitle ? h("p", { class: "muted" }, subtitle) : null),
    h("div", { class: "toolbar" }, tools));
}

// A modal dialog: the form's fields, and a confirm button that performs the action.
// Resolves to the fields' values when confirmed, or null when cancelled.
export function dialog({ title, body = [], fields = [], confirm = "Confirm", danger = false,
                         cancel = "Cancel", onInput = null }) {
  const dlg = document.getElementById("dialog");
  return new Promise((resolve) => {
    const inputs = {};
    const confirmBtn = h("button", { type: "submit", class: danger ? "danger solid" : "primary",
      value: "ok", id: "dialog-confirm" }, confirm);
    const form = h("form", { method: "dialog" },
      h("h2", {}, title),
      body,
      fields.map((f) => {
        const input = h("input", { name: f.name, type: f.type || "text", placeholder: f.placeholder,
          required: f.required, pattern: f.pattern, value: f.value, autocomplete: "off",
          inputmode: f.inputmode, id: `field-${f.name}` });
        inputs[f.name] = input;
        return h("label", {}, f.label, input);
      }),
      h("div", { class: "buttons" },
        cancel ? h("button", { type: "button", id: "dialog-cancel",
          onclick: () => dlg.close("cancel") }, cancel) : null,
        confirmBtn));
    if (onInput) form.addEventListener("input", () => onInput(inputs, confirmBtn));
    dlg.replaceChildren(form);
    dlg.onclose = () => {
      const values = Object.fromEntries(Object.entries(inputs).map(([k, i]) => [k, i.value.trim()]));
      dlg.replaceChildren(); // nothing typed (or shown) stays in the page
      resolve(dlg.returnValue === "ok" ? values : null);
    };
    dlg.returnValue = "";
    dlg.showModal();
    if (onInput) onInput(inputs, confirmBtn);
  });
}

export function toast(text) {
  const t = h("div", { class: "toast", role: "status" }, text);
  document.body.append(t);
  setTimeout(() => t.remove(), 4000);
}

export function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err?.message || String(err));
}

// A random idempotency key (crypto.getRandomValues works outside secure contexts too).
export function randomId() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// Replace an element's children: arrays flattened, null/false dropped (replaceChildren would
// turn them into text).
export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}
