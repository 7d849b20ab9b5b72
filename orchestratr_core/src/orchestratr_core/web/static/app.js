// OrchestratR dashboard: vanilla JS, no build step, no third-party code.
// Polls the JSON API every second; the token lives in sessionStorage only.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "orchestratr.token";
const COLORS = ["#4f46e5", "#059669", "#dc2626", "#d97706", "#0891b2", "#7c3aed", "#db2777", "#65a30d", "#475569", "#ea580c"];

const state = {
  cursors: [null],      // cursor of each page visited; the last is the current page
  nextCursor: null,
  servers: [],
  serverNames: {},
  detailId: null,
  detailSeen: [],       // what the page saw of the open job, oldest first
  colors: {},
  busy: false,
};

const $ = (id) => document.getElementById(id);
// Ids are time-ordered UUIDs: their head is a timestamp, their tail tells them apart.
const shortId = (id) => (id ? id.slice(-8) : "");

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- API ---------------------------------------------------------------------

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    const error = new Error(detail);
    error.status = response.status;
    error.title = data && data.title ? data.title : "Error";
    throw error;
  }
  return data;
}

// -- helpers -------------------------------------------------------------------

function ago(iso) {
  if (!iso) return "—";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return seconds.toFixed(1) + " s ago";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
  return Math.floor(seconds / 86400) + " d ago";
}

function fenceText(fence) {
  // generation << 32 | delivery count
  const generation = Math.floor(fence / 4294967296);
  const delivery = fence % 4294967296;
  return { short: generation + "·" + delivery, title: "fencing token " + fence + " (generation " + generation + ", delivery " + delivery + ")" };
}

function badge(status) { return el("span", { class: "badge " + status, dataset: { status } }, status); }

function colorOf(serverId) {
  if (!state.colors[serverId]) {
    state.colors[serverId] = COLORS[Object.keys(state.colors).length % COLORS.length];
  }
  return state.colors[serverId];
}

function serverLabel(serverId) {
  if (!serverId) return "—";
  return state.serverNames[serverId] || shortId(serverId);
}

function banner(message, kind) {
  const node = $("banner");
  if (!message) { node.classList.add("hidden"); node.textContent = ""; return; }
  node.textContent = message;
  node.className = "banner" + (kind === "info" ? " info" : "");
}

function setLive(ok, text) {
  const pill = $("live");
  pill.textContent = text;
  pill.className = "pill " + (ok ? "ok" : "bad");
}

// -- servers ---------------------------------------------------------------------

function renderServers(servers) {
  const body = $("servers").querySelector("tbody");
  const rows = servers.map((s) => {
    const bar = el("span", { class: "bar" }, el("span"));
    bar.firstChild.style.width = Math.min(100, Math.round(s.load * 100)) + "%";
    const drain = el("button", {
      type: "button", class: "danger", dataset: { testid: "drain" },
      onclick: (event) => { event.stopPropagation(); drainServer(s); },
    }, "Drain");
    drain.disabled = s.status !== "alive";
    return el("tr", { dataset: { serverId: s.id, serverName: s.name, status: s.status } },
      el("td", {}, s.name),
      el("td", {}, badge(s.status)),
      el("td", {}, bar, s.running + " / " + s.max_workers),
      el("td", { title: s.last_seen }, ago(s.last_seen)),
      el("td", {}, s.host ? s.host + (s.pid ? ":" + s.pid : "") : "—"),
      el("td", { class: "id", title: s.id }, shortId(s.id)),
      el("td", {}, drain),
      el("td", { class: "muted", dataset: { field: "placement" } },
        (s.kinds || ["default"]).join(", ") +
        Object.entries(s.labels || {}).map(([k, v]) => " · " + k + "=" + v).join("")));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "8", class: "muted" }, "no servers")));
  body.replaceChildren(...rows);
  const live = servers.filter((s) => s.status === "alive" || s.status === "draining");
  const running = live.reduce((n, s) => n + s.running, 0);
  const capacity = live.reduce((n, s) => n + s.max_workers, 0);
  $("server-summary").textContent = live.length + " live · " + running + " / " + capacity + " slots busy";

  const select = $("server-filter");
  const chosen = select.value;
  const options = [el("option", { value: "" }, "any server")];
  for (const s of servers) options.push(el("option", { value: s.id }, s.name + " (" + shortId(s.id) + ")"));
  if (chosen && !servers.some((s) => s.id === chosen)) options.push(el("option", { value: chosen }, serverLabel(chosen)));
  select.replaceChildren(...options);
  select.value = chosen;
}

async function drainServer(server) {
  if (!confirm("Drain " + server.name + "? Its " + server.running + " job(s) move to the other servers and it exits.")) return;
  try {
    await api("POST", "/api/servers/" + encodeURIComponent(server.id) + "/drain");
    banner("Server " + server.name + " is draining.", "info");
    await refresh();
  } catch (error) { banner(error.title + ": " + error.message); }
}

// -- chart -------------------------------------------------------------------------

function renderChart(history) {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 900;
  const height = canvas.clientHeight || 220;
  if (canvas.width !== Math.round(width * ratio)) { canvas.width = Math.round(width * ratio); canvas.height = Math.round(height * ratio); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const now = Date.now() / 1000;
  const chosen = $("chart-window").value;
  const oldest = history.samples.length ? history.samples[0].t : now;
  // "auto" spans the samples there are (at least 30 s, at most the app's window)
  const windowSeconds = chosen === "auto"
    ? Math.min(history.window, Math.max(30, Math.ceil((now - oldest) / 30) * 30))
    : Number(chosen);
  const samples = history.samples.filter((s) => s.t >= now - windowSeconds);
  const ids = new Set();
  for (const s of samples) for (const id of Object.keys(s.running)) ids.add(id);
  let peak = 1;
  for (const s of samples) for (const n of Object.values(s.running)) peak = Math.max(peak, n);
  const step = Math.max(1, Math.ceil(peak / 4));
  const max = step * Math.max(1, Math.ceil((peak + 0.5) / step));

  const left = 34, right = 10, top = 10, bottom = 22;
  const plotW = width - left - right, plotH = height - top - bottom;
  const x = (t) => left + plotW * (1 - (now - t) / windowSeconds);
  const y = (n) => top + plotH * (1 - n / max);

  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#e5e7eb";
  ctx.lineWidth = 1;
  for (let value = 0; value <= max; value += step) {
    ctx.beginPath(); ctx.moveTo(left, y(value)); ctx.lineTo(width - right, y(value)); ctx.stroke();
    ctx.fillText(String(value), 4, y(value) + 4);
  }
  for (let m = 0; m <= windowSeconds + 0.001; m += windowSeconds / 5) {
    const label = m === 0 ? "now" : "-" + (m >= 60 ? (m / 60).toFixed(m % 60 ? 1 : 0) + " min" : Math.round(m) + " s");
    ctx.fillText(label, x(now - m) - (m === 0 ? 20 : 14), height - 6);
  }

  const legend = [];
  for (const id of ids) {
    ctx.strokeStyle = colorOf(id);
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    for (const s of samples) {
      if (!(id in s.running)) { drawing = false; continue; }
      const px = x(s.t), py = y(s.running[id]);
      if (drawing) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      drawing = true;
    }
    ctx.stroke();
    const name = history.names[id] || state.serverNames[id] || shortId(id);
    const swatch = el("i");
    swatch.style.background = colorOf(id);
    legend.push(el("span", {}, swatch, name + " (" + shortId(id) + ")"));
  }
  if (!samples.length) {
    ctx.fillStyle = "#6b7280";
    ctx.fillText("no samples yet", left + 8, top + 16);
  }
  $("legend").replaceChildren(...legend);
}

// -- jobs ----------------------------------------------------------------------------

function jobQuery() {
  const params = new URLSearchParams();
  const checked = [...document.querySelectorAll("#status-filter input:checked")].map((i) => i.value);
  const all = document.querySelectorAll("#status-filter input").length;
  if (checked.length && checked.length < all) for (const s of checked) params.append("status", s);
  else if (checked.length === all) params.set("include_deleted", "true");
  const prefix = $("name-prefix").value.trim();
  if (prefix) params.set("name_prefix", prefix);
  const server = $("server-filter").value;
  if (server) params.set("server_id", server);
  const kind = $("kind-filter").value.trim();
  if (kind) params.set("kind", kind);
  params.set("limit", $("page-size").value);
  const cursor = state.cursors[state.cursors.length - 1];
  if (cursor) params.set("cursor", cursor);
  // Counting costs more than a page: only now and then.
  state.polls = (state.polls || 0) + 1;
  if (state.total === undefined || state.polls % 5 === 0) params.set("total", "true");
  return params;
}

function renderJobs(page) {
  const body = $("jobs").querySelector("tbody");
  const rows = page.items.map((job) => {
    const fence = fenceText(job.fence);
    const cancel = el("button", {
      type: "button", class: "danger", dataset: { testid: "cancel" },
      onclick: (event) => { event.stopPropagation(); cancelJob(job.id, job.name); },
    }, "Cancel");
    cancel.disabled = !(job.status === "pending" || job.status === "processing");
    return el("tr", {
      class: "clickable",
      dataset: { jobId: job.id, jobName: job.name, status: job.status, serverId: job.server_id || "" },
      onclick: () => openDetail(job.id),
    },
      el("td", {}, job.name),
      el("td", {}, badge(job.status)),
      el("td", { title: job.server_id || "" }, serverLabel(job.server_id)),
      el("td", { class: "mono", title: fence.title }, fence.short),
      el("td", {}, job.restarts),
      el("td", { title: job.liveness || job.last_heartbeat || "" }, ago(job.liveness || job.last_heartbeat)),
      el("td", { class: "error", title: job.last_error || "" }, job.last_error || ""),
      el("td", {}, cancel),
      el("td", { title: job.pending_reason || (job.constraints || []).join(", "), dataset: { field: "placement" } },
        (job.kind || "default") + ((job.constraints || []).length ? " [" + job.constraints.join(", ") + "]" : ""),
        ...(job.status === "pending" && job.pending_reason
          ? [el("div", { class: "muted", dataset: { field: "pending-reason" } }, job.pending_reason)] : [])));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "9", class: "muted" }, "no jobs match")));
  body.replaceChildren(...rows);
  state.nextCursor = page.next_cursor;
  if (page.total !== null && page.total !== undefined) state.total = page.total;
  else if (state.total !== undefined && state.cursors.length === 1 && page.items.length > state.total) state.total = undefined;
  const pageNo = state.cursors.length;
  $("page-label").textContent = "page " + pageNo + (state.total !== undefined ? " · " + state.total + " matching" : "");
  $("page-label").dataset.total = state.total === undefined ? "" : String(state.total);
  $("job-summary").textContent = page.items.length + " shown";
  $("next-page").disabled = !page.next_cursor;
  $("prev-page").disabled = pageNo <= 1;
  $("first-page").disabled = pageNo <= 1;
}

async function cancelJob(id, name) { await jobAction(id, name, "cancel"); }

async function jobAction(id, name, action) {
  try {
    const job = await api("POST", "/api/jobs/" + encodeURIComponent(id) + "/" + action);
    banner("Job " + name + " is " + job.status + ".", "info");
    state.total = undefined;
    await refresh();
  } catch (error) { banner(error.title + ": " + error.message); }
}

async function updateJob(event) {
  event.preventDefault();
  const id = state.detailId;
  if (!id) return;
  const argument = $("update-arg").value;
  try {
    const job = await api("POST", "/api/jobs/" + encodeURIComponent(id) + "/update", { argument });
    banner("Updated the argument of job " + job.name + " (update " + job.argument_version + "); it is " + job.status + ".", "info");
    $("update-arg").value = "";
    await refresh();
  } catch (error) { banner(error.title + ": " + error.message); }
}

async function createJob(event) {
  event.preventDefault();
  const name = $("create-name").value;
  const argument = $("create-arg").value;
  try {
    const job = await api("POST", "/api/jobs", { name, argument });
    banner("Created job " + job.name + ".", "info");
    state.total = undefined;
    $("create-name").value = "";
    $("create-arg").value = "";
    await refresh();
  } catch (error) { banner(error.title + ": " + error.message); }
}

// -- detail -------------------------------------------------------------------------

function openDetail(id) {
  if (state.detailId !== id) state.detailSeen = [];
  state.detailId = id;
  $("detail").classList.remove("hidden");
  refreshDetail();
}

function closeDetail() {
  state.detailId = null;
  $("detail").classList.add("hidden");
}

async function refreshDetail() {
  const id = state.detailId;
  if (!id) return;
  let job;
  try { job = await api("GET", "/api/jobs/" + encodeURIComponent(id)); } catch (error) {
    $("detail-title").textContent = error.message;
    return;
  }
  if (state.detailId !== id) return;
  const seen = state.detailSeen;
  const last = seen[seen.length - 1];
  const key = job.status + "|" + job.server_id + "|" + job.fence + "|" + job.restarts;
  if (!last || last.key !== key) {
    seen.push({ key, at: new Date(), text: job.status + (job.server_id ? " on " + serverLabel(job.server_id) : "") + " · fence " + fenceText(job.fence).short + " · restarts " + job.restarts + (job.reason ? " · " + job.reason : "") });
  }
  $("detail-title").textContent = job.name;
  const fields = [
    ["id", job.id], ["status", badge(job.status)], ["server", job.server_id ? serverLabel(job.server_id) + " (" + job.server_id + ")" : "—"],
    ["fencing token", job.fence + " (" + fenceText(job.fence).short + ")"], ["generation", job.generation],
    ["restarts", job.restarts], ["created", job.created_at], ["started", job.started_at || "—"],
    ["last heartbeat", (job.liveness || job.last_heartbeat) ? ago(job.liveness || job.last_heartbeat) + " (" + (job.liveness || job.last_heartbeat) + ")" : "—"],
    ["updated", job.updated_at], ["reason", job.reason || "—"],
    ["checkpoint", job.checkpoint_size === null ? "—" : job.checkpoint_size + " bytes, " + ago(job.checkpoint_at)],
    ["failures", job.failures + (job.max_restarts !== null ? " (budget " + job.max_restarts + " in " + (job.restart_window ?? "default") + " s)" : "")],
    ["quarantine reason", job.quarantine_reason || "—"],
    ["kind", job.kind || "default"], ["constraints", (job.constraints || []).join(", ") || "—"],
    ["spread", job.spread || "—"], ["pending reason", job.pending_reason || "—"],
    ["argument updates", job.argument_version ? job.argument_version + ", " + ago(job.argument_updated_at) + (job.update_pending ? " (restart with it pending)" : "") + (job.update_mode === "in_place" ? (job.argument_applied_version >= job.argument_version ? " (taken in place)" : " (in place, not yet acknowledged)") : "") : "—"],
  ];
  $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { dataset: { field: k } }, v)]));
  $("detail-argument").textContent = job.argument || "(empty)";
  $("detail-error").textContent = job.last_error || "(none)";
  $("detail-history").replaceChildren(...seen.map((s) => el("li", {}, s.at.toLocaleTimeString() + " — " + s.text)));
  $("detail-errors").replaceChildren(...(job.last_errors.length ? job.last_errors : [{ at: "", error: "(none)" }])
    .map((e) => el("li", {}, (e.at ? e.at + " — " : "") + e.error)));
  const live = job.status === "pending" || job.status === "processing";
  const cancel = $("detail-cancel");
  cancel.disabled = !(live || job.status === "pausing" || job.status === "paused" || job.status === "quarantined");
  cancel.onclick = () => cancelJob(job.id, job.name);
  const pause = $("detail-pause");
  pause.disabled = !live;
  pause.onclick = () => jobAction(job.id, job.name, "pause");
  const resume = $("detail-resume");
  resume.disabled = !(job.status === "paused" || job.status === "quarantined");
  resume.onclick = () => jobAction(job.id, job.name, "resume");
  $("detail-update").disabled = job.status === "deleting" || job.status === "deleted" || job.status === "completed";
}

// -- polling ---------------------------------------------------------------------------

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    const all = $("servers-all").checked ? "?all=true" : "";
    const [servers, page, history] = await Promise.all([
      api("GET", "/api/servers" + all),
      api("GET", "/api/jobs?" + jobQuery().toString()),
      api("GET", "/api/history"),
    ]);
    state.servers = servers;
    for (const s of servers) state.serverNames[s.id] = s.name;
    Object.assign(state.serverNames, history.names);
    renderServers(servers);
    renderJobs(page);
    renderChart(history);
    await refreshDetail();
    setLive(true, "live");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if ($("banner").dataset.auth) { banner(""); delete $("banner").dataset.auth; }
  } catch (error) {
    setLive(false, error.status === 401 || error.status === 403 ? "token needed" : "offline");
    if (error.status === 401 || error.status === 403) {
      banner(error.title + ": " + error.message + " — enter the API token above.");
      $("banner").dataset.auth = "1";
    } else if (!error.status) {
      banner("Cannot reach the API: " + error.message);
      $("banner").dataset.auth = "1";
    } else {
      banner(error.title + ": " + error.message);
    }
  } finally {
    state.busy = false;
  }
}

function resetPaging() { state.cursors = [null]; state.total = undefined; refresh(); }

function init() {
  $("token").value = token() ? "••••••••" : "";
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value && value !== "••••••••") sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = token() ? "••••••••" : "";
    refresh();
  });
  $("forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); $("token").value = ""; refresh(); });
  $("create-form").addEventListener("submit", createJob);
  $("update-form").addEventListener("submit", updateJob);
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("filters").addEventListener("change", resetPaging);
  let typing = null;
  $("name-prefix").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(resetPaging, 250); });
  $("kind-filter").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(resetPaging, 250); });
  $("servers-all").addEventListener("change", refresh);
  $("chart-window").addEventListener("change", refresh);
  $("next-page").addEventListener("click", () => { if (state.nextCursor) { state.cursors.push(state.nextCursor); refresh(); } });
  $("prev-page").addEventListener("click", () => { if (state.cursors.length > 1) { state.cursors.pop(); refresh(); } });
  $("first-page").addEventListener("click", () => { state.cursors = [null]; refresh(); });
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeDetail(); });
  refresh();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
