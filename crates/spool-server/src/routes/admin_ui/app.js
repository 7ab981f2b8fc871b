// Spool's admin UI: plain JavaScript over the HTTP API (docs/http-api.md), no dependencies.
// Everything the server sends is inserted as text (textContent), never as HTML: stream names
// and payloads come from clients.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: null, timers: [], heads: new Map(), tail: null, selected: null };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function enc(stream) {
  return encodeURIComponent(stream);
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + state.token };
  const init = { method, headers };
  if (body !== undefined) {
    init.body = body;
  }
  const r = await fetch(path, init);
  let json = null;
  try {
    json = await r.json();
  } catch (_) {
    json = null;
  }
  if (!r.ok) {
    const msg = json && json.error ? json.error.message : r.status + " " + r.statusText;
    const e = new Error(msg);
    e.status = r.status;
    throw e;
  }
  return json;
}

// --- log in / out ---

async function login(token) {
  state.token = token;
  try {
    await api("GET", "/v1/streams?limit=1");
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem("spool-token");
    $("login-error").textContent = "Not accepted: " + e.message;
    return;
  }
  sessionStorage.setItem("spool-token", token);
  $("login-error").textContent = "";
  $("login-view").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = "logged in";
  refreshStreams();
  refreshMetrics();
  state.timers.push(setInterval(refreshStreams, 1000));
  state.timers.push(setInterval(refreshMetrics, 2000));
  state.timers.push(setInterval(refreshGroups, 2000));
}

function logout() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  stopTail();
  state.token = null;
  sessionStorage.removeItem("spool-token");
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login-view").hidden = false;
  $("who").textContent = "";
}

// --- streams, with rates from the head's movement between polls ---

async function refreshStreams() {
  const prefix = $("prefix").value;
  let answer;
  try {
    answer = await api("GET", "/v1/streams?limit=200&prefix=" + encodeURIComponent(prefix));
  } catch (e) {
    $("streams-error").textContent = e.message;
    if (e.status === 401) logout();
    return;
  }
  $("streams-error").textContent = "";
  const now = performance.now();
  const body = $("streams").tBodies[0];
  const rows = [];
  for (const s of answer.streams) {
    const key = s.stream;
    const before = state.heads.get(key);
    let rate = "–";
    if (before && before.epoch === s.epoch && now > before.at) {
      rate = ((s.head - before.head) / ((now - before.at) / 1000)).toFixed(1);
    }
    state.heads.set(key, { head: s.head, epoch: s.epoch, at: now });
    const tr = document.createElement("tr");
    tr.dataset.stream = key;
    const name = el("td");
    const open = el("a", key);
    open.href = "#";
    open.className = "open";
    open.addEventListener("click", (ev) => {
      ev.preventDefault();
      select(key);
    });
    name.append(open);
    tr.append(name, el("td", s.epoch), el("td", s.head, "num head"),
      el("td", s.retained_messages, "num"), el("td", s.retained_bytes, "num"),
      el("td", rate, "num rate"), el("td", s.subscribers, "num"),
      el("td", s.last_publish_ms ? new Date(s.last_publish_ms).toISOString() : "–"));
    const actions = el("td");
    const del = el("button", "Delete", "danger delete");
    del.type = "button";
    del.addEventListener("click", () => deleteStream(key, del));
    actions.append(del);
    tr.append(actions);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// Two clicks delete: "Delete", then "Confirm delete" within 5 s.
async function deleteStream(stream, button) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Confirm delete";
    setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = "Delete";
    }, 5000);
    return;
  }
  try {
    await api("DELETE", "/v1/streams/" + enc(stream));
    state.heads.delete(stream);
    if (state.selected === stream) {
      stopTail();
      $("detail").hidden = true;
      state.selected = null;
    }
    refreshStreams();
  } catch (e) {
    $("streams-error").textContent = "Cannot delete " + stream + ": " + e.message;
  }
}

// --- connections and sessions, from /metrics ---

async function refreshMetrics() {
  let text;
  try {
    const r = await fetch("/metrics", { headers: { Authorization: "Bearer " + state.token } });
    if (!r.ok) return;
    text = await r.text();
  } catch (_) {
    return;
  }
  const rows = [];
  for (const line of text.split("\n")) {
    let m = line.match(/^spool_connections\{transport="([^"]+)"\} (\d+)/);
    if (m) {
      rows.push(row([m[1], m[2]]));
      continue;
    }
    m = line.match(/^spool_sessions (\d+)/);
    if (m) $("sessions").textContent = m[1];
  }
  $("connections").tBodies[0].replaceChildren(...rows);
}

function row(cells) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => tr.append(el("td", c, i > 0 ? "num" : "")));
  return tr;
}

// --- publish ---

async function publish(ev) {
  ev.preventDefault();
  const stream = $("pub-stream").value.trim();
  const key = $("pub-key").value.trim();
  const headers = { Authorization: "Bearer " + state.token };
  if (key) headers["Spool-Key"] = key;
  try {
    const r = await fetch("/v1/streams/" + enc(stream) + "/messages", {
      method: "POST",
      headers,
      body: $("pub-data").value,
    });
    const json = await r.json();
    if (!r.ok) throw new Error(json.error ? json.error.message : String(r.status));
    $("pub-result").textContent = "stored at " + json.epoch + ":" + json.offset;
    refreshStreams();
  } catch (e) {
    $("pub-result").textContent = "not published: " + e.message;
  }
}

// --- one stream: live tail (SSE) and its consumer groups ---

function stopTail() {
  if (state.tail) {
    state.tail.close();
    state.tail = null;
  }
}

function select(stream) {
  stopTail();
  state.selected = stream;
  $("detail").hidden = false;
  $("detail-name").textContent = stream;
  const log = $("tail-log");
  log.replaceChildren();
  // EventSource cannot send headers: the token goes in the query (docs/http-api.md).
  const url = "/v1/streams/" + enc(stream) + "/events?format=json&after=oldest&token=" +
    encodeURIComponent(state.token);
  const source = new EventSource(url);
  source.onmessage = (ev) => {
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch (_) {
      return;
    }
    const text = typeof m.data === "string" ? m.data : JSON.stringify(m);
    const item = el("li", m.offset + "  " + text);
    item.dataset.offset = m.offset;
    log.append(item);
    while (log.children.length > 200) log.firstChild.remove();
    log.scrollTop = log.scrollHeight;
  };
  source.addEventListener("reset", (ev) => {
    log.append(el("li", "— reset: " + ev.data, "error"));
  });
  state.tail = source;
  refreshGroups();
}

async function refreshGroups() {
  const stream = state.selected;
  if (!stream) return;
  const body = $("groups").tBodies[0];
  let list;
  try {
    list = await api("GET", "/v1/streams/" + enc(stream) + "/groups");
  } catch (e) {
    $("groups-note").textContent = e.status === 501 ? "this engine keeps no consumer groups" : e.message;
    body.replaceChildren();
    return;
  }
  const rows = [];
  for (const g of list.groups) {
    try {
      const d = await api("GET", "/v1/streams/" + enc(stream) + "/groups/" + enc(g.group));
      const s = d.stats || {};
      rows.push(row([g.group, s.pending, s.in_flight, (s.oldest_age_ms || 0) + " ms", s.acked,
        s.dead_lettered, d.dead_letter]));
    } catch (_) {
      // Deleted meanwhile.
    }
  }
  $("groups-note").textContent = rows.length ? "" : "no consumer groups";
  body.replaceChildren(...rows);
}

// --- wiring ---

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    login($("token").value.trim());
  });
  $("logout").addEventListener("click", logout);
  $("publish-form").addEventListener("submit", publish);
  $("filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.heads.clear();
    refreshStreams();
  });
  const saved = sessionStorage.getItem("spool-token");
  if (saved) login(saved);
});
