// synapse-serve's page: the caller's instances, each with its weights picture, statistics and learning curves.
// Everything comes from this server's API with the token typed above (kept in this tab's session storage).
"use strict";

const TOKEN_KEY = "synapse-serve-token";
const REFRESH_MS = 2000;
const MAX_CARDS = 24; // the table lists every instance; pictures and plots for the most recently used
const CURVES = [["norm", "weight norm"], ["mean", "weight mean"], ["std", "weight std"],
                ["update_norm", "update norm"]];
const cards = new Map(); // "owner/name" -> {element, version, picture}
let generation = 0; // bumped when the token changes: answers for the old token are dropped

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, accept = "application/json") {
  const headers = {Accept: accept};
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(path, {headers, cache: "no-store", credentials: "omit"});
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not a problem document */ }
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return accept === "application/json" ? response.json() : response.blob();
}

function instancePath(d, suffix, query = "") {
  return `/v1/synapses/${encodeURIComponent(d.name)}${suffix}?owner=${encodeURIComponent(d.owner)}${query}`;
}

function element(tag, attributes = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function number(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3) ? value.toExponential(3)
    : value.toPrecision(4);
}

function learningSteps(d) { return (d.counters.evolve || 0) + (d.counters.step || 0); }

function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "–"; }

function setStatus(text, error = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

function clearAll() {
  for (const card of cards.values()) {
    if (card.picture) URL.revokeObjectURL(card.picture);
    card.element.remove();
  }
  cards.clear();
  document.querySelector("#instances tbody").replaceChildren();
  document.getElementById("instances").hidden = true;
}

function renderTable(list) {
  const body = document.querySelector("#instances tbody");
  body.replaceChildren(...list.map(d => {
    const row = element("tr", {"data-instance": `${d.owner}/${d.name}`});
    const running = d.running ? `${d.running.operation}${d.running.steps ? " ×" + d.running.steps : ""} since `
      + when(d.running.since) : "";
    const counters = Object.entries(d.counters).map(([op, n]) => `${op} ${n}`).join(" · ") || "–";
    for (const cell of [d.owner, d.name, d.kind, d.device, d.version, counters, when(d.last_used_at), running]) {
      row.append(element("td", {}, String(cell)));
    }
    return row;
  }));
  document.getElementById("instances").hidden = list.length === 0;
}

function makeCard(d) {
  const card = element("article", {class: "card", "data-instance": `${d.owner}/${d.name}`});
  card.append(element("h2", {}, d.name), element("div", {class: "meta"}),
              element("img", {class: "filters", alt: `weights of ${d.name}`}),
              element("table", {class: "stats"}), element("div", {class: "plots"}),
              element("p", {class: "error"}));
  document.getElementById("cards").append(card);
  return {element: card, version: null, picture: null};
}

function renderStats(table, stats) {
  const rows = [["weights", stats.weights], ["update (dWeights)", stats.update], ["biases", stats.biases]];
  const head = element("tr");
  for (const title of ["", "mean", "std", "min", "max", "norm", "sparsity"]) head.append(element("th", {}, title));
  table.replaceChildren(head, ...rows.filter(([, s]) => s && s.size).map(([title, s]) => {
    const row = element("tr", {"data-stat": title.split(" ")[0]});
    row.append(element("th", {}, title));
    for (const field of ["mean", "std", "min", "max", "norm", "sparsity"]) {
      row.append(element("td", {"data-field": field}, number(s[field])));
    }
    return row;
  }));
}

function plot(entries, field, title) {
  const width = 140, height = 60, pad = 4;
  const points = entries.map(e => [e.steps, e[field]]).filter(([, v]) => v !== null && Number.isFinite(v));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "history");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("data-field", field);
  svg.setAttribute("data-points", String(points.length));
  if (points.length) {
    const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = x => pad + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (width - 2 * pad);
    const sy = y => height - pad - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (height - 2 * pad);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
    svg.append(line);
    const [lastX, lastY] = points[points.length - 1];
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", sx(lastX).toFixed(1));
    dot.setAttribute("cy", sy(lastY).toFixed(1));
    dot.setAttribute("r", "2.5");
    svg.append(dot);
  }
  const figure = element("figure");
  const last = points.length ? number(points[points.length - 1][1]) : "no samples yet";
  figure.append(svg, element("figcaption", {}, `${title}: ${last}`));
  return figure;
}

async function updateCard(card, d, mine) {
  const [, meta, image, table, plots, error] = Array.from(card.element.children);
  meta.textContent = `${d.owner} · ${d.kind} · ${d.device} · version ${d.version} · ${learningSteps(d)} learning `
    + `steps · last used ${when(d.last_used_at)}`;
  if (card.version === d.version) return;
  try {
    const [picture, stats, history] = await Promise.all([
      api(instancePath(d, "/filters.png"), "image/png"), api(instancePath(d, "/stats")),
      api(instancePath(d, "/history"))]);
    if (mine !== generation) return; // the token changed meanwhile
    if (card.picture) URL.revokeObjectURL(card.picture);
    card.picture = URL.createObjectURL(picture);
    image.src = card.picture;
    image.setAttribute("data-version", String(d.version));
    renderStats(table, stats);
    plots.replaceChildren(...CURVES.map(([field, title]) => plot(history.entries, field, title)));
    error.textContent = "";
    card.version = d.version;
  } catch (e) {
    error.textContent = `Could not update: ${e.message}`;
  }
}

async function refresh() {
  const mine = generation;
  let list;
  try {
    list = (await api("/v1/synapses")).synapses;
  } catch (e) {
    if (mine !== generation) return;
    clearAll();
    setStatus(e.status === 401 ? "This server needs a token: enter yours above."
      : `Could not list instances (${e.message}).`, true);
    return;
  }
  if (mine !== generation) return;
  renderTable(list);
  const shown = [...list].sort((a, b) => b.last_used_at - a.last_used_at).slice(0, MAX_CARDS);
  const keys = new Set(shown.map(d => `${d.owner}/${d.name}`));
  for (const [key, card] of cards) {
    if (!keys.has(key)) {
      if (card.picture) URL.revokeObjectURL(card.picture);
      card.element.remove();
      cards.delete(key);
    }
  }
  await Promise.all(shown.map(d => {
    const key = `${d.owner}/${d.name}`;
    if (!cards.has(key)) cards.set(key, makeCard(d));
    return updateCard(cards.get(key), d, mine);
  }));
  setStatus(list.length ? `${list.length} instance${list.length === 1 ? "" : "s"}; updated ${new Date()
    .toLocaleTimeString()}` : "No instances yet: create one with the client.");
}

async function loop() {
  try { await refresh(); } finally { setTimeout(loop, REFRESH_MS); }
}

function useToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
  generation += 1;
  clearAll();
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-form").addEventListener("submit", event => {
    event.preventDefault();
    const input = document.getElementById("token");
    useToken(input.value.trim());
    input.value = "";
  });
  document.getElementById("forget-token").addEventListener("click", () => useToken(""));
  loop();
});
