// Attestation: for each confidential model, whether the gate serves it and why (not), what
// was verified (TDX quote, TCB, measurements, signing key; GPU evidence is recorded but not
// verified), when, until when, and a SHA-256 of each piece of evidence as received.
import { api } from "../api.js";
import { ago, badge, fill, h, pageHead, table, when } from "../ui.js";

const POLL_MS = 15000;
const CHECK_NAMES = {
  evidence_well_formed: "Evidence well-formed", quote_parses: "Quote parses",
  tee_type_tdx: "TEE is Intel TDX", not_debug: "Not a debug TD", collateral_current: "Collateral current",
  quote_verified: "Quote signature chain", tcb_status_accepted: "TCB status accepted",
  advisories_accepted: "Advisories accepted", report_data_nonce: "Report data carries our nonce",
  request_nonce_matches: "Nonce matches request", report_data_signing_key: "Report data binds signing key",
  signing_key_matches_address: "Signing key matches address", mrtd_allowed: "MRTD allowed",
  event_log_replays: "Event log replays to RTMRs", event_log_runtime_digests: "Runtime digests",
  event_log_compose_hash: "Compose hash in event log", app_compose_matches: "App compose matches",
  compose_hash_allowed: "Compose hash allowed",
};

export async function render(root) {
  let timer = null;
  const openModels = new Set();
  function open(model) {
    openModels.add(model);
    const el = [...root.querySelectorAll("details.model")].find((d) => d.dataset.model === model);
    if (el) { el.open = true; el.scrollIntoView({ block: "start" }); }
  }
  root.addEventListener("toggle", (e) => {
    const d = e.target;
    if (d.matches?.("details.model")) (d.open ? openModels.add(d.dataset.model) : openModels.delete(d.dataset.model));
  }, true);
  async function load() {
    const d = await api("/attestation/details");
    const served = d.data.filter((m) => m.served).length;
    fill(root,
      pageHead("Attestation",
        `Mode ${d.mode}: ${served} of ${d.data.length} confidential model(s) served. ` +
        `Catalog fetched ${ago(d.catalog_fetched_at)}. A model is served only while its verdict holds.`),
      h("section", { class: "panel" }, h("h2", {}, "Confidential models"),
        table([{ label: "Model" }, { label: "Gate" }, { label: "TCB" }, { label: "Last verified" },
               { label: "Valid until" }, { label: "Why refused" }],
          d.data.map((m) => [h("a", { href: `#attestation`, class: "mono", onclick: (e) => { e.preventDefault(); open(m.model); } }, m.model),
            m.served ? badge("served", "ok") : badge("refused", "bad"),
            m.verdict?.tcb_status || "—", m.verdict ? ago(m.verdict.verified_at) : "—",
            m.verdict ? ago(m.verdict.expires_at) : "—", m.refusal || ""]),
          "No confidential model in the catalog.")),
      h("h2", {}, "Details per model"),
      d.data.map((m, i) => modelPanel(m, i === 0 || openModels.has(m.model))),
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

function modelPanel(m, isOpen) {
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
  return h("details", { class: "panel model", dataset: { model: m.model }, open: isOpen },
    h("summary", { class: "model-head" }, h("h2", { class: "mono" }, m.model), state),
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
