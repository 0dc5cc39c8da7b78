// The key holder's own account, read-only: what GET /v1/account answers for their key.
import { api } from "../api.js";
import { card, h, num, pageHead, table, usd } from "../ui.js";

const POLL_MS = 10000;

export async function render(root) {
  async function load() {
    const a = await api("/me");
    const requests = a.usage.reduce((s, u) => s + u.requests, 0);
    const spent = a.usage.reduce((s, u) => s + u.charge_micro, 0);
    root.replaceChildren(
      pageHead(`Account ${a.account.name}`,
        `Signed in with key #${a.key.id}${a.key.label ? ` (${a.key.label})` : ""}. Read-only: ask your operator to add credit.`),
      h("div", { class: "cards" },
        card("Balance", usd(a.balance_micro), "spendable now"),
        card("Held", usd(a.open_holds.held_micro), `${a.open_holds.count} request(s) in flight`),
        card("Requests", num(requests), `last ${a.usage_days} days`),
        card("Spent", usd(spent), `last ${a.usage_days} days`),
        card("Rate limit", a.key.rate_limit ? `${a.key.rate_limit}/min` : "default", "this key")),
      h("section", { class: "panel" }, h("h2", {}, "Usage by day and model (UTC)"),
        table([{ label: "Day" }, { label: "Model" }, { label: "Requests", num: true },
               { label: "Tokens in", num: true }, { label: "Tokens out", num: true }, { label: "Charged", num: true }],
          a.usage.slice().reverse().map((u) => [u.day, h("code", {}, u.model), num(u.requests),
            num(u.prompt_tokens), num(u.completion_tokens), usd(u.charge_micro)]),
          "No usage in this period.")),
    );
  }
  await load();
  const timer = setInterval(() => load().catch(() => {}), POLL_MS);
  return { stop() { clearInterval(timer); } };
}
