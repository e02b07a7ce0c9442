// pellucid inspector: plain JavaScript, no build step. It talks only to the server that
// served it: /v1/models, /tokenize, /v1/chat/completions, /v1/completions, /v1/inspect/...
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";

const S = {
  model: "", maxLen: 0,
  promptIds: [], promptPieces: [],   // the rendered prompt as the engine sees it
  genIds: [], genPieces: [], genLogprobs: [],
  history: [],                        // earlier chat turns
  systemMessages: [],                 // the system prompt with its style, as the server composes it
  bias: {},                           // token id -> {value, label}
  pos: null,                          // the position whose prediction is inspected (null: the end)
  tab: "next",
  shown: {},                          // panel -> the key of what it shows
  aborts: {},                         // panel -> AbortController
  generating: null,
};
// What the browser tests read: when each panel finished updating, and how long it took.
window.inspector = { timings: [], updates: {}, errors: [] };

// -- helpers --------------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body, signal) {
  const r = await fetch(path, body === undefined ? { headers: headers(), signal }
    : { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = data.error || {};
    throw new Error(`${r.status}: ${e.message || r.statusText}` + (e.param ? ` (${e.param})` : ""));
  }
  return data;
}

function label(piece) {
  // the same readable form as pellucid's tables: spaces as '·', newlines as '\n'
  let p = piece.replace(/\n/g, "\\n").replace(/\t/g, "\\t");
  if (p.trim() === "" || p.startsWith(" ")) p = p.replace(/ /g, "·");
  return p;
}

function el(tag, attrs = {}, ...kids) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

const pct = (p) => (p >= 0.9995 ? "100%" : p >= 0.001 ? (100 * p).toFixed(1) + "%" : p > 0 ? p.toExponential(0) : "0");
const fmtBytes = (n) => n >= 1e9 ? (n / 1e9).toFixed(2) + " GB" : n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : n >= 1e3 ? (n / 1e3).toFixed(1) + " kB" : n + " B";
const fmtInt = (n) => n.toLocaleString("en-US");

function showError(msg) {
  const box = $("error");
  box.hidden = !msg;
  box.textContent = msg || "";
  if (msg) window.inspector.errors.push(msg);
}

// -- controls -------------------------------------------------------------------------------------
// the sampler's numeric controls: the server renders one slider each (data-knob, data-off)
const KNOBS = [...document.querySelectorAll("input[data-knob]")].map((e) => e.id);
const SLIDERS = KNOBS.concat(["max_tokens"]);

function showSliders() {
  for (const o of document.querySelectorAll("output[data-for]")) {
    const e = $(o.dataset.for);
    o.textContent = e.dataset.off !== undefined && Number(e.value) === Number(e.dataset.off) ? "off" : e.value;
  }
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function sampling() {
  const p = {};
  for (const k of KNOBS) p[k] = Number($(k).value);
  const seed = $("seed").value.trim();
  if (seed !== "") p.seed = Number(seed);
  const bias = {};
  for (const [id, b] of Object.entries(S.bias)) bias[id] = b.value;
  if (Object.keys(bias).length) p.logit_bias = bias;
  return p;
}

function messages() {
  return S.systemMessages.concat(S.history, [{ role: "user", content: $("prompt").value }]);
}

function styleFields() {
  const style = {};
  for (const e of document.querySelectorAll("#style-box [data-dim]")) {
    if (e.value !== "") style[e.dataset.dim] = e.dataset.dim === "max_words" ? Number(e.value) : e.value;
  }
  return style;
}

async function composeSystem() {
  // the system text plus the style's instructions, composed by the server as `pellucid chat` does
  const r = await api("/v1/inspect/system", { system: $("system").value, style: styleFields() });
  S.systemMessages = r.messages;
}

function stops() { return $("stop").value.split("\n").filter((s) => s.length); }

function responseFormat() {
  const schema = $("json_schema").value.trim();
  if (schema) return { type: "json_schema", json_schema: { name: "schema", schema: JSON.parse(schema) } };
  return $("json_mode").checked ? { type: "json_object" } : undefined;
}

// -- the rendered prompt --------------------------------------------------------------------------
// The prompt as the engine will see it, from the current text and controls; false on an error.
async function tokenizePrompt() {
  try {
    await composeSystem();
    const body = mode() === "chat" ? { messages: messages(), add_generation_prompt: true } : { prompt: $("prompt").value };
    const r = await api("/tokenize", body);
    S.promptIds = r.tokens;
    S.promptPieces = r.pieces;
    S.maxLen = r.max_model_len;
    showError("");
    return true;
  } catch (e) {
    showError(e.message);
    return false;
  }
}

async function renderPrompt(t0) {
  if (!(await tokenizePrompt())) return;
  clearGeneration();
  drawTokens();
  refresh(t0);
}

function clearGeneration() {
  S.genIds = []; S.genPieces = []; S.genLogprobs = []; S.pos = null;
  $("output").textContent = "";
  $("gen-info").textContent = "";
}

function seq() { return S.promptIds.concat(S.genIds); }
function position() { return S.pos == null ? seq().length : S.pos; }

function drawTokens() {
  const special = new Set();
  const rendered = $("rendered");
  rendered.textContent = "";
  S.promptPieces.forEach((p, i) => {
    const isSpecial = /^<\|.*\|>$|^<\/?s>$/.test(p);
    rendered.append(tokenSpan(p, i, isSpecial ? "special" : ""));
    if (isSpecial) special.add(i);
  });
  $("prompt-count").textContent = `${S.promptIds.length} tokens of ${fmtInt(S.maxLen)}`;
  const out = $("output");
  out.textContent = "";
  S.genPieces.forEach((p, i) => {
    const span = tokenSpan(p, S.promptIds.length + i, "gen");
    const lp = S.genLogprobs[i];
    if (lp != null) span.title = `p = ${pct(Math.exp(lp))}, logprob ${lp.toFixed(3)}`;
    out.append(span);
  });
  markSelected();
}

function tokenSpan(piece, index, cls) {
  const span = el("span", { class: "tok " + cls + (piece.endsWith("\n") ? " nl" : ""), "data-index": index, text: label(piece) });
  span.title = `#${index}`;
  span.addEventListener("click", () => { S.pos = index; markSelected(); refresh(performance.now()); });
  return span;
}

function markSelected() {
  const p = position();
  for (const s of document.querySelectorAll(".tok")) s.classList.toggle("sel", Number(s.dataset.index) === p);
  const n = seq().length;
  const at = p < n ? `the token at #${p} (${label((S.promptPieces.concat(S.genPieces))[p])})` : "the next token";
  $("position-info").textContent = `Position ${p}: the model's prediction of ${at}, from the ${p} tokens before it.`;
}

// -- generation (the real API, streaming) ---------------------------------------------------------
async function generate() {
  if (S.generating) return;
  clearGeneration();
  if (!(await tokenizePrompt())) return;  // the text may have changed since the last render
  const chat = mode() === "chat";
  let rf;
  try { rf = responseFormat(); } catch (e) { showError("JSON schema: " + e.message); return; }
  const body = Object.assign({ model: S.model, stream: true, max_tokens: Number($("max_tokens").value) }, sampling());
  const st = stops();
  if (st.length) body.stop = st;
  if (chat) {
    Object.assign(body, { messages: messages(), logprobs: true, top_logprobs: 5, stream_options: { include_usage: true } });
    if (rf) body.response_format = rf;
  } else {
    Object.assign(body, { prompt: $("prompt").value, logprobs: 5, stream_options: { include_usage: true } });
  }
  drawTokens();
  const ctrl = new AbortController();
  S.generating = ctrl;
  $("generate").disabled = true; $("stop-gen").disabled = false;
  const t0 = performance.now();
  let first = null, usage = null, finish = null;
  const pieces = [], bytes = [];
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: ctrl.signal });
    if (!r.ok) {
      const e = (await r.json().catch(() => ({}))).error || {};
      throw new Error(`${r.status}: ${e.message || r.statusText}` + (e.param ? ` (${e.param})` : ""));
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const c = (chunk.choices || [])[0];
        if (!c) continue;
        if (c.finish_reason) finish = c.finish_reason;
        const lp = c.logprobs;
        if (chat && lp && lp.content) {
          for (const t of lp.content) { pieces.push(t.token); bytes.push(t.bytes); S.genLogprobs.push(t.logprob); }
        } else if (!chat && lp && lp.tokens) {
          lp.tokens.forEach((t, i) => { pieces.push(t); S.genLogprobs.push(lp.token_logprobs[i]); });
        }
        if (first == null && pieces.length) first = performance.now() - t0;
        S.genPieces = pieces.slice();
        drawTokens();
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    S.generating = null;
    $("generate").disabled = false; $("stop-gen").disabled = true;
  }
  const secs = (performance.now() - t0) / 1000;
  let info = `${pieces.length} tokens in ${secs.toFixed(2)} s` + (first != null ? `, first after ${(first / 1000).toFixed(2)} s` : "") + (finish ? `, finish: ${finish}` : "");
  if (usage && usage.prompt_tokens !== S.promptIds.length) {
    info += ` (the server's prompt had ${usage.prompt_tokens} tokens: it adds instructions for JSON output)`;
  }
  if (pieces.length) {  // the generated tokens' ids, before the output says it is done (its tokens are clickable)
    try {
      const r = await api("/v1/inspect/token-ids", chat ? { bytes } : { pieces });
      S.genIds = r.tokens;
    } catch (e) { showError("token ids: " + e.message); S.genIds = []; S.genPieces = []; }
  }
  $("gen-info").textContent = info;
  drawTokens();
  refresh(performance.now());
}

// -- panels ---------------------------------------------------------------------------------------
function refresh(t0) {
  markSelected();
  const run = PANELS[S.tab];
  if (run) run(t0 == null ? performance.now() : t0);
}

async function update(panel, key, t0, work) {
  if (S.shown[panel] === key) {  // shown already: a request still under way for something else is not wanted now
    if (S.aborts[panel]) {
      S.aborts[panel].abort();
      S.aborts[panel] = null;
      $("panel-" + panel).dataset.state = "ready";
    }
    return;
  }
  if (S.aborts[panel]) S.aborts[panel].abort();
  const ctrl = new AbortController();
  S.aborts[panel] = ctrl;
  const box = $("panel-" + panel);
  box.dataset.state = "loading";
  try {
    await work(ctrl.signal);
    S.shown[panel] = key;
    box.dataset.state = "ready";
    const ms = performance.now() - t0;
    window.inspector.timings.push({ panel, ms: Math.round(ms) });
    window.inspector.updates[panel] = (window.inspector.updates[panel] || 0) + 1;
  } catch (e) {
    if (e.name === "AbortError") return;
    box.dataset.state = "error";
    box.querySelector(".panel-error")?.remove();
    box.prepend(el("div", { class: "error panel-error", text: e.message }));
    window.inspector.errors.push(e.message);
  }
}

function clearPanelError(panel) { $("panel-" + panel).querySelector(".panel-error")?.remove(); }

// POST `body` to `path` for `panel` (unless it shows that already, for the same `also`) and draw the answer
function ask(panel, path, body, t0, draw, also = null) {
  if (body.tokens && !body.tokens.length) return;
  update(panel, JSON.stringify([body, also]), t0, async (signal) => {
    const r = await api(path, body, signal);
    clearPanelError(panel);
    draw(r);
  });
}

function contextBody() {
  return { tokens: seq().slice(0, position()) };
}

// Next token: the sampler's stages as bars
function nextToken(t0) {
  const p = position();
  const n = S.promptIds.length;
  const body = Object.assign(p > n ? { tokens: S.promptIds, generated: S.genIds.slice(0, p - n) } : { tokens: seq().slice(0, p) },
    sampling(), { top: 10 });
  const actual = p < seq().length ? seq()[p] : null;  // the token there, marked: part of what is shown
  ask("next", "/v1/inspect/next-token", body, t0, (r) => {
    drawStages(r, actual);
    $("panel-next").dataset.position = p; // which position the bars are for (the tests wait on it)
  }, actual);
}

function drawStages(r, actual) {
  const box = $("stages");
  box.textContent = "";
  $("next-note").hidden = !r.note;
  $("next-note").textContent = r.note || "";
  const W = 200, rowH = 16, labelW = 78;
  r.stages.forEach((st, si) => {
    const svg = el("svg:svg", { class: "bars", viewBox: `0 0 ${W} ${st.candidates.length * rowH + 2}`, width: W, height: st.candidates.length * rowH + 2 });
    st.candidates.forEach((c, i) => {
      const y = i * rowH;
      const g = el("svg:g", { class: "cand" + (c.kept ? "" : " removed") + (c.id === actual ? " actual" : ""),
        "data-token-id": c.id, "data-prob": c.prob, "data-kept": c.kept ? 1 : 0 });
      const lp = c.prob > 0 ? Math.log(c.prob).toFixed(3) : "-inf";
      g.append(el("svg:title", { text: `${label(c.text)} (id ${c.id}): p = ${pct(c.prob)}, logprob ${lp}, logit ${c.logit == null ? "-inf" : c.logit.toFixed(3)}` }));
      g.append(el("svg:text", { x: 0, y: y + 12, text: label(c.text).slice(0, 10) + (c.id === actual ? " ◀" : "") }));
      const bw = c.kept ? Math.max(c.prob * (W - labelW - 40), c.prob > 0 ? 1 : 0) : 0;
      if (bw > 0) g.append(el("svg:rect", { class: "bar", x: labelW, y: y + 3, width: bw, height: rowH - 5, fill: c.id === actual ? "#1f9d55" : "#2f6fde" }));
      g.append(el("svg:text", { x: labelW + bw + 3, y: y + 12, text: c.kept ? pct(c.prob) : "removed" }));
      svg.append(g);
    });
    const ban = si === 0 ? el("div", { class: "dim small", text: "click a raw candidate to ban it (logit bias -100)" }) : null;
    const stage = el("div", { class: "stage", "data-stage": st.name },
      el("h4", { text: `${si + 1}. ${st.title}` }), el("div", { class: "setting", text: `${st.setting}; ${fmtInt(st.kept)} tokens kept` }), svg, ban);
    if (si === 0) {
      for (const g of svg.querySelectorAll(".cand")) {
        g.style.cursor = "pointer";
        g.addEventListener("click", () => addBias(Number(g.dataset.tokenId), -100, r.stages[0].candidates.find((c) => c.id === Number(g.dataset.tokenId)).text));
      }
    }
    box.append(stage);
  });
}

// Attention: thumbnails and one large heatmap
function attention(t0) {
  ask("attention", "/v1/inspect/attention", Object.assign(contextBody(), layerHead()), t0, drawAttention);
}

function layerHead() {
  const l = $("att-layer").value, h = $("att-head").value;
  return { layer: l === "" ? null : Number(l), head: h === "" ? null : Number(h) };
}

function fillSelect(sel, n, what) {
  if (sel.options.length === n + 1) return;
  for (let i = 0; i < n; i++) sel.append(el("option", { value: i, text: `${what} ${i}` }));
}

function drawAttention(r) {
  fillSelect($("att-layer"), r.n_layers, "layer");
  fillSelect($("att-head"), r.n_heads, "head");
  $("att-info").textContent = `${r.tokens.length} tokens; the first token takes ${(100 * r.first_token_share).toFixed(0)}% of the weight on average (the attention sink)`;
  const grid = $("att-grid");
  grid.textContent = "";
  grid.style.gridTemplateColumns = `26px repeat(${r.n_heads}, 26px)`;
  const S2 = r.grid.size, raw = atob(r.grid.data);
  grid.append(el("div"));
  for (let h = 0; h < r.n_heads; h++) grid.append(el("div", { class: "lab", text: "h" + h }));
  for (let l = 0; l < r.n_layers; l++) {
    grid.append(el("div", { class: "lab", text: "L" + l }));
    for (let h = 0; h < r.n_heads; h++) {
      const c = el("canvas", { width: S2, height: S2, "data-layer": l, "data-head": h, title: `layer ${l}, head ${h}` });
      c.style.width = c.style.height = "24px";
      const ctx = c.getContext("2d"), img = ctx.createImageData(S2, S2);
      const off = (l * r.n_heads + h) * S2 * S2;
      for (let i = 0; i < S2 * S2; i++) {
        const v = raw.charCodeAt(off + i);
        img.data[4 * i] = 255 - v * 0.82; img.data[4 * i + 1] = 255 - v * 0.56; img.data[4 * i + 2] = 255 - v * 0.13; img.data[4 * i + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      if (r.layer === l && r.head === h) c.classList.add("sel");
      c.addEventListener("click", () => { $("att-layer").value = l; $("att-head").value = h; attention(performance.now()); });
      grid.append(c);
    }
  }
  drawHeatmap($("att-heat"), r.pattern, r.str_tokens, r);
}

function drawHeatmap(canvas, m, toks, r) {
  const T = m.length, margin = 86;
  const cell = Math.max(2, Math.min(28, Math.floor(540 / T)));
  canvas.width = canvas.height = margin + cell * T + 4;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < T; q++) for (let k = 0; k <= q; k++) {
    const v = Math.sqrt(Math.max(0, m[q][k]));
    ctx.fillStyle = `rgb(${255 - 208 * v},${255 - 144 * v},${255 - 33 * v})`;
    ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
  }
  if (cell >= 7) {
    ctx.font = `${Math.min(11, cell - 1)}px monospace`;
    ctx.fillStyle = "#1d2330";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (let i = 0; i < T; i++) ctx.fillText(toks[i].slice(0, 11), margin - 3, margin + i * cell + cell / 2);
    ctx.save();
    for (let i = 0; i < T; i++) {
      ctx.setTransform(1, 0, 0, 1, margin + i * cell + cell / 2, margin - 3);
      ctx.rotate(-Math.PI / 2); ctx.textAlign = "left";
      ctx.fillText(toks[i].slice(0, 11), 0, 0);
    }
    ctx.restore();
  }
  const what = (r.layer == null ? "average over layers" : `layer ${r.layer}`) + ", " + (r.head == null ? "average over heads" : `head ${r.head}`);
  canvas.title = `${what}: query (row) attends to key (column); colour ~ sqrt(weight)`;
  canvas.onmousemove = (ev) => {
    const b = canvas.getBoundingClientRect();
    const x = (ev.clientX - b.left) * canvas.width / b.width, y = (ev.clientY - b.top) * canvas.height / b.height;
    const k = Math.floor((x - margin) / cell), q = Math.floor((y - margin) / cell);
    const tip = $("att-tip");
    if (q < 0 || k < 0 || q >= T || k > q) { tip.hidden = true; return; }
    tip.hidden = false;
    tip.textContent = `${toks[q]} → ${toks[k]}: ${m[q][k].toFixed(4)}`;
    tip.style.left = (ev.clientX - b.left + 12) + "px"; tip.style.top = (ev.clientY - b.top + 12) + "px";
    tip.dataset.weight = m[q][k];
  };
  canvas.onmouseleave = () => { $("att-tip").hidden = true; };
}

// Logit lens
function lens(t0) {
  const body = Object.assign(contextBody(), { last: 24, k: 3 });
  const target = $("lens-target").value;
  if (target) body.target = target;
  ask("lens", "/v1/inspect/lens", body, t0, drawLens);
}

function drawLens(r) {
  const t = r.target;
  $("lens-info").textContent = `target ${label(t.token)} (${t.from === "model" ? "the model's own top-1" : "given"})` +
    (t.top1_from ? `: the top prediction from layer ${t.top1_from} on` : ": never the top prediction");
  const tbl = el("table");
  const head = el("tr", {}, el("th", { text: "layer" }));
  const toks = r.labels_tokens;
  for (let i = r.start; i < toks.length; i++) head.append(el("th", { text: toks[i], title: `#${i}` }));
  tbl.append(head);
  for (let s = r.labels.length - 1; s >= 0; s--) {
    const row = el("tr", {}, el("th", { text: r.labels[s] }));
    r.top[s].forEach((cands) => {
      const c = cands[0];
      const td = el("td", { text: label(c.token), title: cands.map((x) => `${label(x.token)} ${pct(x.prob)}`).join(", ") });
      td.style.background = `rgba(47,111,222,${(0.08 + 0.8 * c.prob).toFixed(3)})`;
      if (c.prob > 0.55) td.style.color = "#fff";
      row.append(td);
    });
    tbl.append(row);
  }
  $("lens-grid").textContent = "";
  $("lens-grid").append(tbl);
  const last = r.resid_norm[0].length - 1;
  lineChart($("lens-target-chart"), r.labels, [{ name: `P(${label(t.token)})`, values: t.prob, color: "#2f6fde" }], 1);
  lineChart($("lens-norms-chart"), r.labels, [
    { name: "‖resid‖", values: r.resid_norm.map((row) => row[last]), color: "#1d2330" },
    { name: "‖attn out‖", values: [null].concat(r.attn_norm.map((row) => row[last])), color: "#e07b00" },
    { name: "‖mlp out‖", values: [null].concat(r.mlp_norm.map((row) => row[last])), color: "#1f9d55" },
  ]);
}

function lineChart(svg, xs, series, yMax) {
  svg.textContent = "";
  const W = Number(svg.getAttribute("width")), H = Number(svg.getAttribute("height")), L = 40, B = 24, T = 8, R = 8;
  const top = yMax || Math.max(...series.flatMap((s) => s.values.filter((v) => v != null))) * 1.05 || 1;
  const x = (i) => L + (W - L - R) * i / Math.max(1, xs.length - 1);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  svg.append(el("svg:line", { x1: L, y1: y(0), x2: W - R, y2: y(0), stroke: "#d8dce3" }));
  svg.append(el("svg:line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d8dce3" }));
  for (const v of [0, top / 2, top]) svg.append(el("svg:text", { x: L - 4, y: y(v) + 3, "text-anchor": "end", text: top <= 1 ? v.toFixed(1) : Math.round(v) }));
  xs.forEach((lab, i) => { if (i % 5 === 0 || i === xs.length - 1) svg.append(el("svg:text", { x: x(i), y: H - 8, "text-anchor": "middle", text: lab })); });
  series.forEach((s, si) => {
    const pts = s.values.map((v, i) => (v == null ? null : `${x(i)},${y(v)}`)).filter((p) => p);
    svg.append(el("svg:polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 1.5 }));
    s.values.forEach((v, i) => { if (v != null) svg.append(el("svg:circle", { cx: x(i), cy: y(v), r: 2, fill: s.color }, el("svg:title", { text: `${xs[i]}: ${v}` }))); });
    svg.append(el("svg:text", { x: L + 6 + 90 * si, y: T + 10, fill: s.color, style: `fill:${s.color}`, text: s.name }));
  });
}

// Budget
const COLORS = { "template overhead": "#9aa3b2", "system prompt": "#7c4dff", "retrieved context": "#00897b", "conversation history": "#e07b00", "current message": "#2f6fde", "reserved for response": "#1f9d55", free: "#e9ecf1" };

function budget(t0) {
  const body = { history: S.history, current: $("prompt").value, reserve: Number($("max_tokens").value) };
  if (S.systemMessages.length) body.system = S.systemMessages[0].content;
  ask("budget", "/v1/inspect/budget", body, t0, drawBudget);
}

function drawBudget(r) {
  const bar = $("budget-bar"), tbl = $("budget-table");
  bar.textContent = ""; tbl.textContent = "";
  const rows = r.sections.concat([{ name: "free", tokens: r.free }]);
  // the window is mostly free on short prompts: show each section at least a sliver
  for (const s of rows) {
    const d = el("div", { "data-section": s.name, title: `${s.name}: ${fmtInt(s.tokens)} tokens`, text: s.tokens ? `${s.name} ${s.tokens}` : "" });
    d.style.flex = `${Math.max(s.tokens / r.window, 0.06)} 0 0`;
    if (!s.tokens) d.hidden = true;
    d.style.background = COLORS[s.name] || "#888";
    if (s.name === "free") d.style.color = "#6b7280";
    bar.append(d);
  }
  tbl.append(el("tr", {}, el("th", { text: "section" }), el("th", { text: "tokens" }), el("th", { text: "% of window" }), el("th", { text: "kept" }), el("th", { text: "dropped" })));
  for (const s of rows) {
    tbl.append(el("tr", { "data-section": s.name }, el("td", { text: s.name }), el("td", { text: fmtInt(s.tokens) }),
      el("td", { text: (100 * s.tokens / r.window).toFixed(1) }), el("td", { text: s.kept ?? "" }), el("td", { text: s.dropped ?? "" })));
  }
  tbl.append(el("tr", {}, el("td", { text: "context window" }), el("td", { text: fmtInt(r.window) }), el("td", { text: "100.0" })));
}

// Model
function model(t0) {
  update("model", "model", t0, async (signal) => {
    const r = await api("/v1/inspect/model", undefined, signal);
    clearPanelError("model");
    const a = r.architecture;
    const arch = el("table", { class: "table" });
    const facts = [["model", r.served_as], ["file", `${r.path.split("/").pop()} (${fmtBytes(r.file_bytes)}, ${r.format})`],
      ["architecture", a.architecture], ["layers", a.n_layers], ["d_model", a.d_model],
      ["heads / KV heads", `${a.n_heads} / ${a.n_kv_heads}`], ["head dim", a.head_dim], ["d_ff", a.d_ff], ["vocabulary", fmtInt(a.vocab_size)],
      ["context (served)", `${fmtInt(a.context_length)} (${fmtInt(r.max_model_len)})`], ["positions", a.positions], ["norm", a.norm],
      ["activation", a.activation], ["tied embeddings", a.tied_embeddings ? "yes" : "no"], ["parameters", fmtInt(r.total.params)],
      ["served from memory", fmtBytes(r.served_bytes)]];
    for (const [k, v] of facts) arch.append(el("tr", {}, el("td", { text: k }), el("td", { text: String(v) })));
    $("model-arch").textContent = ""; $("model-arch").append(arch);
    hbars($("model-parts"), Object.entries(r.by_part).filter(([, v]) => v > 0), (v) => `${fmtInt(v)} (${(100 * v / r.total.params).toFixed(1)}%)`);
    const mem = Object.entries(r.memory_by_format).filter(([k]) => k !== "bf16").concat([["as stored in the file", r.total.stored_bytes], ["served now (all tensors)", r.served_bytes]]);
    hbars($("model-memory"), mem, fmtBytes);
    const tbl = $("model-weights");
    tbl.textContent = "";
    tbl.append(el("tr", {}, ...["group / weight", "shape", "type", "params", "stored", "in memory"].map((h) => el("th", { text: h === "in memory" ? `in memory (${r.memory_dtype})` : h }))));
    for (const g of r.groups) {
      tbl.append(el("tr", { class: "group" }, el("td", { text: g.label }), el("td"), el("td"), el("td", { text: fmtInt(g.params) }),
        el("td", { text: fmtBytes(g.stored_bytes) }), el("td", { text: fmtBytes(g.memory_bytes) })));
      for (const w of g.rows) {
        tbl.append(el("tr", {}, el("td", { text: "  " + w.component }), el("td", { text: w.shape.join("×") }), el("td", { text: w.tied_to ? "tied" : w.storage }),
          el("td", { text: fmtInt(w.params) }), el("td", { text: fmtBytes(w.stored_bytes) }), el("td", { text: fmtBytes(w.memory_bytes) })));
      }
    }
  });
}

function hbars(box, entries, fmt) {
  box.textContent = "";
  const max = Math.max(...entries.map(([, v]) => v));
  for (const [k, v] of entries) {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.max(1, 300 * v / max)}px`;
    box.append(el("div", { class: "hbar", "data-name": k }, el("span", { class: "name", text: k }), fill, el("span", { text: fmt(v) })));
  }
}

// Steering: the prompt continued without and with a steering vector
function steerItem() {
  const item = { vector: $("steer-vector").value, scale: Number($("steer-scale").value) };
  const layers = $("steer-layers").value.trim();
  if (layers) item.layers = layers;
  return item;
}

function steer(t0) {
  $("steer-scale-out").textContent = $("steer-scale").value;
  if (!$("steer-vector").value || !S.promptIds.length) { $("panel-steer").dataset.state = "ready"; return; }
  const body = { tokens: S.promptIds, steer: [steerItem()], max_tokens: Number($("steer-tokens").value) || 24, top: 8 };
  ask("steer", "/v1/inspect/steer", body, t0, (r) => {
    for (const side of ["plain", "steered"]) {
      hbars($(`steer-${side}-top`), r[side].top.map((c) => [label(c.piece), c.p]), pct);
      $(`steer-${side}-text`).textContent = r[side].text;
    }
    $("panel-steer").dataset.same = r.same;
  });
}

async function loadVectors(select) {
  const r = await api("/v1/steering");
  const sel = $("steer-vector");
  sel.textContent = "";
  if (!r.data.length) sel.append(el("option", { value: "", text: "(none yet: make one below)" }));
  for (const v of r.data) {
    const span = v.layers.length ? `${v.layers[0]}-${v.layers[v.layers.length - 1]}` : "";
    sel.append(el("option", { value: v.name, text: `${v.name} (layers ${span})${v.fits_model ? "" : ": made for another model"}` }));
  }
  if (select) sel.value = select;
}

async function makeVector() {
  const lines = (id) => $(id).value.split("\n").map((x) => x.trim()).filter((x) => x);
  const body = { name: $("make-name").value.trim(), positive: lines("make-positive"), negative: lines("make-negative") };
  const layers = $("make-layers").value.trim();
  if (layers) body.layers = layers;
  $("make-info").textContent = "making...";
  try {
    const r = await api("/v1/inspect/steer/make", body);
    await loadVectors(r.name);
    $("make-info").textContent = `${r.name}: ${r.layers.length} layers; the examples separate most after layer ${r.best_layer}`;
    S.shown.steer = null;
    steer(performance.now());
  } catch (e) { $("make-info").textContent = e.message; }
}

const PANELS = { next: nextToken, attention, lens, steer, budget, model };

// -- logit bias -----------------------------------------------------------------------------------
async function addBiasFromText() {
  const text = $("bias-token").value;
  if (!text) return;
  try {
    const r = await api("/tokenize", { prompt: text, add_special_tokens: false });
    if (r.count !== 1) throw new Error(`'${text}' is ${r.count} tokens (${r.pieces.map(label).join(" | ")}); logit bias takes one token`);
    addBias(r.tokens[0], Number($("bias-value").value), r.pieces[0]);
    $("bias-token").value = "";
  } catch (e) { showError(e.message); }
}

function addBias(id, value, piece) {
  S.bias[id] = { value, label: label(piece) };
  drawBias();
  onControl();
}

function drawBias() {
  const list = $("bias-list");
  list.textContent = "";
  for (const [id, b] of Object.entries(S.bias)) {
    list.append(el("li", { "data-token-id": id }, `${b.label} (${id}): ${b.value === -100 ? "banned" : b.value}`,
      el("button", { type: "button", title: "remove", text: "×", onclick: () => { delete S.bias[id]; drawBias(); onControl(); } })));
  }
}

// -- wiring ---------------------------------------------------------------------------------------
let controlT0 = null;
const refreshSoon = debounce(() => { refresh(controlT0); controlT0 = null; }, 150);
function onControl() {
  showSliders();
  if (controlT0 == null) controlT0 = performance.now();
  refreshSoon();
}

let textT0 = null;
const retokenize = debounce(() => { renderPrompt(textT0); textT0 = null; }, 250);
function onText() {
  if (textT0 == null) textT0 = performance.now();
  $("system-box").hidden = $("style-box").hidden = mode() !== "chat";
  retokenize();
}

function selectTab(tab) {
  S.tab = tab;
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const p of document.querySelectorAll(".tab")) p.hidden = p.id !== "panel-" + tab;
  refresh(performance.now());
}

function drawHistory() {
  const box = $("history");
  box.textContent = "";
  for (const m of S.history) box.append(el("div", { class: "msg" }, el("span", { class: "role", text: m.role + ": " }), m.content));
}

async function start() {
  $("api-key").value = localStorage.getItem("pellucid-api-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("pellucid-api-key", $("api-key").value); S.shown = {}; init(); });
  showSliders();
  for (const k of SLIDERS) $(k).addEventListener("input", onControl);
  for (const id of ["seed"]) $(id).addEventListener("input", onControl);
  for (const id of ["prompt", "system"]) $(id).addEventListener("input", onText);
  for (const e of document.querySelectorAll("#style-box [data-dim]")) e.addEventListener(e.tagName === "INPUT" ? "input" : "change", onText);
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", onText);
  $("att-layer").addEventListener("change", () => attention(performance.now()));
  $("att-head").addEventListener("change", () => attention(performance.now()));
  $("lens-target").addEventListener("change", () => lens(performance.now()));
  for (const id of ["steer-vector", "steer-layers", "steer-tokens"]) $(id).addEventListener("change", () => steer(performance.now()));
  $("steer-scale").addEventListener("input", onControl);
  $("make-go").addEventListener("click", makeVector);
  $("generate").addEventListener("click", generate);
  $("stop-gen").addEventListener("click", () => S.generating && S.generating.abort());
  $("bias-add").addEventListener("click", addBiasFromText);
  $("clear").addEventListener("click", () => { S.history = []; drawHistory(); onText(); });
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  // a finished reply can become part of the conversation: keep it as history
  $("keep").addEventListener("click", () => {
    if (mode() !== "chat" || !S.genPieces.length) return;
    S.history.push({ role: "user", content: $("prompt").value }, { role: "assistant", content: S.genPieces.join("") });
    $("prompt").value = "";
    drawHistory(); onText();
  });
  init();
}

async function init() {
  for (;;) {
    try {
      const h = await fetch("/health").then((r) => r.json());
      if (h.status === "ready") break;
      $("status").textContent = h.status === "loading" ? "loading the model..." : "failed: " + (h.error || h.status);
      if (h.status === "failed") return;
    } catch (e) { $("status").textContent = "no server"; }
    await new Promise((r) => setTimeout(r, 1000));
  }
  try {
    const m = await api("/v1/models");
    const card = m.data[0];
    S.model = card.id;
    $("model-name").textContent = `${card.id}, context ${fmtInt(card.max_model_len || 0)} tokens`;
    $("status").textContent = "ready";
    const st = await api("/v1/inspect/styles");
    for (const [dim, presets] of Object.entries(st.dimensions).concat([["skeleton", st.skeletons]])) {
      for (const p of presets) $("style-" + dim).append(el("option", { value: p, text: p }));
    }
  } catch (e) { $("status").textContent = e.message; return; }
  loadVectors().catch((e) => window.inspector.errors.push(e.message));
  renderPrompt(performance.now());
}

start();
