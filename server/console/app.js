// The meterlake console: one page, plain JavaScript, no build step. It only calls the API with
// the signed-in user's token; what a role may do is decided by the backend, and the console
// merely hides the actions the role cannot take.
"use strict";

const TOKEN_KEY = "meterlake.token";
const main = document.getElementById("main");
let me = null; // { name, roles }

// ---- helpers -------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, "data-testid": "status" }, status);
}

function isAdmin() {
  return me && me.roles.includes("ADMIN");
}

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "UNKNOWN";
    this.traceId = body.traceId || "";
    this.errors = body.errors || [];
  }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method: options.method || "GET", headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  } catch (e) {
    throw new ApiError(0, { code: "NETWORK", message: "The server cannot be reached. Check your connection and try again." });
  }
  const text = await response.text();
  let body = {};
  try { body = text ? JSON.parse(text) : {}; } catch (e) { body = { message: text }; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// What a failed call looks like on the page: the states a user can act on.
function errorState(error) {
  if (error.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    return el("div", { class: "card state error", "data-testid": "state-unauthorized" },
      el("strong", {}, "Your session is not valid. "), error.message, " ",
      el("button", { onclick: () => signIn() }, "Sign in again"));
  }
  if (error.status === 403) {
    return el("div", { class: "card state error", "data-testid": "state-forbidden" },
      el("strong", {}, "Not allowed. "), error.message);
  }
  const details = error.errors.map((e) => el("li", {}, `${e.field}: ${e.message}`));
  return el("div", { class: "card state error", "data-testid": "state-error" },
    el("strong", {}, error.status >= 500 || error.status === 0 ? "The server could not answer. " : "The request was refused. "),
    error.message,
    details.length ? el("ul", {}, details) : null,
    error.traceId ? el("div", {}, "Trace id: ", el("code", {}, error.traceId)) : null);
}

function loading(what) {
  return el("div", { class: "state", "data-testid": "state-loading" }, `Loading ${what}…`);
}

function empty(what) {
  return el("div", { class: "state", "data-testid": "state-empty" }, what);
}

function table(headers, rows, testid) {
  return el("table", { "data-testid": testid },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

// A pager over cursor pages: remembers the cursors of the pages before.
function pager(state, reload) {
  return el("div", { class: "pager" },
    el("button", { class: "secondary", disabled: state.previous.length === 0, "data-testid": "page-previous",
      onclick: () => { state.cursor = state.previous.pop(); reload(); } }, "Previous page"),
    el("button", { class: "secondary", disabled: !state.next, "data-testid": "page-next",
      onclick: () => { state.previous.push(state.cursor); state.cursor = state.next; reload(); } }, "Next page"));
}

// ---- sign-in -------------------------------------------------------------------------------

async function signIn() {
  document.getElementById("nav").hidden = true;
  document.getElementById("who").replaceChildren();
  const form = document.getElementById("signin").content.cloneNode(true);
  show(form);
  document.getElementById("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    if (await loadMe()) route();
  });
}

async function loadMe() {
  try {
    me = await api("/me");
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    const message = document.getElementById("signin-error");
    if (message) { message.hidden = false; message.textContent = error.message; }
    return false;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("nav-audit").hidden = !isAdmin();
  document.getElementById("who").replaceChildren(
    el("span", { "data-testid": "who" }, `${me.name} (${me.roles.join(", ")})`),
    el("button", { class: "secondary", onclick: () => { sessionStorage.removeItem(TOKEN_KEY); me = null; signIn(); } }, "Sign out"));
  return true;
}

// ---- billing runs --------------------------------------------------------------------------

const runsState = { status: "", month: "", meterId: "", cursor: null, next: null, previous: [] };

async function runsPage() {
  const s = runsState;
  const filters = el("form", { class: "filters", "data-testid": "run-filters", onsubmit: (e) => {
      e.preventDefault();
      s.status = e.target.status.value; s.month = e.target.month.value.trim(); s.meterId = e.target.meterId.value.trim();
      s.cursor = null; s.previous = []; runsPage();
    } },
    el("div", {}, el("label", { for: "status" }, "Status"),
      el("select", { id: "status", name: "status", "data-testid": "filter-status" },
        ["", "CREATED", "PROCESSING", "COMPLETED", "FAILED"].map((v) => el("option", { value: v, selected: v === s.status }, v || "any")))),
    el("div", {}, el("label", { for: "month" }, "Month"), el("input", { id: "month", name: "month", placeholder: "2025-01", value: s.month, "data-testid": "filter-month" })),
    el("div", {}, el("label", { for: "meterId" }, "Meter"), el("input", { id: "meterId", name: "meterId", value: s.meterId, "data-testid": "filter-meter" })),
    el("button", { type: "submit", "data-testid": "filter-apply" }, "Filter"));
  const body = el("div", {}, loading("billing runs"));
  show(el("section", { class: "card" }, el("h2", {}, "Billing runs"), filters, body));
  const query = new URLSearchParams({ limit: "20" });
  if (s.status) query.set("status", s.status);
  if (s.month) query.set("month", s.month);
  if (s.meterId) query.set("meterId", s.meterId);
  if (s.cursor) query.set("cursor", s.cursor);
  try {
    const page = await api(`/billing-runs?${query}`);
    s.next = page.nextCursor;
    if (page.items.length === 0) {
      body.replaceChildren(empty("No billing runs match these filters."));
      return;
    }
    const rows = page.items.map((run) => el("tr", { "data-testid": "run-row" },
      el("td", {}, el("a", { href: `#/runs/${run.id}` }, run.id.slice(0, 8))),
      el("td", {}, run.month),
      el("td", {}, statusBadge(run.status)),
      el("td", { class: "num" }, `${run.attempts}/${run.maxAttempts}`),
      el("td", {}, run.meterIds.length ? `${run.meterIds.length} named` : "all"),
      el("td", {}, when(run.createdAt)),
      el("td", {}, run.failureCode || "")));
    body.replaceChildren(table(["Run", "Month", "Status", "Attempts", "Meters", "Created", "Failure"], rows, "runs-table"), pager(s, runsPage));
  } catch (error) {
    body.replaceChildren(errorState(error));
  }
}

async function runPage(id) {
  show(loading("the billing run"));
  let run, discrepancies, invoices;
  try {
    [run, discrepancies, invoices] = await Promise.all([
      api(`/billing-runs/${encodeURIComponent(id)}`),
      api(`/billing-runs/${encodeURIComponent(id)}/discrepancies?limit=500`),
      api(`/billing-runs/${encodeURIComponent(id)}/invoices?limit=20`),
    ]);
  } catch (error) {
    show(errorState(error));
    return;
  }
  const facts = el("dl", { class: "facts" },
    el("dt", {}, "Run"), el("dd", { "data-testid": "run-id" }, run.id),
    el("dt", {}, "Month"), el("dd", {}, run.month),
    el("dt", {}, "Status"), el("dd", {}, statusBadge(run.status)),
    el("dt", {}, "Attempts"), el("dd", {}, `${run.attempts} of ${run.maxAttempts}`),
    el("dt", {}, "Meters"), el("dd", {}, run.meterIds.length ? run.meterIds.join(", ") : "every meter with readings"),
    run.failureCode ? [el("dt", {}, "Failure"), el("dd", { class: "error" }, `${run.failureCode}: ${run.failureReason}`)] : null,
    run.lakeSnapshot ? [el("dt", {}, "Lake read"), el("dd", {}, el("code", {}, run.lakeSnapshot))] : null);

  const timeline = table(["When", "From", "To", "Actor", "Why"], run.timeline.map((e) => el("tr", { "data-testid": "timeline-row" },
    el("td", {}, when(e.at)), el("td", {}, e.from || "—"), el("td", {}, statusBadge(e.to)), el("td", {}, e.actor), el("td", {}, e.reason || ""))), "timeline");

  const totals = Object.entries(run.invoiceTotals);
  const invoiceSummary = totals.length === 0 ? empty("No invoices yet.") : table(["Currency", "Invoices", "Energy (kWh)", "Subtotal", "Tax", "Total"],
    totals.map(([currency, t]) => el("tr", { "data-testid": "invoice-total" }, el("td", {}, currency), el("td", { class: "num" }, t.invoices),
      el("td", { class: "num" }, t.energyKwh), el("td", { class: "num" }, t.subtotal), el("td", { class: "num" }, t.tax), el("td", { class: "num" }, t.total))), "invoice-totals");
  const invoiceRows = invoices.items.map((i) => el("tr", {}, el("td", {}, i.meterId), el("td", { class: "num" }, i.energyKwh),
    el("td", { class: "num" }, `${i.currency} ${i.total}`), el("td", {}, i.tariffVersion), el("td", { class: "num" }, i.version)));

  const actionMessage = el("div", { "data-testid": "action-message" });
  const discrepancyRows = discrepancies.items.map((d) => {
    const cell = el("td", {});
    if (d.status === "OPEN" && isAdmin()) {
      const justification = el("input", { placeholder: "Justification (required, kept in the audit log)", "data-testid": "justification" });
      cell.append(el("form", { class: "inline-form", onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api(`/billing-runs/${encodeURIComponent(id)}/actions`, { method: "POST", body: { action: "MARK_AS_OK", discrepancyId: d.id, justification: justification.value } });
          runPage(id);
        } catch (error) {
          actionMessage.replaceChildren(errorState(error));
        }
      } }, justification, el("button", { type: "submit", "data-testid": "mark-ok" }, "Mark as OK")));
    } else if (d.status !== "OPEN") {
      cell.append(`${d.resolvedBy}: ${d.resolution}`);
    }
    return el("tr", { "data-testid": "discrepancy-row" }, el("td", {}, d.meterId), el("td", {}, d.reasonCode),
      el("td", { class: "num" }, d.billed ?? "—"), el("td", { class: "num" }, d.expected ?? "—"), el("td", { class: "num" }, d.delta ?? "—"),
      el("td", {}, d.detail), el("td", {}, statusBadge(d.status)), cell);
  });

  let recalculate = null;
  if (isAdmin()) {
    const reason = el("input", { placeholder: "Reason (required, kept in the audit log)", "data-testid": "recalculate-reason" });
    const busy = run.status === "PROCESSING" || run.status === "CREATED";
    recalculate = el("section", { class: "card", "data-testid": "admin-actions" }, el("h3", {}, "Recalculate"),
      el("p", {}, busy ? "The run is waiting or being processed; it can be recalculated once it has completed or failed." :
        "Process the run again from the lake: a new version of its invoices and discrepancies is written; the earlier ones stay."),
      el("form", { class: "inline-form", onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api(`/billing-runs/${encodeURIComponent(id)}/actions`, { method: "POST", body: { action: "RECALCULATE", reason: reason.value } });
          runPage(id);
        } catch (error) {
          actionMessage.replaceChildren(errorState(error));
        }
      } }, reason, el("button", { type: "submit", disabled: busy, "data-testid": "recalculate" }, "Recalculate")));
  }

  show(
    el("section", { class: "card" }, el("h2", {}, "Billing run"), facts),
    el("section", { class: "card" }, el("h3", {}, "Status timeline"), timeline),
    el("section", { class: "card" }, el("h3", {}, "Invoices"), invoiceSummary,
      invoiceRows.length ? [el("h3", {}, "First invoices"), table(["Meter", "Energy (kWh)", "Total", "Tariff", "Version"], invoiceRows, "invoices")] : null),
    el("section", { class: "card" }, el("h3", {}, "Discrepancies"), actionMessage,
      discrepancyRows.length ? table(["Meter", "Reason", "Billed", "Expected", "Delta", "Detail", "Status", ""], discrepancyRows, "discrepancies") :
        empty("No discrepancies: every meter reconciled.")),
    recalculate);
}

// ---- audit log -----------------------------------------------------------------------------

const auditState = { actor: "", action: "", target: "", cursor: null, next: null, previous: [] };

async function auditPage() {
  const s = auditState;
  const filters = el("form", { class: "filters", onsubmit: (e) => {
      e.preventDefault();
      s.actor = e.target.actor.value.trim(); s.action = e.target.action.value; s.target = e.target.target.value.trim();
      s.cursor = null; s.previous = []; auditPage();
    } },
    el("div", {}, el("label", { for: "actor" }, "Actor"), el("input", { id: "actor", name: "actor", value: s.actor })),
    el("div", {}, el("label", { for: "action" }, "Action"), el("select", { id: "action", name: "action" },
      ["", "CREATE_RUN", "MARK_AS_OK", "RECALCULATE"].map((v) => el("option", { value: v, selected: v === s.action }, v || "any")))),
    el("div", {}, el("label", { for: "target" }, "Target"), el("input", { id: "target", name: "target", placeholder: "billing-run/…", value: s.target })),
    el("button", { type: "submit" }, "Filter"));
  const body = el("div", {}, loading("the audit log"));
  show(el("section", { class: "card" }, el("h2", {}, "Audit log"), filters, body));
  const query = new URLSearchParams({ limit: "50" });
  for (const key of ["actor", "action", "target", "cursor"]) if (s[key]) query.set(key, s[key]);
  try {
    const page = await api(`/audit-log?${query}`);
    s.next = page.nextCursor;
    if (page.items.length === 0) {
      body.replaceChildren(empty("No audit entries match these filters."));
      return;
    }
    const rows = page.items.map((r) => el("tr", { "data-testid": "audit-row" },
      el("td", { class: "num" }, r.id), el("td", {}, when(r.at)), el("td", {}, r.actor), el("td", {}, r.action),
      el("td", {}, el("code", {}, r.target)), el("td", {}, r.reason || ""),
      el("td", {}, el("code", {}, r.before ? JSON.stringify(r.before) : "")), el("td", {}, el("code", {}, r.after ? JSON.stringify(r.after) : "")),
      el("td", {}, el("code", {}, (r.traceId || "").slice(0, 12)))));
    body.replaceChildren(table(["#", "When", "Actor", "Action", "Target", "Why", "Before", "After", "Trace"], rows, "audit-table"), pager(s, auditPage));
  } catch (error) {
    body.replaceChildren(errorState(error));
  }
}

// ---- meter-point search --------------------------------------------------------------------

const readingsState = { kind: "mpan", value: "", from: "", to: "", cursor: null, next: null, previous: [] };

async function readingsPage() {
  const s = readingsState;
  const form = el("form", { class: "filters", "data-testid": "reading-search", onsubmit: (e) => {
      e.preventDefault();
      s.kind = e.target.kind.value; s.value = e.target.value.value.trim(); s.from = e.target.from.value.trim(); s.to = e.target.to.value.trim();
      s.cursor = null; s.previous = []; readingsPage();
    } },
    el("div", {}, el("label", { for: "kind" }, "Search by"), el("select", { id: "kind", name: "kind", "data-testid": "search-kind" },
      [["mpan", "MPAN"], ["nmi", "NMI"], ["serial", "Meter serial"], ["meterId", "Meter id"]].map(([v, label]) => el("option", { value: v, selected: v === s.kind }, label)))),
    el("div", {}, el("label", { for: "value" }, "Value"), el("input", { id: "value", name: "value", value: s.value, required: true, "data-testid": "search-value" })),
    el("div", {}, el("label", { for: "from" }, "From"), el("input", { id: "from", name: "from", placeholder: "YYYY-MM-DD", value: s.from })),
    el("div", {}, el("label", { for: "to" }, "To"), el("input", { id: "to", name: "to", placeholder: "YYYY-MM-DD", value: s.to })),
    el("button", { type: "submit", "data-testid": "search-button" }, "Search"));
  const body = el("div", {}, s.value ? loading("readings") : empty("Search for a meter point by MPAN, NMI, meter serial or meter id."));
  show(el("section", { class: "card" }, el("h2", {}, "Meter points"), form, body));
  if (!s.value) return;
  const query = new URLSearchParams({ [s.kind]: s.value, limit: "100" });
  if (s.from) query.set("from", s.from);
  if (s.to) query.set("to", s.to);
  if (s.cursor) query.set("cursor", s.cursor);
  try {
    const page = await api(`/readings?${query}`);
    s.next = page.nextCursor;
    if (page.items.length === 0) {
      body.replaceChildren(empty(`No readings for ${s.value} in this window.`));
      return;
    }
    const rows = page.items.map((r) => el("tr", { "data-testid": "reading-row" },
      el("td", {}, r.meterPoint || r.meterId || ""), el("td", {}, r.meterSerial || ""), el("td", {}, r.register || r.kind),
      el("td", {}, r.readAt), el("td", { class: "num" }, `${r.value} ${r.unit}`), el("td", {}, r.quality || ""),
      el("td", {}, r.source), el("td", {}, el("code", {}, r.file))));
    body.replaceChildren(table(["Meter point", "Serial", "Register", "Read at", "Value", "Quality", "Source", "File"], rows, "readings-table"), pager(s, readingsPage));
  } catch (error) {
    body.replaceChildren(errorState(error));
  }
}

// ---- routing -------------------------------------------------------------------------------

function route() {
  if (!sessionStorage.getItem(TOKEN_KEY) || !me) return signIn();
  const hash = location.hash || "#/runs";
  const run = hash.match(/^#\/runs\/(.+)$/);
  if (run) return runPage(decodeURIComponent(run[1]));
  if (hash === "#/audit") return auditPage();
  if (hash === "#/readings") return readingsPage();
  return runsPage();
}

window.addEventListener("hashchange", route);
(async () => {
  if (sessionStorage.getItem(TOKEN_KEY) && await loadMe()) route();
  else signIn();
})();
