// ShizhenGPT web chat: streamed answers, images with TCM task presets, API key, Chinese / English.
// No build step and no external requests: everything the page needs is in this folder.
"use strict";

const TEXT = {
  zh: {
    title: "时珍GPT · 中医多模态助手", loading: "模型加载中…", ready: "就绪", failed: "加载失败",
    unreachable: "无法连接服务器", apiKey: "API 密钥", newChat: "新对话", keyLabel: "服务器需要 API 密钥：",
    save: "保存", hint: "输入问题，或上传舌象、面部、药材照片，选择分析任务。", tongue: "舌诊", face: "面诊",
    herb: "中药", attach: "添加图片", send: "发送", stop: "停止", copy: "复制", copied: "已复制",
    stopped: "（已停止）", remove: "移除图片", you: "你", assistant: "时珍GPT",
    placeholder: "请输入问题（Enter 发送，Shift+Enter 换行），可粘贴或拖入图片",
    e401: "需要有效的 API 密钥：请在上方输入。", e413: "图片或请求太大，请换一张较小的图片。",
    e429: "服务器繁忙，请 {s} 秒后重试。", e503: "模型暂不可用（加载中或显存不足），请稍后重试。",
    eNetwork: "网络错误：无法连接服务器。", eOther: "出错了：", notImage: "只能添加图片文件。",
    needImage: "请先添加一张图片再选择分析任务。",
  },
  en: {
    title: "ShizhenGPT · TCM multimodal assistant", loading: "Model loading…", ready: "Ready", failed: "Failed to load",
    unreachable: "Server unreachable", apiKey: "API key", newChat: "New chat", keyLabel: "This server needs an API key:",
    save: "Save", hint: "Ask a question, or add a tongue, face or herb photo and pick a task.", tongue: "Tongue",
    face: "Face", herb: "Herb", attach: "Add image", send: "Send", stop: "Stop", copy: "Copy", copied: "Copied",
    stopped: "(stopped)", remove: "Remove image", you: "You", assistant: "ShizhenGPT",
    placeholder: "Type a question (Enter sends, Shift+Enter new line); paste or drop images",
    e401: "A valid API key is needed: enter it above.", e413: "The image or request is too large; try a smaller image.",
    e429: "The server is busy; retry in {s} s.", e503: "The model is not available (loading or out of memory); retry soon.",
    eNetwork: "Network error: the server cannot be reached.", eOther: "Something went wrong: ", notImage: "Only image files can be added.",
    needImage: "Add an image first, then pick an analysis task.",
  },
};

const state = {
  lang: localStorage.getItem("shizhen.lang") || "zh",
  apiKey: localStorage.getItem("shizhen.apiKey") || "",
  history: [],      // OpenAI messages: {role, content}
  pending: [],      // images to send: {name, dataUrl, file}
  task: null,
  controller: null, // AbortController of the answer being streamed
};

const $ = (id) => document.getElementById(id);
const t = (key) => TEXT[state.lang][key] || key;

// ---- Markdown, safely: every character of the model's text is escaped first, then a few Markdown forms are
// turned into tags this code writes itself. No HTML from the answer can ever reach the page. ----
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function inline(text) {
  return text
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
}

function renderMarkdown(source) {
  const blocks = escapeHtml(source).split(/```/);
  let html = "";
  blocks.forEach((block, index) => {
    if (index % 2 === 1) {
      html += "<pre><code>" + block.replace(/^[\w-]*\n/, "") + "</code></pre>";
      return;
    }
    let list = null;
    for (const line of block.split("\n")) {
      const bullet = line.match(/^\s*[-*]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      const kind = bullet ? "ul" : numbered ? "ol" : null;
      if (list && kind !== list) { html += `</${list}>`; list = null; }
      if (kind) {
        if (!list) { html += `<${kind}>`; list = kind; }
        html += "<li>" + inline((bullet || numbered)[1]) + "</li>";
      } else if (heading) {
        html += `<p><strong>${inline(heading[2])}</strong></p>`;
      } else if (line.trim()) {
        html += "<p>" + inline(line) + "</p>";
      }
    }
    if (list) html += `</${list}>`;
  });
  return html;
}
window.renderMarkdown = renderMarkdown; // for tests

// ---- page text ----
function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  document.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = t(el.dataset.i18nTitle); });
  $("lang-button").textContent = state.lang === "zh" ? "English" : "中文";
  document.title = t("title");
  refreshHealth();
}

// ---- server status ----
let lastHealth = null;
async function refreshHealth() {
  const dot = $("status-dot"), text = $("status-text");
  try {
    // With keys set, /health tells a caller without one only the status; the key shows the model's name.
    const response = await fetch("/health", { cache: "no-store", headers: headers() });
    lastHealth = await response.json();
    dot.className = "dot " + (lastHealth.status === "ready" ? "ready" : lastHealth.status === "error" ? "error" : "loading");
    text.textContent = lastHealth.status === "ready" ? t("ready") : lastHealth.status === "error" ? t("failed") : t("loading");
    $("model-name").textContent = lastHealth.served_model_name || "";
    if (lastHealth.status === "error") text.title = lastHealth.error || "";
  } catch {
    dot.className = "dot error";
    text.textContent = t("unreachable");
  }
  if (!lastHealth || lastHealth.status === "loading") setTimeout(refreshHealth, 3000);
}

// ---- errors ----
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function explain(response) {
  let detail = "";
  try { detail = (await response.json()).error?.message || ""; } catch { /* not JSON */ }
  if (response.status === 401) { openKeyPanel(); return t("e401"); }
  if (response.status === 413) return t("e413");
  if (response.status === 429) return t("e429").replace("{s}", response.headers.get("Retry-After") || "5");
  if (response.status === 503) return t("e503");
  return t("eOther") + (detail || `HTTP ${response.status}`);
}

function openKeyPanel() {
  $("key-panel").hidden = false;
  $("key-button").setAttribute("aria-expanded", "true");
  $("key-input").value = state.apiKey;
  $("key-input").focus();
}

// ---- messages on screen ----
function addMessage(role, text, images = []) {
  $("empty-hint")?.remove();
  const box = document.createElement("article");
  box.className = "msg " + role;
  box.setAttribute("aria-label", role === "user" ? t("you") : t("assistant"));
  if (images.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    for (const image of images) {
      const img = document.createElement("img");
      img.src = image.dataUrl;
      img.alt = image.name;
      strip.append(img);
    }
    box.append(strip);
  }
  const body = document.createElement("div");
  body.className = "body";
  box.append(body);
  if (role === "user") body.textContent = text;
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return { box, body, raw: text };
}

// A streamed answer is drawn at most once per frame: pieces arrive faster than a page can re-render the whole
// Markdown (a long answer would otherwise cost O(n^2) and keep the page too busy to take a click on Stop).
function scheduleRender(view) {
  if (view.frame) return;
  view.frame = requestAnimationFrame(() => renderNow(view));
}

function renderNow(view) {
  if (view.frame) cancelAnimationFrame(view.frame);
  view.frame = 0;
  view.body.innerHTML = renderMarkdown(view.raw);
  view.box.scrollIntoView({ block: "end" });
}

function finishAnswer(view, stopped) {
  const meta = document.createElement("div");
  meta.className = "meta";
  if (stopped) {
    const note = document.createElement("span");
    note.className = "stopped";
    note.textContent = t("stopped");
    meta.append(note);
  }
  const copy = document.createElement("button");
  copy.type = "button";
  copy.textContent = t("copy");
  copy.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(view.raw); copy.textContent = t("copied"); } catch { /* denied */ }
  });
  meta.append(copy);
  view.box.append(meta);
  view.box.dataset.done = stopped ? "stopped" : "complete";
}

// ---- images ----
function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addImages(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) { showError(t("notImage")); continue; }
    state.pending.push({ name: file.name || "image", file, dataUrl: await readAsDataUrl(file) });
  }
  renderPreviews();
}

function renderPreviews() {
  const box = $("previews");
  box.replaceChildren();
  state.pending.forEach((image, index) => {
    const item = document.createElement("div");
    item.className = "preview";
    const img = document.createElement("img");
    img.src = image.dataUrl;
    img.alt = image.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `${t("remove")} ${image.name}`);
    remove.addEventListener("click", () => { state.pending.splice(index, 1); renderPreviews(); });
    item.append(img, remove);
    box.append(item);
  });
}

// ---- sending ----
function headers(extra = {}) {
  return state.apiKey ? { ...extra, Authorization: `Bearer ${state.apiKey}` } : extra;
}

async function readStream(response, onText) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue; // keep-alive comments
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) if (choice.delta?.content) onText(choice.delta.content);
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (!busy) $("prompt").focus();
}

async function send() {
  const text = $("prompt").value.trim();
  const images = state.pending.slice();
  if (!text && !images.length) return;
  if (state.task && !images.length) { showError(t("needImage")); return; }
  showError("");
  const userContent = images.length
    ? [...images.map((image) => ({ type: "image_url", image_url: { url: image.dataUrl } })), ...(text ? [{ type: "text", text }] : [])]
    : text;
  const question = addMessage("user", text || t(state.task || "attach"), images);
  $("prompt").value = "";
  state.pending = [];
  renderPreviews();

  const view = addMessage("assistant", "");
  view.raw = "";
  state.controller = new AbortController();
  setBusy(true);
  let request;
  if (state.task) {
    const form = new FormData();
    for (const image of images) form.append("image", image.file, image.name);
    form.append("task", state.task);
    if (text) form.append("prompt", text);
    form.append("stream", "true");
    request = fetch("/v1/vision/analyze", { method: "POST", body: form, headers: headers(), signal: state.controller.signal });
  } else {
    const messages = [...state.history, { role: "user", content: userContent }];
    request = fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ messages, stream: true }),
      signal: state.controller.signal,
    });
  }
  let stopped = false;
  try {
    const response = await request;
    if (!response.ok) throw new Error(await explain(response));
    await readStream(response, (piece) => {
      view.raw += piece;
      scheduleRender(view);
    });
  } catch (error) {
    if (error.name === "AbortError") stopped = true;
    else showError(error instanceof TypeError ? t("eNetwork") : error.message);
  } finally {
    state.controller = null;
    setBusy(false);
  }
  renderNow(view);
  if (view.raw || stopped) {
    state.history.push({ role: "user", content: userContent }, { role: "assistant", content: view.raw });
    finishAnswer(view, stopped);
  } else {
    // Nothing came back (wrong key, server busy, ...): put the question back so it can be sent again.
    view.box.remove();
    question.box.remove();
    $("prompt").value = text;
    state.pending = images;
    renderPreviews();
  }
}

// ---- wiring ----
function init() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); if (!state.controller) send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") state.controller?.abort(); });
  $("file-input").addEventListener("change", (event) => { addImages([...event.target.files]); event.target.value = ""; });
  $("prompt").addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) { event.preventDefault(); addImages(files); }
  });
  const composer = $("composer");
  composer.addEventListener("dragover", (event) => { event.preventDefault(); composer.classList.add("dragging"); });
  composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  composer.addEventListener("drop", (event) => {
    event.preventDefault();
    composer.classList.remove("dragging");
    addImages([...event.dataTransfer.files]);
  });
  document.querySelectorAll(".task").forEach((button) => button.addEventListener("click", () => {
    state.task = state.task === button.dataset.task ? null : button.dataset.task;
    document.querySelectorAll(".task").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.task === state.task)));
  }));
  $("key-button").addEventListener("click", () => {
    const panel = $("key-panel");
    if (panel.hidden) openKeyPanel(); else { panel.hidden = true; $("key-button").setAttribute("aria-expanded", "false"); }
  });
  $("key-save").addEventListener("click", () => {
    state.apiKey = $("key-input").value.trim();
    localStorage.setItem("shizhen.apiKey", state.apiKey);
    $("key-panel").hidden = true;
    $("key-button").setAttribute("aria-expanded", "false");
    showError("");
  });
  $("lang-button").addEventListener("click", () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    localStorage.setItem("shizhen.lang", state.lang);
    applyLanguage();
  });
  $("clear-button").addEventListener("click", () => {
    state.controller?.abort();
    state.history = [];
    $("messages").replaceChildren();
    showError("");
  });
  applyLanguage();
}

init();
