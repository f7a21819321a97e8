// sdb admin console: a client of the public admin API (/auth/token, /admin/*), nothing else.
// The access token lives in this closure only (no cookie, no storage). Text reaches the page through
// textContent and DOM properties, never parsed as HTML, so user-controlled strings (user, key and model names)
// are always shown as text.
"use strict";

(() => {
  const PAGE = 50;
  const state = { token: null, expiresAt: 0, timer: null, view: "users", users: new Map(), auditOffset: 0, charts: [] };

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node[k] = v;
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function fmtTime(iso) {
    if (!iso) return "";
    return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, "");
  }
  const fmtNum = (n) => (n === null || n === undefined ? "" : Number(n).toLocaleString("en-US"));

  function setStatus(message, ok) {
    const s = $("status");
    s.textContent = message || "";
    s.className = ok ? "ok" : "";
    s.hidden = !message;
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function detailText(body, status) {
    const d = body && body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    if (d && typeof d === "object" && d.message) return d.message;
    return `the service answered ${status}`;
  }

  async function api(method, path, body, raw) {
    if (!state.token) throw new ApiError(401, "not signed in");
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let r;
    try {
      r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store", credentials: "omit" });
    } catch (e) {
      throw new ApiError(0, "cannot reach the service");
    }
    if (r.status === 401) {
      signOut("Your session has expired or was revoked: sign in again.");
      throw new ApiError(401, "signed out");
    }
    if (!r.ok) {
      let parsed = null;
      try { parsed = await r.json(); } catch (e) { /* not JSON */ }
      throw new ApiError(r.status, detailText(parsed, r.status));
    }
    return raw ? r : r.json();
  }

  // ------------------------------------------------------------------------------------------ sign-in

  async function signIn(event) {
    event.preventDefault();
    const input = $("signin-key");
    const key = input.value.trim();
    input.value = "";  // the API key itself is never kept
    const error = $("signin-error");
    error.hidden = true;
    let r;
    try {
      r = await fetch("auth/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ grant_type: "client_credentials", client_secret: key }),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      return showSignInError("Cannot reach the service. Check the address and try again.");
    }
    if (r.status === 401) return showSignInError("That API key was not accepted: it is unknown, revoked or expired, or its user is disabled.");
    if (!r.ok) {
      let parsed = null;
      try { parsed = await r.json(); } catch (e) { /* not JSON */ }
      return showSignInError(`Sign-in failed: ${detailText(parsed, r.status)}.`);
    }
    const tok = await r.json();
    state.token = tok.access_token;
    state.expiresAt = Date.now() + tok.expires_in * 1000;
    try {
      await api("GET", "admin/users?limit=1");
    } catch (e) {
      state.token = null;
      if (e.status === 403) return showSignInError("That API key is valid but is not an administrator's: the console needs an admin key.");
      return showSignInError(`Sign-in failed: ${e.message}.`);
    }
    clearTimeout(state.timer);
    state.timer = setTimeout(() => signOut("Your session expired: sign in again."), Math.max(0, tok.expires_in * 1000 - 5000));
    $("session-expiry").textContent = `session until ${new Date(state.expiresAt).toISOString().slice(11, 19)} UTC`;
    $("nav").hidden = false;
    $("session").hidden = false;
    setStatus("");
    show(state.view);
  }

  function showSignInError(message) {
    const error = $("signin-error");
    error.textContent = message;
    error.hidden = false;
  }

  function signOut(message) {
    state.token = null;
    state.users = new Map();
    state.auditOffset = 0;
    clearTimeout(state.timer);
    $("nav").hidden = true;
    $("session").hidden = true;
    clearSecret();
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-signin";
    for (const t of document.querySelectorAll("tbody")) t.replaceChildren();
    $("trace-summary").textContent = "";
    for (const c of state.charts) c.destroy();
    state.charts = [];
    setStatus(message || "");
    $("signin-key").focus();
  }

  // ------------------------------------------------------------------------------------------ views

  const loaders = { users: loadUsers, keys: loadKeys, usage: loadUsage, audits: loadAudits, extraction: loadExtraction, models: loadModels, trace: loadTrace };

  async function show(view) {
    state.view = view;
    setStatus("");
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${view}`;
    for (const b of document.querySelectorAll("nav button")) {
      if (b.dataset.view === view) b.setAttribute("aria-current", "page");
      else b.removeAttribute("aria-current");
    }
    await run(loaders[view]);
  }

  async function run(fn) {
    try {
      await fn();
    } catch (e) {
      if (e.status !== 401) setStatus(`Error: ${e.message}`);
    }
  }

  async function fetchUsers() {
    const page = await api("GET", "admin/users?limit=1000");
    state.users = new Map(page.items.map((u) => [u.id, u]));
    return page.items;
  }

  const userLabel = (id) => {
    const u = state.users.get(id);
    return u ? `${u.name} (#${id})` : id === null || id === undefined ? "" : `#${id}`;
  };

  // ------------------------------------------------------------------------------------------ users

  async function loadUsers() {
    const users = await fetchUsers();
    $("users-table").tBodies[0].replaceChildren(
      ...users.map((u) =>
        el("tr", { dataset: { user: u.name } },
          el("td", { class: "num" }, u.id),
          el("td", { class: "name" }, u.name),
          el("td", {}, u.role),
          el("td", {}, u.disabled ? el("span", { class: "badge bad" }, "disabled") : el("span", { class: "badge good" }, "active")),
          el("td", {}, fmtTime(u.created_at)),
          el("td", {},
            el("button", { type: "button", onclick: () => run(() => setDisabled(u, !u.disabled)) }, u.disabled ? "Enable" : "Disable"),
            " ",
            el("button", { type: "button", onclick: () => { $("keys-filter").value = String(u.id); show("keys"); } }, "Keys")))));
  }

  async function setDisabled(user, disabled) {
    if (disabled && !(await confirmDialog(`Disable user ${user.name}? Every token of their API keys stops working at once; Enable undoes it.`, "Disable"))) return;
    await api("POST", disabled ? `admin/users/${user.id}/disable` : `admin/users/${user.id}/enable`);
    setStatus(`User ${user.name} ${disabled ? "disabled" : "enabled"}.`, true);
    await loadUsers();
  }

  // The API's own rule for user names (service/schemas.py NAME_RE), said in words rather than as a pattern.
  const USER_NAME = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$/;

  async function createUser(event) {
    event.preventDefault();
    await run(async () => {
      const name = $("user-name").value.trim();
      if (!USER_NAME.test(name)) throw new ApiError(422, "A user name is 1 to 100 letters, digits or . _ @ - (no spaces), starting with a letter or digit.");
      const u = await api("POST", "admin/users", { name, role: $("user-role").value });
      $("user-name").value = "";
      setStatus(`User ${u.name} created.`, true);
      await loadUsers();
    });
  }

  // ------------------------------------------------------------------------------------------ keys

  function fillUserSelects(users) {
    const keep = $("keys-filter").value;
    // No user is preselected: a key issued with the form's defaults must not be an admin credential.
    $("key-user").replaceChildren(el("option", { value: "" }, "choose a user"), ...users.filter((u) => !u.disabled).map((u) => el("option", { value: String(u.id) }, `${u.name} (#${u.id}${u.role === "admin" ? ", admin" : ""})`)));
    $("keys-filter").replaceChildren(el("option", { value: "" }, "all users"), ...users.map((u) => el("option", { value: String(u.id) }, `${u.name} (#${u.id})`)));
    $("keys-filter").value = keep;
    if (keep) $("key-user").value = keep;
  }

  function keyStatus(k) {
    if (k.revoked_at) return el("span", { class: "badge bad" }, "revoked");
    if (k.expires_at && Date.parse(k.expires_at) <= Date.now()) return el("span", { class: "badge bad" }, "expired");
    return el("span", { class: "badge good" }, "active");
  }

  function quotaMeter(k) {
    if (k.sample_quota === null) return el("span", {}, `${fmtNum(k.samples_used)} (no quota)`);
    return el("span", {}, el("meter", { min: 0, max: Math.max(1, k.sample_quota), value: k.samples_used, high: 0.9 * k.sample_quota }), ` ${fmtNum(k.samples_used)} / ${fmtNum(k.sample_quota)}`);
  }

  async function fillScopes() {
    if ($("key-scopes").options.length) return;
    const models = (await api("GET", "admin/models")).filter((m) => m.loaded).map((m) => m.name);
    $("key-scopes").replaceChildren(el("option", { value: "*" }, "* (every model)"), ...models.map((n) => el("option", { value: n }, n)));
  }

  async function loadKeys() {
    fillUserSelects(await fetchUsers());
    await fillScopes();
    const filter = $("keys-filter").value;
    const page = await api("GET", filter ? `admin/users/${filter}/keys?limit=1000` : "admin/keys?limit=1000");
    $("keys-table").tBodies[0].replaceChildren(
      ...page.items.map((k) =>
        el("tr", { dataset: { key: String(k.id) } },
          el("td", { class: "num" }, k.id),
          el("td", {}, userLabel(k.user_id)),
          el("td", {}, k.name || ""),
          el("td", {}, el("code", {}, k.prefix)),
          el("td", {}, k.scopes.join(" ")),
          el("td", {}, quotaMeter(k)),
          el("td", {}, fmtTime(k.expires_at) || "never"),
          el("td", {}, fmtTime(k.created_at)),
          el("td", {}, fmtTime(k.last_used_at) || "never"),
          el("td", {}, keyStatus(k)),
          el("td", {}, k.watermark_id ? el("code", {}, k.watermark_id) : "", k.watermark_id && !k.watermarked ? " (off)" : k.watermark_id ? "" : "none"),
          el("td", {},
            k.revoked_at ? "" : el("button", { type: "button", onclick: () => run(() => setWatermark(k, !k.watermarked)) }, k.watermarked ? "Mark off" : "Mark on"),
            " ",
            k.revoked_at ? "" : el("button", { type: "button", class: "danger", onclick: () => run(() => revokeKey(k)) }, "Revoke")))));
  }

  async function setWatermark(k, enabled) {
    const out = await api("POST", `admin/keys/${k.id}/watermark`, { enabled });
    setStatus(`Key ${k.prefix}…: watermark ${enabled ? "on" : "off"} (${out.watermark_id || "none"}).`, true);
    await loadKeys();
  }

  function confirmDialog(text, okLabel = "Revoke") {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "cancel";
      dialog.showModal();
    });
  }

  async function revokeKey(k) {
    const ok = await confirmDialog(`Revoke key ${k.prefix}… of ${userLabel(k.user_id)}? Every token issued for it stops working at once. This cannot be undone.`);
    if (!ok) return;
    await api("POST", `admin/keys/${k.id}/revoke`);
    setStatus(`Key ${k.prefix}… revoked.`, true);
    await loadKeys();
  }

  async function issueKey(event) {
    event.preventDefault();
    await run(async () => {
      const body = { scopes: Array.from($("key-scopes").selectedOptions, (o) => o.value) };
      const name = $("key-name").value.trim();
      if (name) body.name = name;
      if ($("key-quota").value !== "") body.sample_quota = Number($("key-quota").value);
      if ($("key-expiry").value !== "") body.expires_in_s = Math.round(Number($("key-expiry").value) * 86400);
      body.watermark = $("key-watermark").checked;
      const userId = $("key-user").value;
      if (!userId) throw new ApiError(422, "choose the user the key is for");
      const user = state.users.get(Number(userId));
      if (user && user.role === "admin" && !(await confirmDialog(`${user.name} is an administrator: this key will be a full admin credential (users, keys, audits). Issue it?`, "Issue admin key"))) return;
      const created = await api("POST", `admin/users/${userId}/keys`, body);
      $("key-form").reset();
      showSecret(created);
      await loadKeys();
    });
  }

  function showSecret(created) {
    $("new-secret-value").textContent = created.api_key;
    $("new-secret-about").textContent = `Key #${created.id} (${created.prefix}…) for ${userLabel(created.user_id)}, scopes: ${created.scopes.join(" ") || "none"}.`;
    $("copy-result").textContent = "";
    $("new-secret").hidden = false;
  }

  function clearSecret() {
    $("new-secret-value").textContent = "";
    $("new-secret-about").textContent = "";
    $("new-secret").hidden = true;
  }

  async function copySecret() {
    const text = $("new-secret-value").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("copy-result").textContent = "copied";
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents($("new-secret-value"));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      $("copy-result").textContent = "selected: press Ctrl+C to copy";
    }
  }

  // ------------------------------------------------------------------------------------------ usage

  // Dense arrays over every bucket of [since, until) from the timeline's sparse buckets of one endpoint.
  function dense(timeline, endpoint, field, xs) {
    const values = new Array(xs.length).fill(0);
    const series = timeline.series.find((x) => x.endpoint === endpoint);
    for (const b of series ? series.buckets : []) {
      const i = Math.round((Date.parse(b.start) / 1000 - xs[0]) / timeline.bucket_s);
      if (i >= 0 && i < xs.length) values[i] += b[field];
    }
    return values;
  }

  function allEndpoints(timeline, field, xs) {
    const values = new Array(xs.length).fill(0);
    for (const x of timeline.series) dense(timeline, x.endpoint, field, xs).forEach((v, i) => { values[i] += v; });
    return values;
  }

  function chart(target, title, xs, series) {
    const width = Math.max(320, target.clientWidth - 16);
    const opts = {
      title, width, height: 220,
      scales: { x: { time: true } },
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),  // UTC, like every table of the console
      series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, points: { show: true } }))],
      axes: [{}, { size: 60 }],
    };
    const c = new uPlot(opts, [xs, ...series.map((s) => s[2])], target);
    state.charts.push(c);
  }

  async function loadUsage() {
    const [span, bucket] = $("usage-period").value.split(":").map(Number);
    const until = Math.ceil(Date.now() / 1000);
    const since = until - span;
    const iso = (t) => new Date(t * 1000).toISOString();
    const [, keys, perUser, timeline] = await Promise.all([
      fetchUsers(),
      api("GET", "admin/keys?limit=1000"),
      api("GET", `admin/usage?since=${iso(since)}&limit=1000`),
      api("GET", `admin/usage/timeline?since=${iso(since)}&until=${iso(until)}&bucket_s=${bucket}`),
    ]);
    for (const c of state.charts) c.destroy();
    state.charts = [];
    $("chart-requests").replaceChildren();
    $("chart-samples").replaceChildren();
    const xs = [];
    for (let t = Math.floor(since / bucket) * bucket; t < until; t += bucket) xs.push(t);
    const d = { requests: dense(timeline, "/distill-batch", "answered", xs), samples: dense(timeline, "/distill-batch", "samples", xs) };
    const p = { requests: dense(timeline, "/predict", "answered", xs), samples: dense(timeline, "/predict", "samples", xs) };
    const refused = allEndpoints(timeline, "refused", xs);
    chart($("chart-requests"), "requests per bucket", xs, [["/distill-batch answered", "#2f5bd3", d.requests], ["/predict answered", "#d97a00", p.requests], ["refused (4xx/5xx)", "#b3261e", refused]]);
    chart($("chart-samples"), "samples answered per bucket", xs, [["/distill-batch", "#2f5bd3", d.samples], ["/predict", "#d97a00", p.samples]]);
    const total = (values) => fmtNum(values.reduce((a, b) => a + b, 0));
    $("chart-requests").append(el("p", { class: "muted total" }, `In the period: ${total(d.requests)} /distill-batch and ${total(p.requests)} /predict requests answered, ${total(refused)} refused.`));
    $("chart-samples").append(el("p", { class: "muted total" }, `In the period: ${total(d.samples)} /distill-batch and ${total(p.samples)} /predict samples answered.`));
    const bars = keys.items.filter((k) => !k.revoked_at);
    $("quota-bars").replaceChildren(
      ...(bars.length ? bars.flatMap((k) => [
        el("span", { dataset: { key: String(k.id) } }, `${userLabel(k.user_id)} · ${k.name || k.prefix + "…"}`),
        k.sample_quota === null ? el("span", { class: "muted" }, "no quota") : el("meter", { min: 0, max: Math.max(1, k.sample_quota), value: k.samples_used, high: 0.9 * k.sample_quota, title: `${k.samples_used} of ${k.sample_quota}` }),
        el("span", { class: "num" }, k.sample_quota === null ? fmtNum(k.samples_used) : `${fmtNum(k.samples_used)} / ${fmtNum(k.sample_quota)} (${((100 * k.samples_used) / Math.max(1, k.sample_quota)).toFixed(1)}%)`),
      ]) : [el("span", { class: "muted" }, "no active key")]));
    $("usage-table").tBodies[0].replaceChildren(
      ...perUser.items.map((u) =>
        el("tr", {},
          el("td", {}, userLabel(u.user_id)),
          el("td", {}, u.role),
          el("td", { class: "num" }, fmtNum(u.requests)),
          el("td", { class: "num" }, fmtNum(u.answered)),
          el("td", { class: "num" }, fmtNum(u.samples)),
          el("td", { class: "num" }, fmtNum(u.rejected)),
          el("td", {}, fmtTime(u.last_seen)))));
  }

  // ------------------------------------------------------------------------------------------ audits

  function auditQuery() {
    const q = new URLSearchParams();
    const add = (name, id) => { const v = $(id).value.trim(); if (v) q.set(name, v); };
    // "#12" or "12" is an id; anything else a name (the API answers 404 for a name nobody has).
    const who = (idParam, nameParam, id) => {
      const v = $(id).value.trim();
      const m = /^#?(\d+)$/.exec(v);
      if (m) q.set(idParam, m[1]);
      else if (v) q.set(nameParam, v);
    };
    who("user_id", "user_name", "audit-user");
    who("key_id", "key_name", "audit-key");
    add("endpoint", "audit-endpoint");
    add("status", "audit-status");
    for (const [name, id] of [["since", "audit-since"], ["until", "audit-until"]]) {
      const v = $(id).value;
      if (v) q.set(name, `${v.length === 16 ? v + ":00" : v}Z`);
    }
    return q;
  }

  // An authenticated call is shown by its user and key (its network client id in the tooltip); an
  // anonymous one by its client id, the only identity it has.
  function clientCell(a) {
    if (a.user_id === null && a.api_key_id === null) return el("td", {}, el("code", {}, (a.client_id || "").slice(0, 12)));
    const key = a.api_key_id === null ? "" : ` · ${a.key_name || `key #${a.api_key_id}`}`;
    return el("td", { title: a.client_id ? `network client ${a.client_id}` : "" }, `${a.user_name ?? `#${a.user_id}`}${key}`);
  }

  async function loadAudits() {
    const q = auditQuery();
    q.set("limit", String(PAGE));
    q.set("offset", String(state.auditOffset));
    const page = await api("GET", `admin/audits?${q}`);
    $("audits-table").tBodies[0].replaceChildren(
      ...page.items.map((a) =>
        el("tr", {},
          el("td", { class: "num" }, a.id),
          el("td", {}, fmtTime(a.created_at)),
          el("td", {}, a.endpoint),
          el("td", {}, a.model || ""),
          el("td", {}, a.user_id === null ? "" : `${a.user_name ?? "?"} (#${a.user_id})`),
          el("td", {}, a.api_key_id === null ? "" : a.key_name ? `${a.key_name} (#${a.api_key_id})` : `#${a.api_key_id}`),
          clientCell(a),
          el("td", { class: "num" }, fmtNum(a.n_samples)),
          el("td", { class: "num" }, a.status),
          el("td", { class: "num" }, a.latency_ms === null ? "" : a.latency_ms.toFixed(1)))));
    $("audit-range").textContent = page.total === 0
      ? "No audit row matches these filters."
      : `rows ${page.offset + 1} to ${page.offset + page.items.length} of ${fmtNum(page.total)}`;
    $("audit-prev").disabled = page.offset === 0;
    $("audit-next").disabled = page.offset + page.items.length >= page.total;
  }

  async function exportAudits() {
    await run(async () => {
      const q = auditQuery();
      q.set("limit", "100000");
      const r = await api("GET", `admin/audits/export?${q}`, undefined, true);
      const url = URL.createObjectURL(await r.blob());
      const a = el("a", { href: url, download: `sdb-audits-${new Date().toISOString().slice(0, 19).replace(/:/g, "")}.csv` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      setStatus(`Exported ${r.headers.get("X-Total-Count")} matching audit rows (at most 100,000).`, true);
    });
  }

  // ------------------------------------------------------------------------------------------ extraction

  async function loadExtraction() {
    const ex = await api("GET", "admin/extraction");
    const since = new Date(Date.parse(ex.until) - 7 * 86400 * 1000).toISOString();
    // Daily buckets: the series are not drawn here, and the flag uses the extraction window whatever the bucket.
    const all = await api("GET", `admin/usage/clients?kind=anonymous&since=${since}&until=${ex.until}&bucket_s=86400&limit=1000`);
    $("extraction-rule").replaceChildren(
      `Rule: ${ex.rule}. Shown: anonymous /predict clients over the last 7 days by samples pulled; `,
      el("strong", {}, `${ex.flagged.length} flagged`), ".");
    $("extraction-table").tBodies[0].replaceChildren(
      ...all.items.map((c) =>
        el("tr", { class: c.flagged ? "flagged" : "" },
          el("td", {}, el("code", {}, c.client)),
          el("td", { class: "num" }, fmtNum(c.requests)),
          el("td", { class: "num" }, fmtNum(c.samples)),
          el("td", { class: "num" }, `${fmtNum(c.max_window_samples)} / ${fmtNum(ex.threshold_samples)}`),
          el("td", {}, c.flagged ? el("span", { class: "badge bad" }, "FLAGGED") : el("span", { class: "muted" }, "below threshold")))));
    if (all.items.length === 0) $("extraction-table").tBodies[0].append(el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "no anonymous traffic in the period")));
  }

  // ------------------------------------------------------------------------------------------ models

  const pct = (v) => (typeof v === "number" ? `${v.toFixed(2)} %` : "");

  function metricsTable(metrics) {
    const names = [["plain_top1", "plain top-1 (anyone)"], ["keyed_top1", "keyed top-1 (box key)"], ["wrong_key_top1", "wrong-key top-1"], ["teacher_top1", "teacher top-1"]];
    const rows = names.filter(([k]) => k in metrics).map(([k, label]) => el("tr", {}, el("th", {}, label), el("td", { class: "num" }, pct(metrics[k]))));
    for (const [k, v] of Object.entries(metrics)) if (!names.some(([n]) => n === k)) rows.push(el("tr", {}, el("th", {}, k), el("td", { class: "num" }, typeof v === "number" ? v.toFixed(3) : String(v))));
    return rows.length ? el("table", { class: "metrics" }, el("tbody", {}, rows)) : el("p", { class: "muted" }, "The manifest records no metrics.");
  }

  function evaluationTable(ev) {
    if (!ev) return el("p", { class: "muted" }, "No evaluation report (put the results.json of `sdb evaluate` in the artifact directory as evaluation.json).");
    const rows = [];
    const stat = (s) => `${s.mean.toFixed(2)} ± ${s.std.toFixed(2)}`;
    for (const [k, s] of Object.entries(ev.summary.teacher || {})) rows.push(el("tr", {}, el("td", {}, "teacher"), el("td", {}, k), el("td", { class: "num" }, stat(s))));
    const figures = [["floor", "label-only floor"], ["V", "V = normal KD − floor"], ["delivered", "delivered (licensee)"], ["leaked", "leaked (best attack)"]];
    for (const [spec, m] of Object.entries(ev.summary.measures || {})) {
      for (const [k, label] of figures) {
        if (!m[k]) continue;
        const name = k === "leaked" && m.leaked_by ? `${label}: ${m.leaked_by}` : label;
        rows.push(el("tr", {}, el("td", {}, `student ${spec}`), el("td", {}, name), el("td", { class: "num" }, stat(m[k]))));
      }
    }
    const checks = Object.entries(ev.checks || {}).map(([k, ok]) => el("li", {}, el("span", { class: ok ? "badge good" : "badge bad" }, ok ? "pass" : "fail"), ` ${k}`));
    return el("div", {},
      el("p", { class: "muted" }, `Evaluation over seeds ${(ev.seeds || []).join(", ")} (top-1 %, mean ± std).`),
      el("table", { class: "evaluation" }, el("thead", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, "figure"), el("th", {}, "top-1"))), el("tbody", {}, rows)),
      checks.length ? el("ul", {}, checks) : null);
  }

  async function loadModels() {
    const models = await api("GET", "admin/models");
    $("models-list").replaceChildren(
      ...(models.length ? models.map((m) =>
        el("div", { class: "card", dataset: { model: m.name } },
          el("h3", {}, m.name, " ", el("span", { class: "muted" }, `version ${m.version}`), " ", m.loaded ? el("span", { class: "badge good" }, "loaded") : el("span", { class: "badge" }, "not loaded")),
          el("p", { class: "muted" }, `input ${JSON.stringify(m.info.input_shape || [])}, ${m.info.num_classes ?? "?"} classes, temperature ${m.info.temperature ?? "?"}, device ${m.info.device ?? "?"}`),
          el("h4", {}, "Manifest metrics"),
          metricsTable(m.info.metrics || {}),
          el("h4", {}, "Evaluation"),
          evaluationTable(m.info.evaluation))) : [el("p", { class: "muted" }, "No model is served.")]));
  }

  // ------------------------------------------------------------------------------------------ wiring

  // ------------------------------------------------------------------------------------------ trace

  async function loadTrace() {
    const models = await api("GET", "admin/models");
    const keep = $("trace-model").value;
    $("trace-model").replaceChildren(...models.filter((m) => m.loaded).map((m) => el("option", { value: m.name }, m.name)));
    if (keep) $("trace-model").value = keep;
  }

  const fmtP = (log10, p) => (log10 === null ? "0" : log10 > -300 ? Number(p).toExponential(2) : `1e${Math.round(log10)}`);

  async function runTrace(event) {
    event.preventDefault();
    await run(async () => {
      const body = { model: $("trace-model").value, suspect_url: $("trace-url").value.trim(), probes: Number($("trace-probes").value), decoys: Number($("trace-decoys").value) };
      const suspectModel = $("trace-suspect-model").value.trim();
      if (suspectModel) body.suspect_model = suspectModel;
      setStatus("");
      $("trace-summary").textContent = "Tracing: querying the suspect…";
      $("trace-table").tBodies[0].replaceChildren();
      let report;
      try {
        report = await api("POST", "admin/trace", body);
      } catch (e) {
        $("trace-summary").textContent = "";
        throw e;
      }
      const d = report.decoys;
      const named = report.matches.map((m) => `key #${m.key_id} (${m.user_name})`).join(", ");
      $("trace-summary").textContent = `${report.probes} probes, ${report.watermarks_tested} watermarks tested (${report.correction}, alpha ${report.alpha}): ` +
        (named ? `match: ${named}.` : "no watermark matches.") +
        (d.count ? ` Decoys: ${d.count}, false positives ${(100 * d.false_positive_rate).toFixed(2)} %, z ${d.z_mean.toFixed(2)} ± ${d.z_std.toFixed(2)}.` : "");
      $("trace-table").tBodies[0].replaceChildren(
        ...report.keys.map((k) =>
          el("tr", { class: k.verdict === "match" ? "flagged" : "", dataset: { key: String(k.key_id) } },
            el("td", { class: "num" }, k.rank),
            el("td", {}, el("span", { class: k.verdict === "match" ? "badge bad" : "badge" }, k.verdict)),
            el("td", {}, `#${k.key_id} `, el("code", {}, k.key_prefix), k.key_name ? ` ${k.key_name}` : ""),
            el("td", {}, `${k.user_name} (#${k.user_id})`),
            el("td", {}, k.key_state),
            el("td", {}, el("code", {}, k.watermark_id)),
            el("td", { class: "num" }, k.statistic === null ? "" : k.statistic.toFixed(2)),
            el("td", { class: "num" }, k.top1_statistic == null ? "–" : k.top1_statistic.toFixed(2)),
            el("td", { class: "num" }, k.pattern_statistic == null ? "–" : k.pattern_statistic.toFixed(2)),
            el("td", { class: "num" }, fmtP(k.log10_p, k.p_value)),
            el("td", { class: "num" }, fmtP(k.log10_corrected_p, k.corrected_p)),
            el("td", { class: "num" }, k.own_images ? k.own_images : "–"))));
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", () => signOut("Signed out."));
    for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
    $("user-form").addEventListener("submit", createUser);
    $("key-form").addEventListener("submit", issueKey);
    $("keys-filter").addEventListener("change", () => run(loadKeys));
    $("copy-secret").addEventListener("click", copySecret);
    $("dismiss-secret").addEventListener("click", clearSecret);
    $("usage-period").addEventListener("change", () => run(loadUsage));
    // a new filter: the banner of an earlier action (e.g. "Exported N rows") no longer describes the page
    $("audit-form").addEventListener("submit", (e) => { e.preventDefault(); setStatus(""); state.auditOffset = 0; run(loadAudits); });
    $("audit-prev").addEventListener("click", () => { state.auditOffset = Math.max(0, state.auditOffset - PAGE); run(loadAudits); });
    $("audit-next").addEventListener("click", () => { state.auditOffset += PAGE; run(loadAudits); });
    $("audit-export").addEventListener("click", exportAudits);
    $("trace-form").addEventListener("submit", runTrace);
    $("signin-key").focus();
  });
})();
