// The Polaris console: hash routes #/jobs, #/jobs/{id}, #/run, #/hosts, #/tree.

import { api, ApiFailure, setToken, token } from "./api.js";
import { readEvents } from "./sse.js";

const main = document.getElementById("main");
const errorBox = document.getElementById("error");
const FINAL = ["success", "failed", "revoked", "expired", "skipped", "cancelled"];
const WAITING_FOR_AGENT = ["pending", "ready"];
const RESERVED_POLL_MS = 3000;
let pageAbort = new AbortController();

// Builds an element: el("td", {class: "x"}, "text", child, ...).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function showError(e) {
  const text = e instanceof ApiFailure ? `Error ${e.status}: ${e.describe()}` : String(e && e.message ? e.message : e);
  errorBox.replaceChildren(el("strong", {}, "The request failed. "), text, " ", el("button", { type: "button", onclick: clearError }, "Dismiss"));
  errorBox.hidden = false;
  if (e instanceof ApiFailure && e.status === 401) document.getElementById("token").focus();
}

function clearError() {
  errorBox.hidden = true;
  errorBox.replaceChildren();
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "—";
}

function render(title, ...children) {
  document.title = `${title} · Polaris console`;
  main.replaceChildren(el("h1", {}, title), ...children);
}

function stateBadge(state) {
  return el("span", { class: `badge state-${state}` }, state);
}

function counts(states) {
  const entries = Object.entries(states || {}).filter(([, n]) => n > 0);
  if (!entries.length) return "—";
  return el("span", { class: "counts" }, entries.map(([s, n]) => el("span", { class: `badge state-${s}` }, `${s} ${n}`)));
}

// #/jobs: the newest jobs, with their hosts counted by state.
async function jobsPage() {
  const list = await api("GET", "/v1/jobs?limit=100");
  const byState = {};
  for (const job of list.jobs) byState[job.state] = (byState[job.state] || 0) + 1;
  const rows = list.jobs.map((job) =>
    el("tr", {},
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, el("code", {}, job.id.slice(0, 8)))),
      el("td", {}, stateBadge(job.state)),
      el("td", {}, job.method),
      el("td", { class: "cmd" }, job.cmd || ""),
      el("td", { class: "num" }, job.hosts),
      el("td", {}, counts(job.states)),
      el("td", {}, when(job.created_at_ms))));
  render("Jobs",
    el("p", { id: "job-counts" }, `${list.total} jobs in all; of the ${list.jobs.length} newest: `, counts(byState)),
    list.jobs.length
      ? el("table", {},
          el("caption", { class: "sr-only" }, "Jobs, newest first"),
          el("thead", {}, el("tr", {}, ["Job", "State", "Method", "Command", "Hosts", "Host states", "Created"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, rows))
      : el("p", {}, "No job yet. ", el("a", { href: "#/run" }, "Run a command.")));
}

// #/jobs/{id}: the hosts' grid, live from the event stream, and one host's output.
async function jobPage(id, signal) {
  const job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
  const hosts = new Map();
  const grid = el("ul", { id: "host-grid", class: "grid", "aria-label": "Hosts by state" });
  const summary = el("p", { id: "job-summary", "aria-live": "polite" });
  const stateLine = el("span", {});
  const outputTitle = el("h2", {}, "Output");
  const outputMeta = el("p", { class: "meta" });
  const output = el("pre", { id: "host-output", tabindex: "0", "aria-live": "off" });
  let selected = null;

  function showOutput() {
    const h = hosts.get(selected);
    if (!h) return;
    outputTitle.textContent = `Output of ${h.host}`;
    const meta = [`state ${h.state}`];
    if (h.retcode !== null && h.retcode !== undefined) meta.push(`retcode ${h.retcode}`);
    if (h.message) meta.push(h.message);
    if (h.final === false && h.live) meta.push("live");
    outputMeta.textContent = meta.join(" · ");
    output.textContent = h.text;
  }

  function update(host, fields) {
    const h = hosts.get(host);
    if (!h) return;
    Object.assign(h, fields);
    h.cell.dataset.state = h.state;
    h.cell.className = `cell state-${h.state}`;
    h.label.textContent = h.state;
    h.cell.setAttribute("aria-label", `${host}: ${h.state}`);
    if (host === selected) showOutput();
  }

  function select(host) {
    selected = host;
    for (const h of hosts.values()) h.cell.setAttribute("aria-pressed", String(h.host === host));
    showOutput();
  }

  for (const h of job.hosts) {
    const label = el("span", { class: "cell-state" }, h.state);
    const cell = el("button", { type: "button", class: `cell state-${h.state}`, dataset: { host: h.host, state: h.state }, onclick: () => select(h.host) },
      el("span", { class: "cell-host" }, h.host), label);
    hosts.set(h.host, { host: h.host, state: h.state, retcode: h.retcode, message: h.message, text: hostText(h), final: FINAL.includes(h.state), attempt: h.attempt, cell, label });
    grid.append(el("li", {}, cell));
  }

  function refreshSummary(summaryCounts) {
    const c = {};
    if (summaryCounts) Object.assign(c, summaryCounts);
    else for (const h of hosts.values()) c[h.state] = (c[h.state] || 0) + 1;
    summary.replaceChildren(`${hosts.size} hosts: `, counts(c));
  }

  const target = job.target ? JSON.stringify(job.target) : null;
  render(`Job ${id.slice(0, 8)}`,
    el("dl", { class: "facts" },
      el("dt", {}, "Id"), el("dd", {}, el("code", {}, job.id)),
      el("dt", {}, "State"), el("dd", { id: "job-state" }, stateLine),
      el("dt", {}, "Method"), el("dd", {}, job.method),
      job.cmd ? [el("dt", {}, "Command"), el("dd", {}, el("code", {}, job.cmd))] : null,
      target ? [el("dt", {}, "Target"), el("dd", {}, el("code", {}, target))] : null,
      el("dt", {}, "Timeout"), el("dd", {}, `${job.timeout} s`),
      el("dt", {}, "Created"), el("dd", {}, when(job.created_at_ms))),
    el("p", {}, el("button", { type: "button", id: "cancel-job", onclick: () => cancel(id) }, "Cancel the job")),
    summary, grid, outputTitle, outputMeta, output);
  stateLine.replaceChildren(stateBadge(job.state));
  refreshSummary(job.summary);
  if (job.hosts.length) select(job.hosts[0].host);

  // Events carry the stored states; `reserved` (an agent took it) is read live from the
  // queue by GET /v1/jobs/{id}, so that is asked again now and then until the job is done.
  let finished = job.done;
  const poll = async () => {
    while (!finished && !signal.aborted) {
      await new Promise((resolve) => setTimeout(resolve, RESERVED_POLL_MS));
      if (finished || signal.aborted) return;
      try {
        const now = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
        let changed = false;
        for (const r of now.hosts) {
          const h = hosts.get(r.host);
          if (h && r.state === "reserved" && WAITING_FOR_AGENT.includes(h.state)) {
            update(r.host, { state: "reserved" });
            changed = true;
          }
        }
        if (changed) refreshSummary();
      } catch (_) {
        // The event stream reports what is wrong; this is only a refinement.
      }
    }
  };
  poll();

  const seen = new Map();
  readEvents(`/v1/jobs/${encodeURIComponent(id)}/events`, (event) => {
    let body;
    try {
      body = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (event.type === "host") {
      const h = hosts.get(body.host);
      if (!h) return;
      const fields = { state: body.state, attempt: body.attempt, final: FINAL.includes(body.state) };
      if (body.state === "reserved" && h.attempt !== body.attempt) fields.text = "";
      if ("retcode" in body) fields.retcode = body.retcode;
      if ("message" in body) fields.message = body.message;
      if (fields.final) fields.text = hostText(body);
      update(body.host, fields);
      refreshSummary();
    } else if (event.type === "output") {
      const h = hosts.get(body.host);
      if (!h || h.final) return;
      const key = `${body.host}/${body.attempt}`;
      if (seen.get(key) === undefined) {
        seen.set(key, 0);
        h.text = "";
      }
      if (body.offset < seen.get(key)) return;
      seen.set(key, body.offset + 1);
      const chunk = body.encoding === "base64" ? `[${atob(body.data).length} bytes of binary output]\n` : body.data;
      // The stored row stays `ready` while an agent runs it (the API reads `reserved` live
      // from the queue): output is proof that it runs.
      const running = WAITING_FOR_AGENT.includes(h.state) ? { state: "reserved" } : {};
      update(body.host, { text: h.text + chunk, live: true, ...running });
      if (running.state) refreshSummary();
    } else if (event.type === "done") {
      finished = true;
      stateLine.replaceChildren(stateBadge(body.cancelled ? "cancelled" : "done"));
      refreshSummary(body.summary);
    } else if (event.type === "cancelled" || event.type === "halted") {
      stateLine.replaceChildren(stateBadge(event.type), body.reason ? ` ${body.reason}` : "");
    } else if (event.type === "batch") {
      stateLine.replaceChildren(stateBadge("running"), ` batch ${body.current}`);
    }
  }, signal).catch((e) => {
    if (!signal.aborted) showError(e);
  });
}

function hostText(h) {
  if (h.encoding === "base64") return `[binary output, base64]\n${h.data_base64 || ""}`;
  return h.data || "";
}

async function cancel(id) {
  try {
    await api("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    showError(e);
  }
}

// #/hosts: registered hosts with their facts, nodes and labels.
async function hostsPage() {
  const { hosts } = await api("GET", "/v1/hosts");
  const rows = hosts.map((h) => {
    const f = h.facts || {};
    const os = f.os ? f.os.name || f.os.id : "";
    return el("tr", {},
      el("td", {}, el("code", {}, h.id)),
      el("td", {}, h.hostname || ""),
      el("td", {}, [os, f.kernel, f.arch].filter(Boolean).join(" · ")),
      el("td", {}, (h.nodes || []).join(", ")),
      el("td", {}, Object.entries(h.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ")),
      el("td", {}, when(h.last_seen_ms)));
  });
  render("Hosts",
    el("p", {}, `${hosts.length} registered hosts.`),
    el("table", { id: "hosts" },
      el("thead", {}, el("tr", {}, ["Host", "Hostname", "System", "Nodes", "Labels", "Last seen"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)));
}

// #/tree: the product tree.
async function treePage() {
  const { nodes } = await api("GET", "/v1/nodes");
  const branch = (list) =>
    el("ul", {}, list.map((n) =>
      el("li", {},
        el("a", { href: `#/run?node=${encodeURIComponent(n.path)}`, title: `Run a command on ${n.path}` }, n.name),
        " ", el("span", { class: "meta" }, `${n.level} · ${n.host_count} hosts`),
        n.children && n.children.length ? branch(n.children) : null)));
  render("Product tree", nodes.length ? el("nav", { class: "tree", "aria-label": "Product tree" }, branch(nodes)) : el("p", {}, "The tree is empty."));
}

function words(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

// #/run: a form that POSTs /v1/jobs, then opens the job.
function runPage(params) {
  const kind = params.get("node") ? "node" : "hosts";
  const radio = (value, text) =>
    el("label", {}, el("input", { type: "radio", name: "kind", value, checked: kind === value }), ` ${text}`);
  const form = el("form", { id: "run-form" },
    el("fieldset", {},
      el("legend", {}, "Target"),
      radio("hosts", "Hosts"), radio("node", "Node path"), radio("labels", "Labels"),
      el("label", { for: "run-target" }, "Hosts (separated by spaces or commas), a node path, or labels (role=web, dc=hz1)"),
      el("input", { id: "run-target", name: "target", required: true, value: params.get("node") || "", autocomplete: "off" })),
    el("label", { for: "run-method" }, "Method"),
    el("select", { id: "run-method", name: "method" }, el("option", { value: "async.bash" }, "async.bash")),
    el("label", { for: "run-cmd" }, "Command"),
    el("textarea", { id: "run-cmd", name: "cmd", rows: 4, required: true, spellcheck: "false" }),
    el("label", { for: "run-timeout" }, "Timeout (seconds)"),
    el("input", { id: "run-timeout", name: "timeout", type: "number", min: 1, max: 86400, value: 30 }),
    el("p", {}, el("button", { type: "submit", id: "run-submit" }, "Run")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const data = new FormData(form);
    const text = String(data.get("target")).trim();
    const body = { method: data.get("method"), cmd: String(data.get("cmd")), timeout: Number(data.get("timeout")) };
    const k = data.get("kind");
    if (k === "hosts") body.hosts = words(text);
    else if (k === "node") body.target = { nodes: [text] };
    else {
      const labels = {};
      for (const pair of words(text)) {
        const eq = pair.indexOf("=");
        labels[eq < 0 ? pair : pair.slice(0, eq)] = eq < 0 ? "" : pair.slice(eq + 1);
      }
      body.target = { labels };
    }
    try {
      const reply = await api("POST", "/v1/jobs", body);
      location.hash = `#/jobs/${encodeURIComponent(reply.id)}`;
    } catch (e) {
      showError(e);
    }
  });
  render("Run a command", form);
}

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  clearError();
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav[aria-label=Main] a")) {
    if (a.getAttribute("href") === `#/${parts[0]}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.setAttribute("aria-busy", "true");
  try {
    if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1], signal);
    else if (parts[0] === "run") runPage(new URLSearchParams(query || ""));
    else if (parts[0] === "hosts") await hostsPage();
    else if (parts[0] === "tree") await treePage();
    else await jobsPage();
  } catch (e) {
    render("Polaris console", el("p", {}, "This page could not be loaded."));
    showError(e);
  } finally {
    main.removeAttribute("aria-busy");
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  tokenState();
  route();
});

function tokenState() {
  document.getElementById("token-state").textContent = token() ? "token set" : "no token";
}

window.addEventListener("hashchange", route);
tokenState();
route();
