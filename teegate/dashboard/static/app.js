// The dashboard's shell: who is signed in, the navigation for that role, and one page at a
// time (pages/*.js), chosen by the URL's #fragment (never anything secret in it).
import { api, setCsrf } from "./api.js";
import { h, errorBox } from "./ui.js";
import * as overview from "./pages/overview.js";
import * as accounts from "./pages/accounts.js";
import * as attestation from "./pages/attestation.js";
import * as refusals from "./pages/refusals.js";
import * as me from "./pages/me.js";

const OPERATOR = [
  ["overview", "Overview", overview],
  ["accounts", "Accounts & keys", accounts],
  ["attestation", "Attestation", attestation],
  ["refusals", "Refusals", refusals],
];
const KEYHOLDER = [["account", "My account", me]];

let current = null; // {stop()} of the page on screen

async function main() {
  const session = await api("/session");
  setCsrf(session.csrf_token);
  const pages = session.role === "admin" ? OPERATOR : KEYHOLDER;
  document.getElementById("who").textContent = session.role === "admin"
    ? `operator${session.label ? " · " + session.label : ""}`
    : `key holder${session.label ? " · " + session.label : ""}`;
  const nav = document.getElementById("nav");
  nav.replaceChildren(...pages.map(([id, title]) =>
    h("a", { href: `#${id}`, id: `nav-${id}` }, title)));
  document.getElementById("signout").addEventListener("click", async () => {
    try { await api("/logout", { method: "POST" }); } finally { window.location.assign("/dashboard/"); }
  });

  async function show() {
    const wanted = window.location.hash.slice(1);
    const entry = pages.find(([id]) => id === wanted) || pages[0];
    for (const a of nav.children) a.classList.toggle("active", a.id === `nav-${entry[0]}`);
    document.title = `${entry[1]} · teegate dashboard`;
    if (current?.stop) current.stop();
    const root = document.getElementById("page");
    root.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      current = await entry[2].render(root, session);
    } catch (err) {
      root.replaceChildren(errorBox(err));
    }
  }
  window.addEventListener("hashchange", show);
  await show();
}

main().catch((err) => document.getElementById("page").replaceChildren(errorBox(err)));
