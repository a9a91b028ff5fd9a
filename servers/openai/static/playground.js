// decodekit playground: a client of the server's public OpenAI-style API, nothing more.
// Every token is drawn with the provenance the API returns ("decodekit": {"provenance": true}).
"use strict";

const SOURCES = ["sampled", "draft_accepted", "bonus", "forced", "small", "large"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
// by attribute: an <svg> has no "hidden" property
const show = (...ids) => ids.forEach((id) => $(id).removeAttribute("hidden"));

const state = { model: null, controller: null, tokens: [], started: 0, lastRequest: null, lastResponse: null };
window.playground = state; // for tests and the curious: the last request body and what came back

// ---- API ---------------------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value;
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await apiError(response));
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = "model: " + state.model;
}

function constraintFields(body) {
  const kind = $("constraint_kind").value;
  const text = $("constraint_text").value;
  if (kind === "none") return false;
  if (kind === "json") {
    try { body.guided_json = JSON.parse(text); } catch (e) { throw new Error("the JSON schema is not valid JSON: " + e.message); }
  } else if (kind === "choice") {
    body.guided_choice = text.split("\n").filter((line) => line.length > 0);
  } else {
    body["guided_" + kind] = text;
  }
  return true;
}

function requestBody() {
  const strategy = $("strategy").value;
  const body = {
    model: state.model,
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    seed: Number($("seed").value),
    logprobs: true,
    top_logprobs: 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  const options = { provenance: true };
  if (strategy === "speculative") Object.assign(options, { strategy, draft: $("draft").value });
  if (strategy === "entropy") Object.assign(options, { strategy, threshold: Number($("threshold").value) });
  if (strategy === "tree") {
    Object.assign(options, { strategy, max_width: Number($("tree_width").value),
                             segment_len: Number($("segment_len").value) });
    body.stream = false; // a rollout returns whole
    delete body.stream_options;
  }
  if ((strategy === "plain" || strategy === "speculative") && constraintFields(body)) {
    options.sampler = $("sampler").value;
    const particles = Number($("particles").value);
    if (particles > 1) {
      options.num_particles = particles;
      body.stream = false; // particles answer once, at the end
      delete body.stream_options;
    }
  }
  body.decodekit = options;
  return body;
}

// ---- rendering ---------------------------------------------------------------------------------------
function choiceBox(index) {
  let box = document.querySelector(`#output .choice[data-index="${index}"]`);
  if (!box) {
    box = document.createElement("div");
    box.className = "choice";
    box.dataset.index = String(index);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `choice ${index}`;
    box.appendChild(meta);
    const boxes = [...document.querySelectorAll("#output .choice")];
    const after = boxes.find((b) => Number(b.dataset.index) > index);
    $("output").insertBefore(box, after || null);
  }
  return box;
}

function describe(token) {
  const parts = [`id ${token.id}`, `source ${token.source}`];
  if (token.logprob !== undefined) parts.push(`logprob ${token.logprob.toFixed(3)}`);
  for (const [k, v] of Object.entries(token)) {
    if (!["id", "token", "source", "logprob"].includes(k)) parts.push(`${k} ${v}`);
  }
  return parts.join(" · ");
}

function addTokens(index, tokens) {
  const box = choiceBox(index);
  for (const token of tokens) {
    const span = document.createElement("span");
    span.className = "tok src-" + token.source;
    span.dataset.id = String(token.id);
    span.dataset.source = token.source;
    if (token.logprob !== undefined) span.dataset.logprob = String(token.logprob);
    span.textContent = token.token;
    span.title = describe(token);
    span.addEventListener("mouseenter", () => { $("hover").textContent = JSON.stringify(token.token) + " · " + span.title; });
    box.appendChild(span);
    state.tokens.push(token);
  }
  updateReadout();
}

function finishChoice(index, reason) {
  choiceBox(index).querySelector(".meta").textContent = `choice ${index} · finish: ${reason}`;
}

function readoutItem(label, value) {
  const item = document.createElement("span");
  item.append(label + " ");
  const b = document.createElement("b");
  b.textContent = value;
  item.appendChild(b);
  return item;
}

function updateReadout(stats) {
  const tokens = state.tokens;
  const count = (source) => tokens.filter((t) => t.source === source).length;
  const items = [readoutItem("tokens", String(tokens.length))];
  const seconds = (performance.now() - state.started) / 1000;
  if (tokens.length && seconds > 0) items.push(readoutItem("tokens/s", (tokens.length / seconds).toFixed(1)));
  const drafted = count("draft_accepted");
  if (drafted || count("bonus")) {
    items.push(readoutItem("accepted drafts", `${drafted} (${(100 * drafted / tokens.length).toFixed(0)}% of output)`));
    if (stats && stats.acceptance_rate !== undefined) {
      items.push(readoutItem("acceptance", (100 * stats.acceptance_rate).toFixed(0) + "%"));
    }
  }
  const small = count("small"), large = count("large");
  if (small + large) items.push(readoutItem("large share", (large / (small + large)).toFixed(2)));
  const checked = tokens.filter((t) => t.checks !== undefined);
  if (checked.length) {
    const checks = checked.reduce((a, t) => a + t.checks, 0) / checked.length;
    items.push(readoutItem("checks/token", checks.toFixed(2)));
    items.push(readoutItem("forced", String(count("forced"))));
  }
  if (stats && stats.resampling_events !== undefined) items.push(readoutItem("resamplings", String(stats.resampling_events)));
  $("readout").replaceChildren(...items);
}

function legend() {
  $("legend").replaceChildren(...SOURCES.map((s) => {
    const span = document.createElement("span");
    span.className = "tok src-" + s;
    span.textContent = s;
    return span;
  }));
}

// ---- the rollout tree --------------------------------------------------------------------------------
const LEAF_COLOURS = { stop: "#2e9d57", answer: "#2e9d57", length: "#e08a00", repetition: "#8a63d2",
                       constraint_failed: "#b00020" };

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

function drawTree(rollout) {
  const svg = $("tree");
  svg.replaceChildren();
  const nodes = new Map(rollout.nodes.map((n) => [n.node_id, n]));
  const y = new Map();
  let leaves = 0;
  const place = (id) => { // leaves in depth-first order, a parent between its children
    const node = nodes.get(id);
    if (!node.children.length) { y.set(id, leaves++); return; }
    node.children.forEach(place);
    y.set(id, node.children.reduce((a, c) => a + y.get(c), 0) / node.children.length);
  };
  const root = rollout.nodes.find((n) => n.parent === null);
  place(root.node_id);
  const depth = Math.max(...rollout.nodes.map((n) => n.depth));
  const dx = 110, dy = 26, pad = 20;
  svg.setAttribute("width", pad * 2 + dx * Math.max(depth, 1) + 160);
  svg.setAttribute("height", pad * 2 + dy * Math.max(leaves - 1, 0));
  const at = (n) => [pad + dx * n.depth, pad + dy * y.get(n.node_id)];
  for (const n of rollout.nodes) {
    if (n.parent === null) continue;
    const [x1, y1] = at(nodes.get(n.parent));
    const [x2, y2] = at(n);
    svgEl("line", { x1, y1, x2, y2, stroke: "#99a" }, svg);
  }
  for (const n of rollout.nodes) {
    const [cx, cy] = at(n);
    const leaf = !n.children.length;
    const circle = svgEl("circle", { cx, cy, r: leaf ? 6 : 4, fill: leaf ? (LEAF_COLOURS[n.finish_reason] || "#555") : "#99a",
                                     class: leaf ? "leaf" : "branch", "data-node": n.node_id,
                                     "data-finish": n.finish_reason || "" }, svg);
    svgEl("title", {}, circle).textContent = `node ${n.node_id} · depth ${n.depth}` +
      (n.finish_reason ? ` · ${n.finish_reason}` : "") + "\n" + n.text;
    if (leaf) {
      const label = svgEl("text", { x: cx + 10, y: cy + 4, "font-size": 11 }, svg);
      label.textContent = `${n.finish_reason}: ${n.text.slice(-24)}`;
    }
  }
  show("tree", "tree_title");
}

// ---- SMC particles as weight lanes -------------------------------------------------------------------
function drawParticles(trace) {
  const svg = $("particles_view");
  svg.replaceChildren();
  const steps = trace.log_weights;
  if (!steps.length) return;
  const n = steps[0].length, dx = 14, dy = 22, pad = 16;
  svg.setAttribute("width", pad * 2 + dx * steps.length);
  svg.setAttribute("height", pad * 2 + dy * (n - 1));
  for (const event of trace.resamples) { // resampling: each slot's ancestor at the step before
    event.ancestors.forEach((a, i) => {
      svgEl("line", { x1: pad + dx * event.step, y1: pad + dy * a, x2: pad + dx * (event.step + 1), y2: pad + dy * i,
                      stroke: "#c9c9d6", class: "ancestry" }, svg);
    });
  }
  steps.forEach((logw, t) => {
    const live = logw.filter((w) => w !== null);
    const top = Math.max(...live);
    const total = live.reduce((a, w) => a + Math.exp(w - top), 0);
    logw.forEach((w, i) => {
      const weight = w === null ? 0 : Math.exp(w - top) / total;
      const dot = svgEl("circle", { cx: pad + dx * t, cy: pad + dy * i, r: w === null ? 1.5 : 1.5 + 6 * Math.sqrt(weight),
                                    fill: w === null ? "#b00020" : "#3a5fcd", class: "particle" }, svg);
      svgEl("title", {}, dot).textContent = `step ${t} · particle ${i} · weight ${weight.toFixed(3)}`;
    });
  });
  show("particles_view", "particles_title");
}

// ---- a run -------------------------------------------------------------------------------------------
function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

function showRaw() {
  $("raw").textContent = JSON.stringify({ request: state.lastRequest, response: state.lastResponse }, null, 1);
}

async function readStream(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

function onChunk(chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  for (const choice of chunk.choices || []) {
    if (choice.decodekit && choice.decodekit.tokens.length) addTokens(choice.index, choice.decodekit.tokens);
    if (choice.finish_reason) finishChoice(choice.index, choice.finish_reason);
  }
  if (chunk.decodekit) {
    state.lastResponse = chunk;
    updateReadout(chunk.decodekit);
  }
}

function onWhole(body) {
  state.lastResponse = body;
  for (const choice of body.choices) {
    addTokens(choice.index, choice.decodekit.tokens);
    finishChoice(choice.index, choice.finish_reason);
  }
  const stats = body.decodekit || {};
  updateReadout(stats);
  if (stats.rollout) drawTree(stats.rollout);
  if (stats.smc_trace) drawParticles(stats.smc_trace);
}

function reset() {
  state.tokens = [];
  $("output").replaceChildren();
  $("readout").replaceChildren();
  for (const id of ["tree", "tree_title", "particles_view", "particles_title"]) $(id).setAttribute("hidden", "");
}

async function run(event) {
  event.preventDefault();
  reset();
  state.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  setStatus("running", "running");
  try {
    if (!state.model) await loadModel();
    const body = requestBody();
    state.lastRequest = body;
    state.lastResponse = null;
    state.started = performance.now();
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                            body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) throw new Error(await apiError(response));
    if (body.stream) await readStream(response, onChunk);
    else onWhole(await response.json());
    setStatus(`done · ${state.tokens.length} tokens`, "done");
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : "error: " + e.message, e.name === "AbortError" ? "done" : "error");
  } finally {
    showRaw();
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

function showKnobs() {
  const strategy = $("strategy").value;
  for (const set of document.querySelectorAll("fieldset[data-for]")) {
    set.hidden = !set.dataset.for.split(" ").includes(strategy);
  }
}

function init() {
  $("api_key").value = sessionStorage.getItem("decodekit-key") || "";
  $("api_key").addEventListener("change", () => {
    sessionStorage.setItem("decodekit-key", $("api_key").value);
    state.model = null;
    loadModel().catch((e) => setStatus("error: " + e.message, "error"));
  });
  $("strategy").addEventListener("change", showKnobs);
  $("controls").addEventListener("submit", run);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  showKnobs();
  legend();
  loadModel().catch((e) => setStatus("error: " + e.message + " (set the API key?)", "error"));
}

init();
