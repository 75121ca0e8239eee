// The admin page: progress, exclusions and live scores, every call with the admin token
// (kept in the URL fragment, which browsers never send to the server).
"use strict";
const errorBox = document.getElementById("error");
let token = decodeURIComponent(location.hash.slice(1));

async function get(path) {
  const r = await fetch(`/api/admin/${path}`, { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    const e = new Error(data.error || `request failed (${r.status})`); e.status = r.status; throw e;
  }
  return r;
}

function table(rows, columns) {
  const t = document.createElement("table");
  const head = t.insertRow();
  columns.forEach((c) => { const th = document.createElement("th"); th.textContent = c; head.append(th); });
  rows.forEach((row) => { const tr = t.insertRow(); row.forEach((v) => { tr.insertCell().textContent = v; }); });
  return t;
}

const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(3));

async function refresh() {
  const progress = await (await get("progress")).json();
  document.getElementById("login").hidden = true;
  document.getElementById("panel").hidden = false;
  const p = progress.participants;
  document.getElementById("progress").replaceChildren(
    table(Object.entries(p), ["stage", "participants"]),
    table(Object.entries(progress.answers), ["trial kind", "answers"]),
    table([[progress.units, progress.answers_per_unit.min, progress.answers_per_unit.max]],
      ["main trials (feature x protocol)", "fewest answers", "most answers"]));
  const scores = await (await get("scores")).json();
  const ex = scores.exclusions;
  document.getElementById("exclusions").textContent =
    `${ex.participants.length} participants excluded (failed attention checks)` +
    `${ex.participants.length ? ": " + ex.participants.join(", ") : ""}; ` +
    `${ex.fast_trials} main trials faster than the spec's minimum.`;
  const rows = (scores.scores || []).map((s) => [s.sae, s.protocol, fmt(s.mean),
    `[${fmt(s.lo)}, ${fmt(s.hi)}]`, s.n_participants, s.n_features,
    s.lo > 0 ? "above chance" : "cannot be told from chance"]);
  document.getElementById("scores").replaceChildren(scores.note
    ? document.createTextNode(scores.note)
    : table(rows, ["SAE", "protocol", "S", "95% interval", "participants", "features", "verdict"]));
  if (rows.length) {
    const blob = await (await get("scores.png")).blob();
    document.getElementById("plot").src = URL.createObjectURL(blob);
  }
}

async function download(path, name) {
  const blob = await (await get(path)).blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name; a.click();
}

async function start() {
  errorBox.textContent = "";
  try { await refresh(); } catch (e) {
    if (e.status === 401) { document.getElementById("login").hidden = false; document.getElementById("panel").hidden = true; }
    errorBox.textContent = e.message;
  }
}

document.getElementById("admin-login").addEventListener("click", () => {
  token = document.getElementById("admin-token").value; location.hash = token; start();
});
document.getElementById("export-csv").addEventListener("click", () => download("export.csv", "responses.csv"));
document.getElementById("export-json").addEventListener("click", () => download("export.json", "study.json"));
if (token) start(); else document.getElementById("login").hidden = false;
setInterval(() => { if (token && !document.getElementById("panel").hidden) start(); }, 10000);
