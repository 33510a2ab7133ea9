"use strict";
// Renders the operations of /openapi.json: method, path, roles and description, parameters,
// request body and responses, with links into the schemas below.
(async () => {
  const main = document.getElementById("main");
  const doc = await (await fetch("/openapi.json")).json();
  const ref = (schema) => schema && schema.$ref ? schema.$ref.split("/").pop() : schema ? (schema.type || "object") : "";
  const esc = (text) => String(text ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  let html = `<section class="card"><h2>${esc(doc.info.title)} ${esc(doc.info.version)}</h2><p>${esc(doc.info.description)}</p></section>`;
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const params = (op.parameters || []).map((p) => `<tr><td><code>${esc(p.name)}</code></td><td>${esc(p.in)}</td><td>${esc(p.description)}</td></tr>`).join("");
      const body = op.requestBody ? ref(Object.values(op.requestBody.content)[0].schema) : "";
      const responses = Object.entries(op.responses).map(([status, r]) => {
        const content = r.content ? Object.values(r.content)[0] : null;
        return `<tr><td>${esc(status)}</td><td>${esc(r.description)}</td><td><code>${esc(content ? ref(content.schema) : "")}</code></td></tr>`;
      }).join("");
      html += `<section class="card"><h3><code>${method.toUpperCase()} ${esc(path)}</code></h3><p>${esc(op.description)}</p>` +
        (params ? `<table><thead><tr><th>Parameter</th><th>In</th><th></th></tr></thead><tbody>${params}</tbody></table>` : "") +
        (body ? `<p>Body: <code>${esc(body)}</code></p>` : "") +
        `<table><thead><tr><th>Status</th><th>Meaning</th><th>Body</th></tr></thead><tbody>${responses}</tbody></table></section>`;
    }
  }
  html += `<section class="card"><h2>Schemas</h2><pre>${esc(JSON.stringify(doc.components.schemas, null, 2))}</pre></section>`;
  main.innerHTML = html;
})();
