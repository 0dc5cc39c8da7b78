// Accounts and keys: balances, top-ups, new accounts, new keys and revocations, each through
// a confirmation dialog. A new key is shown once, in its own dialog, and then forgotten.
import { api } from "../api.js";
import { badge, dialog, errorBox, h, num, pageHead, randomId, table, toast, usd } from "../ui.js";

const USD_PATTERN = "\\d{1,9}(\\.\\d{1,6})?";

export async function render(root) {
  let selected = null; // account id shown on the right
  const list = h("section", { class: "panel", id: "accounts" });
  const detail = h("section", { class: "panel", id: "account-detail" });
  const newAccount = h("button", { class: "primary", id: "new-account", onclick: createAccount },
    "New account");
  root.replaceChildren(
    pageHead("Accounts & keys",
      "Prepaid balances and the API keys that spend them. Click an account to see its keys.",
      newAccount),
    h("div", { class: "grid2" }, list, detail),
  );

  async function load() {
    const accounts = (await api("/accounts")).data;
    if (selected === null && accounts.length) selected = accounts[0].id;
    list.replaceChildren(
      h("h2", {}, "Accounts"),
      table(
        [{ label: "Account" }, { label: "Balance", num: true }, { label: "Active keys", num: true },
         { label: "" }],
        accounts.map((a) => ({
          attrs: { class: `clickable${a.id === selected ? " selected" : ""}`,
                   dataset: { account: a.name }, onclick: () => { selected = a.id; load(); } },
          cells: [
            h("div", {}, h("b", {}, a.name), h("div", { class: "muted" }, `#${a.id} · since ${a.created.slice(0, 10)}`)),
            usd(a.balance_micro), num(a.active_keys),
            h("div", { class: "actions" }, h("button", {
              class: "topup", onclick: (e) => { e.stopPropagation(); topup(a); } }, "Top up")),
          ],
        })),
        "No accounts yet: create one with “New account”.",
      ),
    );
    await showDetail();
  }

  async function showDetail() {
    if (selected === null) {
      detail.replaceChildren(h("p", { class: "empty" }, "Select an account."));
      return;
    }
    const a = await api(`/accounts/${selected}`);
    detail.replaceChildren(
      h("div", { class: "model-head" }, h("h2", {}, a.name),
        h("div", { class: "toolbar" },
          h("button", { onclick: () => topup(a) }, "Top up"),
          h("button", { class: "primary", id: "new-key", onclick: () => createKey(a) }, "New key"))),
      h("dl", { class: "facts" },
        h("dt", {}, "Balance"), h("dd", { id: "balance" }, `${usd(a.balance_micro)} spendable`),
        h("dt", {}, "Held now"), h("dd", {}, `${usd(a.held_micro)} in ${a.open_reservations} open request(s)`),
        h("dt", {}, "Charged so far"), h("dd", {}, `${usd(a.charged_micro)} over ${num(a.requests)} request(s)`)),
      h("h3", {}, "API keys"),
      table(
        [{ label: "Key" }, { label: "Created" }, { label: "Rate limit", num: true }, { label: "Status" },
         { label: "" }],
        a.keys.map((k) => ({
          attrs: { dataset: { key: String(k.key_id) } },
          cells: [
            h("div", {}, `#${k.key_id}`, k.label ? h("span", { class: "muted" }, ` · ${k.label}`) : null),
            k.created.slice(0, 16), k.rate_limit ? `${k.rate_limit}/min` : "default",
            k.revoked ? badge("revoked", "bad") : badge("active", "ok"),
            h("div", { class: "actions" }, k.revoked ? null : h("button", {
              class: "danger revoke", onclick: () => revoke(k) }, "Revoke")),
          ],
        })),
        "No keys yet: “New key” makes one.",
      ),
    );
  }

  async function topup(a) {
    const idempotency = randomId(); // one per dialog: a retried submit never credits twice
    const values = await dialog({
      title: `Top up ${a.name}`,
      body: h("p", { class: "muted" }, `Current balance ${usd(a.balance_micro)}. The credit is spendable at once.`),
      fields: [
        { name: "amount", label: "Amount (USD)", placeholder: "25.00", required: true,
          pattern: USD_PATTERN, inputmode: "decimal" },
        { name: "note", label: "Note (optional, e.g. invoice number)" },
      ],
      confirm: "Add credit",
      onInput: (inputs, btn) => {
        const ok = new RegExp(`^${USD_PATTERN}$`).test(inputs.amount.value.trim());
        btn.textContent = ok ? `Add $${inputs.amount.value.trim()} to ${a.name}` : "Add credit";
      },
    });
    if (!values) return;
    await act(async () => {
      const body = { amount_usd: values.amount };
      if (values.note) body.note = values.note;
      const r = await api(`/accounts/${a.id}/topups`, {
        method: "POST", body, headers: { "idempotency-key": idempotency } });
      toast(`Added ${usd(r.amount_micro)} to ${a.name}: balance ${usd(r.balance_micro)}`);
    });
  }

  async function createAccount() {
    const values = await dialog({
      title: "New account",
      fields: [
        { name: "name", label: "Name", required: true, placeholder: "acme" },
        { name: "topup", label: "Initial credit in USD (optional)", pattern: USD_PATTERN,
          placeholder: "0.00", inputmode: "decimal" },
      ],
      confirm: "Create account",
    });
    if (!values) return;
    await act(async () => {
      const body = { name: values.name };
      if (values.topup) body.topup_usd = values.topup;
      const a = await api("/accounts", { method: "POST", body });
      selected = a.id;
      toast(`Created account ${a.name}`);
    });
  }

  async function createKey(a) {
    const values = await dialog({
      title: `New API key for ${a.name}`,
      body: h("p", { class: "muted" }, "The key is shown once, right after it is made; only its hash is stored."),
      fields: [
        { name: "label", label: "Label (optional, e.g. the app using it)" },
        { name: "rate", label: "Rate limit, requests per minute (optional)", pattern: "\\d{1,7}",
          inputmode: "numeric" },
      ],
      confirm: "Create key",
    });
    if (!values) return;
    await act(async () => {
      const body = {};
      if (values.label) body.label = values.label;
      if (values.rate) body.rate_limit = Number(values.rate);
      const k = await api(`/accounts/${a.id}/keys`, { method: "POST", body });
      await dialog({
        title: `Key #${k.key_id} created`,
        body: [
          h("p", {}, "Copy it now: it will not be shown again, here or anywhere."),
          h("div", { class: "secret", id: "new-key-secret" }, k.api_key),
        ],
        confirm: "I have stored it", cancel: null,
      });
    });
  }

  async function revoke(k) {
    const values = await dialog({
      title: `Revoke key #${k.key_id}?`,
      body: h("p", {}, `Every request with key #${k.key_id}${k.label ? ` (${k.label})` : ""} of `,
        h("b", {}, k.account_name), " is refused from now on. This cannot be undone."),
      confirm: "Revoke key", danger: true,
    });
    if (!values) return;
    await act(async () => {
      await api(`/keys/${k.key_id}/revoke`, { method: "POST" });
      toast(`Key #${k.key_id} revoked`);
    });
  }

  async function act(fn) {
    try {
      await fn();
    } catch (err) {
      detail.prepend(errorBox(err));
      return;
    }
    await load();
  }

  await load();
  return { stop() {} };
}
