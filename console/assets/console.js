// decree console: each page reads the console's JSON endpoints (the same
// client APIs the CLI uses) every two seconds while it is shown.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const ms = (v) => (v >= 10000 ? (v / 1000).toFixed(0) + " s" : v >= 1000 ? (v / 1000).toFixed(1) + " s" : v + " ms");

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function status(text, bad) {
  const el = $("#status");
  el.textContent = text;
  el.className = "status" + (bad ? " bad" : "");
}

function rows(table, items, render) {
  $(table + " tbody").innerHTML = items.length ? items.map(render).join("") : `<tr class="empty"><td colspan="9">none</td></tr>`;
}

// -- pages ------------------------------------------------------------------

const pages = {
  async cluster() {
    const c = await api("/api/cluster");
    let coordinator = `<p>single coordinator at <code>${esc(c.coordinator)}</code></p>`;
    if (c.group) {
      const g = c.group;
      coordinator = `<p>group: leader ${esc(g.leader_id)} (<code>${esc(g.leader_url)}</code>), term ${esc(g.term)}; this replica ${esc(g.replica_id)} is ${esc(g.role)}</p>
        <table id="replicas"><thead><tr><th>replica</th><th>address</th><th>voter</th><th>log position</th><th>lag</th></tr></thead><tbody>
        ${g.members.map((m) => `<tr data-replica="${esc(m.id)}"><td>${esc(m.id)}${m.id === g.leader_id ? " (leader)" : ""}</td><td><code>${esc(m.address)}</code></td><td>${m.voter ? "yes" : "learner"}</td><td>${esc(m.matched_index ?? "")}</td><td>${esc(m.lag ?? "")}</td></tr>`).join("")}
        </tbody></table>`;
    }
    $("#coordinator").innerHTML = coordinator;
    rows("#participants", c.participants, (p) => `<tr data-name="${esc(p.name)}">
      <td>${esc(p.name)}</td><td>${esc(p.role)}</td><td class="${esc(p.state)}">${esc(p.state)}</td>
      <td>${p.in_ring ? (p.share * 100).toFixed(1) + "%" : "not in ring"}</td>
      <td>${p.heard_ms_ago == null ? "not yet" : ms(p.heard_ms_ago) + " ago"}</td><td><code>${esc(p.address)}</code></td></tr>`);
    const r = c.ring;
    let ring = `<p>epoch ${esc(r.epoch)}: ${r.members.map((m) => `${esc(m.name)} (weight ${esc(m.weight)}, ${(m.share * 100).toFixed(1)}%)`).join(", ") || "no members"}</p>`;
    if (r.migration) ring += `<p class="warn">migrating: ${esc(r.migration.change)}, ${esc(r.migration.moved_keys)} keys moved, about ${esc(r.migration.remaining_keys)} to go ${esc(r.migration.last_error)}</p>`;
    if (r.queued.length) ring += `<p>queued: ${r.queued.map(esc).join(", ")}</p>`;
    $("#ring").innerHTML = ring;
  },

  async activity() {
    const s = await api("/api/stats?seconds=300");
    $("#totals").innerHTML = `<span>committed <b id="total-committed">${s.committed}</b></span><span>aborted <b id="total-aborted">${s.aborted}</b></span><span>unknown <b>${s.unknown}</b></span><span>in flight <b>${s.in_flight}</b></span>`;
    const pts = s.seconds;
    chart("#chart-throughput", pts, [["committed", "#1b7f3b"], ["aborted", "#b3261e"]], "/s");
    const rate = pts.map((p) => ({ t: p.t, rate: p.committed + p.aborted ? (100 * p.aborted) / (p.committed + p.aborted + p.unknown) : 0 }));
    chart("#chart-aborts", rate, [["rate", "#b3261e"]], "%", 100);
    chart("#chart-latency", pts, [["p50_ms", "#2962ff"], ["p99_ms", "#ff6d00"]], " ms");
  },

  async transactions() {
    const txid = $("#search-input").value.trim();
    const t = await api("/api/transactions" + (txid ? "?txid=" + encodeURIComponent(txid) : ""));
    rows("#in-flight", t.in_flight, (x) => `<tr data-txid="${esc(x.txid)}"><td class="mono">${esc(x.txid)}</td><td>${esc(x.state)}</td><td>${x.participants.map(esc).join(", ")}</td><td>${x.waiting.map(esc).join(", ")}</td></tr>`);
    rows("#recent", t.recent, (x) => `<tr data-txid="${esc(x.txid)}"><td class="mono">${esc(x.txid)}</td><td class="${esc(x.state)}">${esc(x.state)}</td>
      <td>${x.participants.map(esc).join(", ")}</td><td>${(x.latency_us / 1000).toFixed(1)} ms</td>
      <td>${new Date(x.decided_unix_ms).toLocaleTimeString()}</td><td>${esc(x.reason)}</td></tr>`);
    $("#search-result").innerHTML = txid
      ? `<p id="search-outcome">coordinator's outcome of <code>${esc(txid)}</code>: <b class="${esc(t.outcome)}">${esc(t.outcome)}</b>${t.recent.length || t.in_flight.length ? "" : " (not among the recent decisions: from its log)"}</p>`
      : "";
  },

  async "in-doubt"() {
    const d = await api("/api/in-doubt");
    rows("#in-doubt", d.branches, (b) => `<tr data-txid="${esc(b.txid)}" data-participant="${esc(b.participant)}">
      <td>${esc(b.participant)}</td><td class="mono">${esc(b.txid)}</td><td>${ms(b.age_ms)}</td><td>${b.locked_keys.map(esc).join(", ")}</td>
      <td><button type="button" class="decide" data-txid="${esc(b.txid)}" data-participant="${esc(b.participant)}">decide by hand…</button></td></tr>`);
    $("#in-doubt-unreachable").textContent = d.unreachable.length ? "not answering: " + d.unreachable.join(", ") : "";
  },

  async locks() {
    const l = await api("/api/locks");
    $("#locks").innerHTML = l.participants.map((p) => `<h2>${esc(p.participant)} <small>waits ${p.waits}, timed out ${p.wait_timeouts}, conflicts ${p.conflicts}</small></h2>
      <table class="locks" data-participant="${esc(p.participant)}"><thead><tr><th>key</th><th>holder</th><th>state</th><th>waiters</th></tr></thead><tbody>
      ${p.locks.length ? p.locks.map((k) => `<tr><td class="mono">${esc(k.key)}</td><td class="mono">${esc(k.holder)}</td><td>${esc(k.state)}</td><td>${k.waiters.map(esc).join(", ")}</td></tr>`).join("") : `<tr class="empty"><td colspan="4">no key locked</td></tr>`}
      </tbody></table>`).join("") + (l.unreachable.length ? `<p class="warn">not answering: ${l.unreachable.map(esc).join(", ")}</p>` : "");
  },

  async stuck() {
    const s = await api("/api/stuck");
    rows("#stuck", s.stuck, (b) => `<tr data-txid="${esc(b.txid)}"><td class="mono">${esc(b.txid)}</td><td>${esc(b.participant)}</td><td>${esc(b.reason)}</td>
      <td><button type="button" class="retry" data-txid="${esc(b.txid)}">retry</button></td></tr>`);
    rows("#heuristics", s.heuristics, (h) => `<tr data-txid="${esc(h.txid)}"><td>${esc(h.participant)}</td><td class="mono">${esc(h.txid)}</td>
      <td>${h.commit ? "commit" : "abort"}</td><td>${esc(h.operator)}</td><td>${esc(h.reason)}</td><td>${esc(h.coordinator_outcome ?? "not known yet")}</td>
      <td class="${h.contradicted ? "aborted" : ""}">${h.contradicted ? "CONTRADICTED by the coordinator" : ""}</td></tr>`);
  },
};

// A line chart of `series` ([field, colour]) over points {t, ...}, in an SVG of its own.
function chart(sel, points, series, unit, fixedMax) {
  const svg = $(sel);
  const [w, h] = [900, svg.viewBox.baseVal.height];
  const max = fixedMax || Math.max(1, ...points.flatMap((p) => series.map(([f]) => p[f])));
  const x = (i) => (points.length < 2 ? 0 : (i / (points.length - 1)) * w);
  const y = (v) => h - 4 - (v / max) * (h - 20);
  const lines = series.map(([f, colour]) => `<polyline fill="none" stroke="${colour}" stroke-width="1.5" points="${points.map((p, i) => `${x(i).toFixed(1)},${y(p[f]).toFixed(1)}`).join(" ")}"/>`);
  const legend = series.map(([f, colour], i) => `<text x="${8 + i * 110}" y="14" fill="${colour}" font-size="12">${f.replace("_ms", "")}</text>`);
  svg.innerHTML = `<text x="${w - 8}" y="14" text-anchor="end" font-size="11" fill="#667">max ${max.toFixed(max < 10 ? 1 : 0)}${unit}</text>` + lines.join("") + legend.join("");
}

// -- navigation and refresh ---------------------------------------------------

let current = "cluster";
let busy = false;

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    await pages[current]();
    status("updated " + new Date().toLocaleTimeString());
  } catch (err) {
    status(String(err.message || err), true);
  } finally {
    busy = false;
  }
}

function show() {
  current = (location.hash || "#cluster").slice(1);
  if (!pages[current]) current = "cluster";
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === "page-" + current));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === current));
  refresh();
}

window.addEventListener("hashchange", show);
setInterval(refresh, 2000);

// -- operator actions ---------------------------------------------------------

$("#search").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
$("#search-clear").addEventListener("click", () => { $("#search-input").value = ""; refresh(); });

document.addEventListener("click", async (e) => {
  const retry = e.target.closest("button.retry");
  if (retry) {
    const out = $("#retry-result");
    try {
      const r = await api("/api/retry", { txid: retry.dataset.txid });
      out.innerHTML = `<p class="ok" id="retried">redelivered ${esc(r.txid)} to ${r.participants.map(esc).join(", ") || "no one (no longer in phase two)"}; outcome ${esc(r.outcome)}</p>`;
    } catch (err) {
      out.innerHTML = `<p class="error">${esc(err.message)}</p>`;
    }
    refresh();
  }
  const decide = e.target.closest("button.decide");
  if (decide) {
    const form = $("#resolve");
    form.hidden = false;
    $("#resolve-txid").textContent = decide.dataset.txid;
    $("#resolve-participant").textContent = decide.dataset.participant;
    $("#resolve-confirm").value = "";
    $("#resolve-result").textContent = "";
    checkConfirm();
  }
});

function checkConfirm() {
  const ok = $("#resolve-confirm").value.trim() === $("#resolve-txid").textContent && $("#resolve-reason").value.trim() !== "";
  $("#resolve-submit").disabled = !ok;
}
$("#resolve-confirm").addEventListener("input", checkConfirm);
$("#resolve-reason").addEventListener("input", checkConfirm);
$("#resolve-cancel").addEventListener("click", () => { $("#resolve").hidden = true; });
$("#resolve").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("#resolve-result");
  try {
    const r = await api("/api/resolve", {
      participant: $("#resolve-participant").textContent,
      txid: $("#resolve-txid").textContent,
      commit: document.querySelector('input[name="decision"]:checked').value === "commit",
      reason: $("#resolve-reason").value,
      confirm: $("#resolve-confirm").value,
      operator: $("#resolve-operator").value,
    });
    out.innerHTML = `<p class="ok">${esc(r.txid)} ${esc(r.decision)} at ${esc(r.participant)} by ${esc(r.operator)} (recorded)</p>`;
  } catch (err) {
    out.innerHTML = `<p class="error" id="resolve-error">${esc(err.message)}</p>`;
  }
  refresh();
});

show();
