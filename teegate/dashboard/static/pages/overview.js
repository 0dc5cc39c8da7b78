// Overview: requests, spend and tokens over time by model (live: polled every few seconds
// from the ledger's usage timeline), with the headline numbers above the charts.
import { api } from "../api.js";
import { h, card, num, pageHead, usd } from "../ui.js";

const WINDOWS = {
  "15": { minutes: 15, bucket_s: 15, label: "last 15 minutes, per 15 s" },
  "60": { minutes: 60, bucket_s: 60, label: "last hour, per minute" },
  "1440": { minutes: 1440, bucket_s: 900, label: "last 24 hours, per 15 minutes" },
};
const POLL_MS = 5000;
const COLORS = ["#3056d3", "#e07b39", "#1d8a4e", "#a43fc4", "#c0392b", "#0f8b8d", "#7a6c00", "#6b7480"];

export async function render(root) {
  let win = WINDOWS["15"];
  const select = h("select", { id: "window", "aria-label": "Time window" },
    Object.entries(WINDOWS).map(([k, w]) => h("option", { value: k }, w.label)));
  const status = h("span", { class: "muted", id: "updated" }, "");
  const cards = h("div", { class: "cards" });
  const charts = {
    requests: chartPanel("Requests", "billed requests, by model"),
    spend: chartPanel("Spend", "USD charged, by model", (v) => usd(Math.round(v * 1e6))),
    tokens: chartPanel("Tokens", "in + out, by model"),
  };
  root.replaceChildren(
    pageHead("Overview", "Traffic through the gateway, from the ledger. Updates every 5 s.",
      status, select),
    cards,
    h("div", { class: "charts" }, Object.values(charts).map((c) => c.panel)),
  );

  let timer = null;
  let stopped = false;
  async function refresh() {
    try {
      const [timeline, verdicts, refusals, accounts] = await Promise.all([
        api(`/usage/timeline?minutes=${win.minutes}&bucket_s=${win.bucket_s}`),
        api("/attestation"),
        api("/refusals?limit=10000"),
        api("/accounts"),
      ]);
      if (stopped) return;
      draw(timeline, verdicts, refusals, accounts);
      status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      status.textContent = `update failed: ${err.message}`;
    }
  }

  function draw(timeline, verdicts, refusals, accounts) {
    const bucketMs = timeline.bucket_s * 1000;
    const end = Math.floor(timeline.now_ms / bucketMs) * bucketMs;
    const start = end - (win.minutes * 60000) + bucketMs;
    const slots = [];
    for (let t = start; t <= end; t += bucketMs) slots.push(t);
    const index = new Map(slots.map((t, i) => [t, i]));
    const models = [...new Set(timeline.data.map((b) => b.model))].sort();
    const series = { requests: {}, spend: {}, tokens: {} };
    for (const m of models) for (const k of Object.keys(series)) series[k][m] = slots.map(() => 0);
    const totals = { requests: 0, spend: 0, prompt: 0, completion: 0 };
    for (const b of timeline.data) {
      const i = index.get(b.start_ms);
      totals.requests += b.requests; totals.spend += b.charge_micro;
      totals.prompt += b.prompt_tokens; totals.completion += b.completion_tokens;
      if (i === undefined) continue;
      series.requests[b.model][i] += b.requests;
      series.spend[b.model][i] += b.charge_micro / 1e6;
      series.tokens[b.model][i] += b.prompt_tokens + b.completion_tokens;
    }
    const labels = slots.map((t) => new Date(t).toLocaleTimeString("en-GB", {
      hour: "2-digit", minute: "2-digit", second: win.bucket_s < 60 ? "2-digit" : undefined, hour12: false }));
    for (const [k, c] of Object.entries(charts)) c.update(labels, models, series[k]);

    const since = Date.now() / 1000 - win.minutes * 60;
    const refused = refusals.data.filter((r) => r.at >= since).length;
    const served = verdicts.data.filter((v) => v.served).length;
    const balance = accounts.data.reduce((s, a) => s + a.balance_micro, 0);
    cards.replaceChildren(
      card("Requests", num(totals.requests), "billed, in this window"),
      card("Spend", usd(totals.spend), "charged, in this window"),
      card("Tokens", num(totals.prompt + totals.completion),
        `${num(totals.prompt)} in · ${num(totals.completion)} out`),
      card("Refusals", num(refused), "in this window (see Refusals)"),
      card("Models served", `${served} / ${verdicts.data.length}`,
        `attestation mode: ${verdicts.mode}`),
      card("Balances", usd(balance), `${accounts.data.length} account(s)`),
    );
  }

  select.addEventListener("change", () => { win = WINDOWS[select.value]; refresh(); });
  await refresh();
  timer = setInterval(refresh, POLL_MS);
  return { stop() { stopped = true; clearInterval(timer); Object.values(charts).forEach((c) => c.destroy()); } };
}

function chartPanel(title, subtitle, tick = (v) => num(v)) {
  const canvas = h("canvas", { "aria-label": `${title} chart`, role: "img" });
  const panel = h("section", { class: "panel", id: `chart-${title.toLowerCase()}` },
    h("h2", {}, title, " ", h("span", { class: "muted" }, `· ${subtitle}`)),
    h("div", { class: "chart-box" }, canvas));
  let chart = null;
  return {
    panel,
    update(labels, models, data) {
      const datasets = models.map((m, i) => ({
        label: m, data: data[m], backgroundColor: COLORS[i % COLORS.length],
        borderColor: COLORS[i % COLORS.length], borderWidth: 0, stack: "s",
      }));
      if (!window.Chart) return;
      if (!chart) {
        chart = new window.Chart(canvas, {
          type: "bar",
          data: { labels, datasets },
          options: {
            animation: false, maintainAspectRatio: false, responsive: true,
            plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
            scales: { x: { stacked: true, ticks: { maxTicksLimit: 6, maxRotation: 0 }, grid: { display: false } },
                      y: { stacked: true, beginAtZero: true,
                           ticks: { maxTicksLimit: 5, precision: title === "Spend" ? undefined : 0, callback: tick } } },
          },
        });
      } else {
        chart.data.labels = labels;
        chart.data.datasets = datasets;
        chart.update("none");
      }
    },
    destroy() { chart?.destroy(); },
  };
}
