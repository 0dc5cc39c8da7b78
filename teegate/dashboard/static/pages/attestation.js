// Attestation: for each confidential model, whether the gate serves it and why (not), what
// was verified (TDX quote, TCB, measurements, signing key; GPU evidence is recorded but not
// verified), when, until when, and a SHA-256 of each piece of evidence as received.
import { api } from "../api.js";
import { ago, badge, h, pageHead, table, when } from "../ui.js";

const POLL_MS = 15000;
const CHECK_NAMES = {
  quote: "TDX quote signature", collateral: "Intel collateral", tcb: "TCB status",
  report_data: "Report data binds key + nonce", nonce: "Nonce", signing_address: "Signing key",
  measurements: "Measurements allow-list", mrtd: "MRTD", rtmrs: "RTMRs", event_log: "Event log replay",
  compose_hash: "App (compose) hash", root: "Root CA",
};

export async function render(root) {
  let timer = null;
  async function load() {
    const d = await api("/attestation/details");
    const served = d.data.filter((m) => m.served).length;
    root.replaceChildren(
      pageHead("Attestation",
        `Mode ${d.mode}: ${served} of ${d.data.length} confidential model(s) served. ` +
        `Catalog fetched ${ago(d.catalog_fetched_at)}. A model is served only while its verdict holds.`),
      d.data.length ? d.data.map(modelPanel) : h("p", { class: "panel empty" }, "No confidential model in the catalog."),
      d.not_confidential.length ? h("section", { class: "panel" },
        h("h2", {}, "Always refused: not confidential"),
        h("p", { class: "muted" }, "Listed by the upstream without a TEE flag; requests for them get 400 model_not_confidential."),
        h("p", { class: "mono" }, d.not_confidential.join(", "))) : null,
    );
  }
  await load();
  timer = setInterval(() => load().catch(() => {}), POLL_MS);
  return { stop() { clearInterval(timer); } };
}

function modelPanel(m) {
  const v = m.verdict;
  const state = m.served ? badge("served · verified", "ok") : badge("refused", "bad");
  const facts = [];
  const fact = (k, val) => { if (val !== null && val !== undefined && val !== "") facts.push(h("dt", {}, k), h("dd", {}, val)); };
  if (v) {
    fact("Verdict", v.ok ? badge("passed", "ok") : h("span", {}, badge("failed", "bad"), " ", v.reason));
    fact("TEE", v.tee_type);
    fact("TCB status", v.tcb_status ? h("span", {},
      badge(v.tcb_status, v.tcb_status === "UpToDate" ? "ok" : "warn"),
      v.advisory_ids?.length ? ` advisories: ${v.advisory_ids.join(", ")}` : "") : null);
    fact("Root CA", v.root === "test" ? badge("test root (not Intel)", "warn") : v.root);
    fact("Quote SHA-256", h("code", {}, v.quote_sha256 || "—"));
    fact("Signing key", h("code", {}, v.signing_address || "—"));
    fact("GPU", badge("evidence recorded, not verified", "plain"));
    fact("Last verified", `${when(v.verified_at)} (${ago(v.verified_at)})`);
    fact("Valid until", `${when(v.expires_at)} (${ago(v.expires_at)}): re-attested before then`);
    fact("Evidence format", m.evidence_kind);
    if (m.instances?.length) fact("Instances", `${m.instances.filter((i) => i.usable).length} usable of ${m.instances.length}`);
    fact("End-to-end encrypted", m.e2ee ? "yes" : null);
  }
  const measurements = v ? [
    ["MRTD", v.mrtd], ...(v.rtmrs || []).map((r, i) => [`RTMR${i}`, r]),
    ["MR_CONFIG_ID", v.mr_config_id], ["Compose hash", v.compose_hash], ["Report data", v.report_data],
  ].filter(([, val]) => val) : [];
  const checks = v ? Object.entries(v.checks || {}) : [];
  return h("section", { class: "panel model", dataset: { model: m.model } },
    h("div", { class: "model-head" }, h("h2", { class: "mono" }, m.model), state),
    m.refusal ? h("p", { class: "reason" }, `Why refused: ${m.refusal}`) : null,
    !v ? h("p", { class: "muted" }, "No verdict yet: the first attestation is in progress.") : h("div", { class: "grid2" },
      h("div", {},
        h("h3", {}, "What was verified"), h("dl", { class: "facts" }, facts),
        checks.length ? h("div", {}, h("h3", {}, "Checks"), h("div", { class: "checks" },
          checks.map(([name, passed]) => badge(`${passed ? "✓" : "✗"} ${CHECK_NAMES[name] || name}`, passed ? "ok" : "bad")))) : null,
        v.skipped?.length ? h("p", { class: "muted" }, `Not checked: ${v.skipped.join("; ")}`) : null),
      h("div", {},
        h("h3", {}, "Measurements"),
        table([{ label: "Register" }, { label: "Value" }],
          measurements.map(([k, val]) => [k, h("code", {}, val)]), "None reported."),
        h("h3", {}, "Evidence (SHA-256 of each field as received)"),
        table([{ label: "Field" }, { label: "SHA-256" }],
          Object.entries(m.evidence_sha256).map(([k, val]) => [k, h("code", {}, val)]), "No evidence."))),
  );
}
