// flowproxy's dashboard: polls the node's JSON API and shows it. Every value may come from Consul KV, so
// each is set as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const MAX_ROWS = 1000; // rows drawn at once; the filter narrows larger tables
const state = { routes: null, nodes: null, changes: null, certificates: null, errors: {} };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function load(name) {
  // location.origin carries no credentials: the browser adds the ones it was given for this origin.
  const response = await fetch(location.origin + "/api/" + name, { cache: "no-store", credentials: "same-origin" });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
  return body;
}

function instanceView(instance) {
  const haproxy = instance.haproxy || "not in HAProxy";
  return el("li", { class: "instance", "data-instance": instance.id, "data-consul": instance.consul,
                    "data-haproxy": instance.haproxy || "" },
    el("span", { class: "health " + instance.consul }, instance.consul),
    " ", instance.id, " ", el("span", { class: "muted" }, instance.address),
    " · HAProxy: ", el("span", { class: "hap " + haproxy.split(" ")[0].toLowerCase() }, haproxy));
}

function variantView(variant) {
  const label = variant.role === "canary" ? "canary " + variant.weight + "%" : variant.role;
  const what = variant.service ? [variant.service, ...(variant.tags || []).map((t) => "#" + t)].join(" ") : "";
  const where = [...(variant.domains || []), ...(variant.paths || [])].join(" ") ||
    (variant.port ? variant.mode + " :" + variant.port : "");
  return el("li", { class: "variant", "data-variant": variant.variant, "data-role": variant.role },
    el("span", { class: "role " + variant.role }, label), " ", el("strong", {}, variant.variant), " ",
    el("span", { class: "muted" }, what + (where ? " → " + where : "")),
    ...(variant.problems || []).map((p) => el("div", { class: "reason" }, p)),
    el("ul", { class: "instances" }, ...(variant.instances || []).map(instanceView)));
}

function routeRow(route) {
  const t = route.traffic || {};
  const errors = t.conn_errors === undefined ? "" : t.conn_errors + t.resp_errors;
  const cell = (attrs, ...children) => el("div", { role: "cell", ...attrs }, ...children);
  return el("div", { class: "route " + route.state, role: "row", "data-route": route.route, "data-state": route.state },
    cell({}, el("strong", {}, route.route), el("div", { class: "muted" }, "active: " + (route.active || "none"))),
    cell({}, el("span", { class: "badge " + route.state }, route.state),
      ...route.reasons.map((r) => el("div", { class: "reason" }, r)),
      ...route.notes.map((n) => el("div", { class: "muted" }, n))),
    cell({}, el("ul", { class: "variants" }, ...route.variants.map(variantView))),
    cell({ class: "num" }, t.requests ?? ""), cell({ class: "num" }, t["4xx"] ?? ""),
    cell({ class: "num" }, t["5xx"] ?? ""), cell({ class: "num" }, errors));
}

function drawRoutes() {
  const doc = state.routes;
  if (!doc) return;
  const needle = document.getElementById("filter").value.trim().toLowerCase();
  const matching = doc.routes.filter((r) => !needle || r.route.includes(needle) ||
    r.variants.some((v) => (v.service || "").toLowerCase().includes(needle)));
  document.getElementById("route-rows").replaceChildren(...matching.slice(0, MAX_ROWS).map(routeRow));
  document.getElementById("shown").textContent = matching.length > MAX_ROWS
    ? `showing ${MAX_ROWS} of ${matching.length} matching routes; filter to narrow`
    : `${matching.length} of ${doc.routes.length} routes`;
  const rejected = doc.routes.filter((r) => r.state === "rejected")
    .map((r) => el("li", { "data-route": r.route }, el("strong", {}, r.route), ": ", r.reasons.join("; ")));
  const problems = doc.problems.map((p) => el("li", { class: "problem" }, p));
  document.getElementById("rejected").replaceChildren(...rejected, ...problems);
  if (!rejected.length && !problems.length) document.getElementById("rejected").append(el("li", {}, "none"));
}

function drawNodes() {
  const doc = state.nodes;
  if (!doc) return;
  document.getElementById("converged").textContent = doc.converged ? "· converged" : "· NOT converged";
  document.getElementById("converged").className = doc.converged ? "ok" : "bad";
  const rows = doc.nodes.map((n) => el("tr", { "data-node": n.node, "data-health": n.health },
    el("td", {}, n.node), el("td", {}, el("span", { class: "health " + n.health }, n.health)),
    el("td", { class: "num" }, n.kv_index), el("td", {}, n.current ? "yes" : "STALE"),
    el("td", { class: "mono" }, (n.config_sha256 || "-").slice(0, 12)), el("td", {}, n.same ? "yes" : "NO"),
    el("td", {}, n.time), el("td", { class: "reason" }, n.last_error || "")));
  document.querySelector("#nodes tbody").replaceChildren(...rows);
}

function drawChanges() {
  const doc = state.changes;
  if (!doc) return;
  const rows = doc.changes.map((c) => el("tr", { class: c.ok ? "" : "failed" },
    el("td", {}, new Date(c.time * 1000).toLocaleTimeString()), el("td", {}, c.ok ? "ok" : "FAILED"),
    el("td", {}, c.path), el("td", {}, c.what), el("td", { class: "num" }, c.kv_index || ""),
    el("td", { class: "mono" }, (c.config_sha256 || "").slice(0, 12)), el("td", { class: "num" }, c.ms)));
  document.querySelector("#changes tbody").replaceChildren(...rows);
}

function drawCertificates() {
  const doc = state.certificates;
  if (!doc) return;
  const acme = (c) => !c.acme ? "-" : !c.last_error ? "ok"
    : `${c.last_error} (${c.failures} failed; next ${c.next_attempt || "-"})`;
  const rows = doc.certificates.map((c) => el("tr", { "data-certificate": c.name, class: c.last_error ? "failed" : "" },
    el("td", {}, c.name), el("td", {}, (c.names || []).join(" ")), el("td", {}, c.issuer || "-"),
    el("td", {}, c.not_after || "-"), el("td", { class: c.last_error ? "reason" : "" }, acme(c))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 5 }, "none")));
  document.querySelector("#certificates tbody").replaceChildren(...rows);
}

function drawSummary() {
  const doc = state.routes;
  const errors = Object.entries(state.errors).map(([name, message]) => `/api/${name}: ${message}`);
  const banner = document.getElementById("error");
  banner.hidden = errors.length === 0;
  banner.textContent = errors.join("; ");
  if (!doc) return;
  document.getElementById("node").textContent = "· node " + doc.node;
  const counts = {};
  for (const r of doc.routes) counts[r.state] = (counts[r.state] || 0) + 1;
  const parts = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ") || "no routes";
  document.getElementById("summary").textContent =
    `${parts} · KV index ${doc.kv_index}, applied ${doc.applied_kv_index}` +
    (doc.ok ? "" : ` · last apply FAILED: ${doc.last_error}`) +
    (doc.haproxy ? "" : " · HAProxy not answering") + ` · updated ${new Date().toLocaleTimeString()}`;
}

async function poll() {
  const started = performance.now();
  if (!document.body.dataset.firstPollAt) document.body.dataset.firstPollAt = started.toFixed(1); // since navigation
  await Promise.all(["routes", "nodes", "changes", "certificates"].map(async (name) => {
    try {
      state[name] = await load(name);
      delete state.errors[name];
    } catch (error) {
      state.errors[name] = error.message;
    }
  }));
  const drawn = performance.now();
  drawRoutes();
  drawNodes();
  drawChanges();
  drawCertificates();
  drawSummary();
  void document.body.offsetHeight; // lay the page out now: drawing is not done until then
  document.body.dataset.renderMs = (performance.now() - drawn).toFixed(1);
  document.body.dataset.loadMs = (drawn - started).toFixed(1);
  document.body.dataset.polls = String(Number(document.body.dataset.polls) + 1);
  setTimeout(poll, POLL_MS);
}

document.getElementById("filter").addEventListener("input", drawRoutes);
poll();
