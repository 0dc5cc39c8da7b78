// Recent refusals: metadata only (time, status, code, route, model if listed), newest first.
import { api } from "../api.js";
import { badge, h, pageHead, table } from "../ui.js";

const POLL_MS = 5000;
const MEANING = {
  invalid_api_key: "no or unknown API key", model_not_confidential: "model has no TEE",
  model_not_found: "unknown model", insufficient_balance: "account balance too low",
  rate_limit_exceeded: "key's rate limit", attestation_failed: "model failed attestation",
  attestation_pending: "model not attested yet", request_too_large: "body over the limit",
};

export async function render(root) {
  const summary = h("div", { class: "checks", id: "refusal-codes" });
  const body = h("section", { class: "panel" });
  root.replaceChildren(
    pageHead("Recent refusals",
      "Requests the gateway refused, newest first (kept in memory; no key, account or client text). Updates every 5 s."),
    h("section", { class: "panel" }, h("h2", {}, "By code"), summary),
    body,
  );
  async function load() {
    const items = (await api("/refusals?limit=500")).data;
    const counts = {};
    for (const r of items) counts[r.code] = (counts[r.code] || 0) + 1;
    summary.replaceChildren(...(Object.keys(counts).length
      ? Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([c, n]) => badge(`${c} × ${n}`, "bad"))
      : [h("span", { class: "muted" }, "No refusals since the gateway started.")]));
    body.replaceChildren(table(
      [{ label: "Time (UTC)" }, { label: "Status", num: true }, { label: "Code" }, { label: "Route" }, { label: "Model" }],
      items.map((r) => [r.time.replace("T", " ").replace("Z", ""), r.status ?? "—",
        h("span", {}, h("code", {}, r.code), MEANING[r.code] ? h("span", { class: "muted" }, ` · ${MEANING[r.code]}`) : null),
        h("code", {}, r.route), h("code", {}, r.model)]),
      "No refusals since the gateway started."));
  }
  await load();
  const timer = setInterval(() => load().catch(() => {}), POLL_MS);
  return { stop() { clearInterval(timer); } };
}
