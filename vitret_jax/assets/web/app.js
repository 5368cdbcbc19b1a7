// The search page and the evaluation browser of vitret_jax/serve.py: plain
// DOM calls, no framework and nothing fetched from outside the server.
// Every text that comes from data (file and class-folder names, evaluator
// and metric names) is set as text: DOM nodes and textContent, never parsed
// as HTML. The server's Content-Security-Policy forbids inline script.
"use strict";
const $ = (id) => document.getElementById(id);
// The most results the index can answer, and its size (from /healthz).
let maxK = null;
let images = null;

// An element of class `cls` holding `children` (strings become text nodes).
function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  node.append(...children);
  return node;
}

function card(item, cls, ...caption) {
  const div = el("div", "card " + cls);
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = item.path || "";
  img.loading = "lazy";
  div.append(img, el("div", "", ...caption));
  return div;
}

function shortPath(p) {
  return (p || "").split("/").slice(-2).join("/");
}

// An error replaces what was shown: no stale results under a new message.
function showError(message) {
  $("results").replaceChildren();
  $("error").textContent = message;
}

async function fetchJson(url, options) {
  const r = await fetch(url, options);
  let body = {};
  try {
    body = await r.json();
  } catch (e) {
    body = { error: `${r.status} ${r.statusText}` };
  }
  return [r, body];
}

async function search(form, k) {
  $("error").textContent = "";
  form.append("k", String(k));
  // Optional re-ranking spec (aqe, superglobal); the server checks it.
  const rerank = $("rerank").value.trim();
  if (rerank) form.append("rerank", rerank);
  const t0 = performance.now();
  let r, body;
  try {
    [r, body] = await fetchJson("/search", { method: "POST", body: form });
  } catch (e) {
    showError(`The server did not answer (${e.message}).`);
    return;
  }
  if (r.status === 409) {
    // The index was reloaded: its ids changed, so nothing shown is valid.
    $("query").replaceChildren();
    showError(body.error || "The index was reloaded; search again.");
    loadHealth();
    return;
  }
  if (!r.ok) {
    showError(body.error || `${r.status} ${r.statusText}`);
    return;
  }
  $("status").textContent = `${body.results.length} results in ${(performance.now() - t0).toFixed(0)} ms`;
  const results = $("results");
  results.replaceChildren();
  for (const h of body.results) {
    const c = card(h, "", el("span", "score", `#${h.rank} ${h.score.toFixed(3)}`),
                   document.createElement("br"), el("span", "path", shortPath(h.path)));
    // The id with the generation of the index that listed it: after a
    // reload, the server refuses it (409) rather than answer another image.
    c.dataset.id = `${h.generation}:${h.id}`;
    c.title = h.path;
    c.addEventListener("click", () => searchId(c.dataset.id, h));
    results.append(c);
  }
}

// k as typed, within what the index can answer (an indexed image is not
// its own result: one fewer for a search by id).
function askK(byId) {
  const k = parseInt($("k").value, 10) || 10;
  if (maxK === null) return k;  // the server says what is allowed
  return Math.max(1, Math.min(k, byId ? Math.min(maxK, images - 1) : maxK));
}

function showQuery(item, caption) {
  $("query").replaceChildren(card(item, "query", caption));
}

function searchFile(file) {
  showQuery({ url: URL.createObjectURL(file), path: file.name }, `query: ${file.name}`);
  const form = new FormData();
  form.append("image", file);
  return search(form, askK(false));
}

function searchId(id, item) {
  showQuery(item, `query: ${shortPath(item.path)}`);
  const form = new FormData();
  form.append("id", id);
  return search(form, askK(true));
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
  const list = $("eval-list");
  list.replaceChildren();
  const [r, body] = await fetchJson("/evaluation?" + params);
  if (!r.ok) {
    $("eval-head").replaceChildren(el("p", "error", body.error || r.statusText));
    return;
  }
  evalName = body.name;
  const table = el("table", "metrics");
  for (const [k, v] of Object.entries(body.metrics)) {
    table.append(el("tr", "", el("th", "", k), el("td", "", typeof v === "number" ? v.toFixed(4) : String(v))));
  }
  const notes = [];
  if (body.seen_classes) {
    notes.push(el("p", "note", "Seen classes: the test classes of this evaluation are also training classes; its figures are not comparable with class-disjoint ones."));
  }
  if (body.lone) {
    notes.push(el("p", "note", `${body.lone} queries have no other image of their class: the metrics leave them out.`));
  }
  $("eval-head").replaceChildren(
    el("h2", "", `${body.name} (step ${body.step})`), ...notes, table,
    el("p", "", `${body.count} queries (${Math.min(60, body.queries.length)} shown)`));
  for (const q of body.queries) {
    const row = el("div", "row");
    const hit = q.lone ? "no other image of its class (left out of the metrics)"
      : q.first_hit === null ? "no correct match" : `first correct: #${q.first_hit}`;
    row.append(card(q, "query", shortPath(q.path), document.createElement("br"), hit));
    list.append(row);
    fetchJson(`/evaluation/${encodeURIComponent(body.name)}/${q.i}`).then(([r2, d]) => {
      if (!r2.ok) {
        row.append(el("p", "error", d.error || r2.statusText));
        return;
      }
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

function loadHealth() {
  return fetchJson("/healthz").then(([r, h]) => {
    if (!r.ok || h.images === undefined) {
      showError(h.error || "This server needs a token: sign in at /login.");
      return;
    }
    const first = maxK === null;  // later: after a reload, keep k as typed
    images = h.images;
    maxK = Math.max(1, h.max_k);
    $("k").max = String(maxK);
    if (first) $("k").value = String(Math.min(10, maxK));
    $("status").textContent = `${h.images} images indexed` + (h.evaluations.length ? `; evaluations: ${h.evaluations.join(", ")}` : "");
    if (!h.images && h.evaluations.length) show("eval");
    if (!h.evaluations.length) $("tab-eval").hidden = true;
    if (!h.images) $("tab-search").hidden = true;
  });
}
loadHealth();
