// LVPNet Archive dashboard: fetches /admin/api/*, draws SVG bar charts, refreshes every 10 s.
// No framework, no CDN: the archive may run where there is no internet.
"use strict";

const REFRESH_MS = 10000;
const SVG = "http://www.w3.org/2000/svg";

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(2)) + " " + units[i];
}

function text(id, value) { document.getElementById(id).textContent = value; }

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (response.status === 401 || response.status === 403) { window.location = "/admin/login"; throw new Error("signed out"); }
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function el(tag, attrs, content) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (content !== undefined) node.textContent = content;
  return node;
}

function svg(tag, attrs, content) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (content !== undefined) node.textContent = content;
  return node;
}

// Horizontal grouped bars: original / stored (/ classical) bytes per row
function barChart(containerId, rows, withClassical) {
  const container = document.getElementById(containerId);
  container.replaceChildren();
  if (!rows.length) { container.appendChild(el("p", { class: "muted" }, "Nothing archived yet.")); return; }
  const width = 560, labelWidth = 130, rowHeight = withClassical ? 34 : 26;
  const max = Math.max(...rows.map(r => Math.max(r.original_bytes, r.classical_bytes || 0)), 1);
  const scale = (width - labelWidth - 110) / max;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${rows.length * rowHeight + 24}`, role: "img" });
  rows.forEach((r, i) => {
    const y = i * rowHeight + 4;
    chart.appendChild(svg("text", { x: 0, y: y + 12 }, r.name.length > 18 ? r.name.slice(0, 17) + "…" : r.name));
    const bars = [["bar-original", r.original_bytes], ["bar-stored", r.stored_bytes]];
    if (withClassical) bars.push(["bar-classical", r.classical_bytes || 0]);
    bars.forEach(([cls, value], j) => {
      const rect = svg("rect", { class: cls, x: labelWidth, y: y + j * 9, width: Math.max(1, value * scale), height: 8 });
      rect.appendChild(svg("title", {}, `${r.name}: ${bytes(value)}`));
      chart.appendChild(rect);
    });
    const ratio = r.stored_bytes ? (r.original_bytes / r.stored_bytes).toFixed(2) + "x" : "";
    chart.appendChild(svg("text", { x: labelWidth + r.original_bytes * scale + 6, y: y + 12 }, `${ratio} ${r.instances} inst.`));
  });
  container.appendChild(chart);
  const legend = el("div", { class: "legend" });
  const entries = [["#a8c5e2", "original"], ["#1d6fb8", "stored"]];
  if (withClassical) entries.push(["#f2a541", "classical codecs alone"]);
  for (const [color, label] of entries) {
    const item = el("span");
    const swatch = el("i");
    swatch.style.background = color;
    item.append(swatch, label);
    legend.appendChild(item);
  }
  container.appendChild(legend);
}

// Vertical bars per day: stored bytes, with the original as a lighter bar behind
function dayChart(rows) {
  const container = document.getElementById("chart-day");
  container.replaceChildren();
  if (!rows.length) { container.appendChild(el("p", { class: "muted" }, "Nothing archived in this period.")); return; }
  const width = 560, height = 180, bottom = 30;
  const max = Math.max(...rows.map(r => r.original_bytes), 1);
  const step = (width - 20) / rows.length;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  rows.forEach((r, i) => {
    const x = 10 + i * step;
    const h0 = (height - bottom) * r.original_bytes / max;
    const h1 = (height - bottom) * r.stored_bytes / max;
    const original = svg("rect", { class: "bar-original", x, y: height - bottom - h0, width: Math.max(2, step * 0.8), height: h0 });
    original.appendChild(svg("title", {}, `${r.name}: ${bytes(r.original_bytes)} received, ${bytes(r.stored_bytes)} stored`));
    chart.appendChild(original);
    chart.appendChild(svg("rect", { class: "bar-stored", x, y: height - bottom - h1, width: Math.max(2, step * 0.8), height: h1 }));
    if (i === 0 || i === rows.length - 1 || rows.length < 8) {
      chart.appendChild(svg("text", { x, y: height - 10 }, r.name.slice(5)));
    }
  });
  container.appendChild(chart);
}

async function refreshFigures() {
  const [savings, health] = await Promise.all([getJSON("/admin/api/savings"), getJSON("/admin/api/health")]);
  text("original-bytes", bytes(savings.original_bytes));
  text("stored-bytes", bytes(savings.stored_bytes));
  text("ratio", savings.ratio ? savings.ratio.toFixed(2) + " : 1" : "-");
  text("classical-bytes", bytes(savings.classical_bytes));
  text("archived-count", savings.instances.toLocaleString("en"));
  text("queue-depth", health.queue_depth);
  text("compressing", health.compressing);
  text("failed", health.failed);
  text("corrupt", health.corrupt);
  text("busy-workers", health.busy_workers);
  text("last-hour", `${health.archived_last_hour} (${bytes(health.archived_bytes_last_hour)})`);
  const scrub = health.last_scrub;
  text("last-scrub", scrub ? `${scrub.finished_at || scrub.started_at} - ${scrub.checked} checked, ${scrub.corrupt} corrupt` : "never");
  dayChart(savings.by_day);
  barChart("chart-modality", savings.by_modality, false);
  barChart("chart-codec", savings.by_codec, true);
  barChart("chart-ae", savings.by_calling_ae, false);
  const age = Math.max(savings.age_seconds || 0, health.age_seconds || 0);
  text("updated", "updated " + new Date().toLocaleTimeString() + (age >= 1 ? ` (catalog figures ${Math.round(age)} s old)` : ""));
}

async function searchStudies(event) {
  if (event) event.preventDefault();
  const q = document.getElementById("study-query").value.trim();
  const rows = await getJSON("/admin/api/studies?q=" + encodeURIComponent(q));
  const body = document.querySelector("#studies tbody");
  body.replaceChildren();
  for (const s of rows) {
    const tr = el("tr", { class: "clickable", "data-study": s.study_instance_uid });
    for (const v of [s.study_instance_uid, s.accession_number || "", s.patient_id || "", s.study_date || "", s.modalities || ""]) tr.appendChild(el("td", {}, v));
    for (const v of [s.instances, bytes(s.original_bytes), bytes(s.stored_bytes)]) tr.appendChild(el("td", { class: "num" }, String(v)));
    tr.addEventListener("click", () => openStudy(s.study_instance_uid));
    body.appendChild(tr);
  }
}

async function openStudy(uid) {
  const study = await getJSON("/admin/api/studies/" + encodeURIComponent(uid));
  const container = document.getElementById("study-detail");
  container.replaceChildren(el("h2", {}, "Study " + study.study_instance_uid));
  const remove = el("button", { id: "delete-study", class: "danger" }, "Delete study");
  remove.addEventListener("click", () => deleteStudy(study.study_instance_uid));
  container.appendChild(remove);
  for (const series of study.series) {
    container.appendChild(el("h3", {}, `Series ${series.series_number ?? ""} ${series.modality || ""} ${series.description || ""} - ${series.series_instance_uid}`));
    const table = el("table", { class: "instances" });
    const head = el("tr");
    for (const h of ["SOP Instance UID", "No.", "State", "Codec", "Original", "Stored", "Classical alone", "Size"]) head.appendChild(el("th", {}, h));
    table.appendChild(head);
    for (const i of series.instances) {
      const tr = el("tr");
      for (const v of [i.sop_instance_uid, i.instance_number ?? "", i.state, i.codec || "", bytes(i.original_bytes), bytes(i.stored_bytes), bytes(i.classical_bytes), `${i.columns}x${i.rows}${i.frames > 1 ? "x" + i.frames : ""}`]) tr.appendChild(el("td", {}, String(v)));
      table.appendChild(tr);
    }
    container.appendChild(table);
  }
}

async function deleteStudy(uid) {
  const reason = window.prompt("Delete this study and its stored objects? Reason (recorded in the audit trail):");
  if (reason === null) return;
  const response = await fetch("/admin/api/studies/" + encodeURIComponent(uid) + "?reason=" + encodeURIComponent(reason), {
    method: "DELETE", credentials: "same-origin", headers: { "X-Requested-With": "lvpnet-archive" },
  });
  if (!response.ok) { window.alert("Deletion failed: " + response.status); return; }
  document.getElementById("study-detail").replaceChildren(el("p", { id: "deleted-note" }, "Study " + uid + " deleted."));
  await Promise.all([searchStudies(), refreshTombstones(), refreshAudit()]);
}

async function refreshTombstones() {
  const rows = await getJSON("/admin/api/tombstones");
  const body = document.querySelector("#tombstones tbody");
  body.replaceChildren();
  for (const t of rows) {
    const tr = el("tr");
    for (const v of [t.deleted_at.replace("T", " ").slice(0, 19), t.level, t.uid, String(t.instances), t.actor, t.reason || ""]) tr.appendChild(el("td", {}, v));
    body.appendChild(tr);
  }
}

async function refreshAudit(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams({ limit: "100" });
  const actor = document.getElementById("audit-actor").value.trim();
  const action = document.getElementById("audit-action").value;
  if (actor) params.set("actor", actor);
  if (action) params.set("action", action);
  document.getElementById("audit-csv").href = "/admin/api/audit.csv?limit=100000&" + params.toString().replace("limit=100&", "");
  const rows = await getJSON("/admin/api/audit?" + params.toString());
  const body = document.querySelector("#audit tbody");
  body.replaceChildren();
  for (const a of rows) {
    const tr = el("tr");
    for (const v of [a.at.replace("T", " ").slice(0, 19), `${a.actor} (${a.actor_kind})`, a.action, a.interface, a.remote || "", a.study_instance_uid || "", a.sop_instance_uid || "", a.outcome]) tr.appendChild(el("td", {}, v));
    body.appendChild(tr);
  }
}

document.getElementById("study-search").addEventListener("submit", searchStudies);
document.getElementById("audit-filter").addEventListener("submit", refreshAudit);
refreshFigures();
searchStudies();
refreshTombstones();
refreshAudit();
setInterval(() => { refreshFigures().catch(console.error); }, REFRESH_MS);
