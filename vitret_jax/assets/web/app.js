// The search page and the evaluation browser of vitret_jax/serve.py: plain
// DOM calls, no framework and nothing fetched from outside the server.
"use strict";
const $ = (id) => document.getElementById(id);

function card(item, cls, caption) {
  const div = document.createElement("div");
  div.className = "card " + cls;
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = item.path || "";
  img.loading = "lazy";
  const cap = document.createElement("div");
  cap.innerHTML = caption;
  div.append(img, cap);
  return div;
}

function shortPath(p) {
  const parts = (p || "").split("/");
  return parts.slice(-2).join("/");
}

async function search(form) {
  $("error").textContent = "";
  form.append("k", $("k").value);
  const t0 = performance.now();
  const r = await fetch("/search", { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) {
    $("error").textContent = body.error || r.statusText;
    return;
  }
  $("status").textContent = `${body.results.length} results in ${(performance.now() - t0).toFixed(0)} ms`;
  const results = $("results");
  results.replaceChildren();
  for (const h of body.results) {
    const c = card(h, "", `<span class="score">#${h.rank} ${h.score.toFixed(3)}</span><br><span class="path">${shortPath(h.path)}</span>`);
    c.dataset.id = h.id;
    c.title = h.path;
    c.addEventListener("click", () => searchId(h.id, h));
    results.append(c);
  }
}

function showQuery(item, caption) {
  const q = $("query");
  q.replaceChildren(card(item, "query", caption));
}

function searchFile(file) {
  showQuery({ url: URL.createObjectURL(file), path: file.name }, `query: ${file.name}`);
  const form = new FormData();
  form.append("image", file);
  return search(form);
}

function searchId(id, item) {
  showQuery(item, `query: ${shortPath(item.path)}`);
  const form = new FormData();
  form.append("id", id);
  return search(form);
}

$("file").addEventListener("change", (e) => {
  if (e.target.files.length) searchFile(e.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
});

// Evaluation browser.
let evalName = "";
async function loadEval() {
  const params = new URLSearchParams({ sort: $("sort").value, misses: $("misses").checked, name: evalName, limit: 60 });
  const r = await fetch("/evaluation?" + params);
  const body = await r.json();
  if (!r.ok) {
    $("eval-head").textContent = body.error;
    return;
  }
  evalName = body.name;
  const rows = Object.entries(body.metrics).map(([k, v]) => `<tr><th>${k}</th><td>${typeof v === "number" ? v.toFixed(4) : v}</td></tr>`).join("");
  $("eval-head").innerHTML = `<h2>${body.name} (step ${body.step})</h2><table class="metrics">${rows}</table><p>${body.count} queries shown (first 60)</p>`;
  const list = $("eval-list");
  list.replaceChildren();
  for (const q of body.queries) {
    const row = document.createElement("div");
    row.className = "row";
    const hit = q.first_hit === null ? "no correct match" : `first correct: #${q.first_hit}`;
    row.append(card(q, "query", `${shortPath(q.path)}<br>${hit}`));
    list.append(row);
    fetch(`/evaluation/${body.name}/${q.i}`).then((r) => r.json()).then((d) => {
      for (const n of d.neighbours.slice(0, 10)) {
        row.append(card(n, n.mark, `#${n.rank} ${n.score.toFixed(3)} ${n.mark}`));
      }
    });
  }
}
$("sort").addEventListener("change", loadEval);
$("misses").addEventListener("change", loadEval);

function show(which) {
  $("search").hidden = which !== "search";
  $("eval").hidden = which !== "eval";
  if (which === "eval") loadEval();
}
$("tab-search").addEventListener("click", (e) => { e.preventDefault(); show("search"); });
$("tab-eval").addEventListener("click", (e) => { e.preventDefault(); show("eval"); });

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("status").textContent = `${h.images} images indexed` + (h.evaluations.length ? `; evaluations: ${h.evaluations.join(", ")}` : "");
  if (!h.images && h.evaluations.length) show("eval");
  if (!h.evaluations.length) $("tab-eval").hidden = true;
  if (!h.images) $("tab-search").hidden = true;
});
