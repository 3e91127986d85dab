// Patchbay's chat page. It is an ordinary client of the server's public API: it lists and
// loads models through /api/inference, chats through /v1/chat/completions (streamed), stops a
// run through /api/inference/cancel, transcribes through /v1/audio/transcriptions, and sends
// the same API key any client would. Model output reaches the page only as text
// (markdown.js builds DOM nodes; nothing here parses HTML).

import { renderMarkdown } from "./markdown.js";

const STORAGE = {
    conversations: "patchbay.conversations.v1",
    current: "patchbay.current-conversation.v1",
    settings: "patchbay.settings.v1",
    key: "patchbay.api-key", // sessionStorage: gone when the tab closes
};
const POLL_MS = 3000;
const PROGRESS_POLL_MS = 150;
const MAX_RECORDING_MS = 5 * 60 * 1000;

const $ = (id) => document.getElementById(id);
const ui = {
    app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), openSidebar: $("open-sidebar"), closeSidebar: $("close-sidebar"),
    newChat: $("new-chat"), conversationList: $("conversation-list"), noConversations: $("no-conversations"),
    modelList: $("model-list"), noModels: $("no-models"),
    loadForm: $("load-form"), loadPath: $("load-path"), loadAlias: $("load-alias"), loadBackend: $("load-backend"),
    loadExtra: $("load-extra"), loadButton: $("load-button"), loadStatus: $("load-status"), loadLabel: $("load-label"),
    loadPercent: $("load-percent"), loadProgress: $("load-progress"), loadCancel: $("load-cancel"), loadError: $("load-error"),
    settings: $("settings"), systemPrompt: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"), topK: $("top-k"),
    maxTokens: $("max-tokens"), thinking: $("thinking"), tools: $("tools"), settingsError: $("settings-error"),
    modelSelect: $("model-select"), serverStatus: $("server-status"), keyButton: $("key-button"),
    messages: $("messages"), welcome: $("welcome"),
    composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
    audioTools: $("audio-tools"), audioFile: $("audio-file"), record: $("record"), audioStatus: $("audio-status"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyReason: $("key-reason"), keyInput: $("key-input"), keyCancel: $("key-cancel"),
};

const state = {
    key: sessionStorage.getItem(STORAGE.key) || "",
    keyDeclined: false,
    reachable: true,
    models: [],        // /api/inference/status "models"
    loadingIDs: [],    // loads in progress (any client's)
    conversations: readJSON(localStorage, STORAGE.conversations, []),
    currentId: localStorage.getItem(STORAGE.current),
    settings: { system: "", temperature: "", topP: "", topK: "", maxTokens: "", thinking: "", tools: "", model: "",
                ...readJSON(localStorage, STORAGE.settings, {}) },
    run: null,           // the answer being generated
    load: null,          // the load this page started
    transcription: null, // the transcription in flight
    recording: null,
};
const views = new WeakMap(); // message -> its element and the function that redraws it

// An answer that was still arriving when the page closed ends there.
for (const conversation of state.conversations) {
    for (const message of conversation.messages || []) {
        if (message.state === "waiting" || message.state === "streaming") {
            message.state = "stopped";
            message.status = "";
        }
    }
}

function readJSON(storage, key, fallback) {
    try {
        const value = JSON.parse(storage.getItem(key));
        return value ?? fallback;
    } catch {
        return fallback;
    }
}

function uid() {
    return crypto.randomUUID ? crypto.randomUUID()
        : Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ─── The API, with the key ───────────────────────────────────────────────────────────

class APIError extends Error {
    constructor(status, message, code) {
        super(message);
        this.status = status;
        this.code = code;
    }
}

async function errorFrom(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    let code;
    try {
        const body = await response.json();
        const error = body?.error;
        message = (typeof error === "object" ? error?.message : error) || body?.message || message;
        code = error?.code;
    } catch { /* not JSON: keep the status line */ }
    return new APIError(response.status, message, code);
}

/** fetch with the key. A 401 asks for a key (once, however many requests got it) and retries;
 *  `interactive: false` (the background poll) does not ask again after the user declined. */
async function api(path, { method = "GET", json, form, signal, interactive = true } = {}) {
    for (let attempt = 0; attempt < 5; attempt++) {
        const headers = {};
        if (state.key) headers.Authorization = `Bearer ${state.key}`;
        let body;
        if (json !== undefined) {
            headers["Content-Type"] = "application/json";
            body = JSON.stringify(json);
        } else if (form) {
            body = form; // multipart/form-data, with its boundary, set by the browser
        }
        const response = await fetch(path, { method, headers, body, signal, cache: "no-store", credentials: "omit" });
        if (response.status !== 401) return response;
        const error = await errorFrom(response);
        if (!interactive && state.keyDeclined) throw error;
        const key = await askForKey(keyReason(error));
        if (key === null) {
            state.keyDeclined = true;
            updateKeyButton();
            throw error;
        }
        setKey(key);
    }
    throw new APIError(401, "The server refused every key given.");
}

function keyReason(error) {
    if (/admin key/i.test(error.message)) {
        return "This action needs the admin key (the server was started with --admin-key).";
    }
    return state.key ? "The server refused this key. Enter the right one."
        : "This server needs an API key (it was started with --api-key).";
}

let keyRequest = null; // {promise, resolve}: one dialog for every request that got a 401

function askForKey(reason) {
    if (keyRequest) return keyRequest.promise;
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    keyRequest = { promise, resolve };
    ui.keyReason.textContent = reason;
    ui.keyInput.value = "";
    if (!ui.keyDialog.open) ui.keyDialog.showModal();
    ui.keyInput.focus();
    return promise;
}

function answerKeyDialog(value) {
    const request = keyRequest;
    keyRequest = null;
    if (ui.keyDialog.open) ui.keyDialog.close();
    request?.resolve(value);
}

function setKey(key) {
    state.key = key;
    state.keyDeclined = false;
    if (key) sessionStorage.setItem(STORAGE.key, key);
    else sessionStorage.removeItem(STORAGE.key);
    updateKeyButton();
}

function updateKeyButton() {
    ui.keyButton.hidden = !(state.key || state.keyDeclined);
    ui.keyButton.textContent = state.key ? "Change key" : "Enter API key";
}

// ─── Models ──────────────────────────────────────────────────────────────────────────

const capabilities = (model) => model.capabilities || [];
const chatModels = () => state.models.filter((m) => capabilities(m).includes("chat"));

function transcriptionModel() {
    const able = state.models.filter((m) => capabilities(m).includes("transcription"));
    return able.find((m) => !capabilities(m).includes("chat")) || able[0] || null;
}

let refreshing = null;
function refreshModels() {
    refreshing ??= (async () => {
        try {
            const response = await api("/api/inference/status", { interactive: false });
            if (!response.ok) throw await errorFrom(response);
            const status = await response.json();
            state.models = status.models || [];
            state.loadingIDs = status.loading || [];
            state.reachable = true;
            const count = state.models.length;
            const loads = state.loadingIDs.length ? ` · loading ${state.loadingIDs.join(", ")}` : "";
            setServerStatus((count ? `${count} model${count > 1 ? "s" : ""} loaded` : "no model loaded") + loads);
        } catch (error) {
            state.reachable = !(error instanceof TypeError);
            setServerStatus(error instanceof TypeError ? "server unreachable" : error.message, true);
        } finally {
            refreshing = null;
        }
        renderModels();
    })();
    return refreshing;
}

function setServerStatus(text, bad = false) {
    ui.serverStatus.textContent = text;
    ui.serverStatus.classList.toggle("bad", bad);
}

function describeModel(model) {
    const parts = [model.backend];
    if (model.context_length) parts.push(`${model.context_length.toLocaleString()} context`);
    if (model.parameter_count) parts.push(`${formatCount(model.parameter_count)} parameters`);
    const kinds = capabilities(model).filter((c) => ["chat", "transcription", "embeddings", "vision_input", "tools", "reasoning"].includes(c));
    if (kinds.length) parts.push(kinds.join(", ").replace("vision_input", "vision"));
    return parts.filter(Boolean).join(" · ");
}

function formatCount(n) {
    if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
    if (n >= 1e6) return `${Math.round(n / 1e6)}M`;
    return String(n);
}

function renderModels() {
    ui.modelList.replaceChildren();
    for (const model of state.models) {
        const item = el("li", "model-item");
        item.dataset.model = model.model;
        const text = el("div", "model-text");
        text.append(el("strong", "model-name", model.model), el("span", "model-meta", describeModel(model)));
        if (model.active_generations) text.append(el("span", "model-busy", `answering ${model.active_generations}`));
        const unload = el("button", "button small unload", "Unload");
        unload.type = "button";
        unload.setAttribute("aria-label", `Unload ${model.model}`);
        unload.addEventListener("click", () => unloadModel(model.model, unload));
        item.append(text, unload);
        ui.modelList.append(item);
    }
    const loading = [...state.loadingIDs];
    if (state.load && !loading.includes(state.load.id)) loading.push(state.load.id);
    for (const id of loading) {
        if (state.models.some((m) => m.model === id)) continue;
        const item = el("li", "model-item loading");
        item.dataset.model = id;
        const text = el("div", "model-text");
        text.append(el("strong", "model-name", id), el("span", "model-meta", "loading…"));
        item.append(text);
        ui.modelList.append(item);
    }
    ui.noModels.hidden = state.models.length > 0 || loading.length > 0;

    // The model menu: chat models, and the one this page is loading (a message may wait for it).
    const wanted = ui.modelSelect.value || currentConversation()?.model || state.settings.model;
    const options = chatModels().map((m) => ({ value: m.model, label: m.model }));
    if (state.load && !options.some((o) => o.value === state.load.id)) {
        options.push({ value: state.load.id, label: `${state.load.id} (loading…)` });
    }
    ui.modelSelect.replaceChildren();
    if (!options.length) {
        const none = el("option", null, state.reachable ? "No model loaded" : "Server unreachable");
        none.value = "";
        ui.modelSelect.append(none);
    }
    for (const option of options) {
        const node = el("option", null, option.label);
        node.value = option.value;
        ui.modelSelect.append(node);
    }
    if (options.some((o) => o.value === wanted)) ui.modelSelect.value = wanted;
    ui.modelSelect.disabled = !options.length;

    const audio = transcriptionModel();
    ui.audioTools.hidden = !audio;
    if (audio) ui.audioFile.title = `Transcribed by ${audio.model}`;
    ui.record.hidden = !(window.isSecureContext && navigator.mediaDevices?.getUserMedia);
    updateComposer();
}

async function unloadModel(id, button) {
    button.disabled = true;
    try {
        let response = await api("/api/inference/unload", { method: "POST", json: { model_path: id } });
        if (response.status === 409) {
            const error = await errorFrom(response);
            if (!confirm(`${error.message}\n\nStop those answers and unload ${id}?`)) return;
            response = await api("/api/inference/unload", { method: "POST", json: { model_path: id, force_cancel_active: true } });
        }
        if (!response.ok) throw await errorFrom(response);
    } catch (error) {
        showLoadError(`Could not unload ${id}: ${error.message}`);
    } finally {
        button.disabled = false;
        await refreshModels();
    }
}

/** The id a load gets: its alias, else the file name without its extension (as the server does). */
function modelIDFor(path, alias) {
    if (alias) return alias;
    const name = path.replace(/\/+$/, "").split("/").pop() || path;
    const dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(0, dot) : name;
}

function showLoadError(message) {
    ui.loadError.textContent = message;
    ui.loadError.hidden = !message;
}

let hideLoadStatus = null;

async function loadModel(event) {
    event.preventDefault();
    if (state.load) return;
    showLoadError("");
    const path = ui.loadPath.value.trim();
    if (!path) return;
    let body = {};
    if (ui.loadExtra.value.trim()) {
        try {
            body = JSON.parse(ui.loadExtra.value);
        } catch (error) {
            showLoadError(`The extra load fields are not valid JSON: ${error.message}`);
            return;
        }
        if (typeof body !== "object" || body === null || Array.isArray(body)) {
            showLoadError("The extra load fields must be a JSON object, like {\"max_seq_length\": 4096}.");
            return;
        }
    }
    body.model_path = path;
    const alias = ui.loadAlias.value.trim();
    const backend = ui.loadBackend.value.trim();
    if (alias) body.alias = alias;
    if (backend) body.backend = backend;

    let finished;
    const load = { id: modelIDFor(path, body.alias), path, done: false, finished: new Promise((r) => { finished = r; }) };
    state.load = load;
    clearTimeout(hideLoadStatus);
    ui.loadButton.disabled = true;
    ui.loadStatus.hidden = false;
    ui.loadStatus.dataset.state = "loading";
    ui.loadCancel.hidden = false;
    ui.loadLabel.textContent = `Loading ${load.id}…`;
    setProgress(null);
    renderModels();
    const poller = pollProgress(load);
    try {
        const response = await api("/api/inference/load", { method: "POST", json: body });
        if (!response.ok) throw await errorFrom(response);
        const result = await response.json();
        load.id = result.model || load.id;
        load.ok = true;
        setProgress(1);
        ui.loadStatus.dataset.state = "ready";
        ui.loadLabel.textContent = result.status === "already_loaded" ? `${load.id} was already loaded` : `${load.id} is ready`;
    } catch (error) {
        load.error = error;
        ui.loadStatus.dataset.state = "failed";
        ui.loadStatus.hidden = true;
        showLoadError(error.code === "load_cancelled" ? "The load was cancelled." : `The model did not load: ${error.message}`);
    } finally {
        load.done = true;
        await poller;
        state.load = null;
        ui.loadButton.disabled = false;
        ui.loadCancel.hidden = true;
        await refreshModels();
        if (load.ok && chatModels().some((m) => m.model === load.id) && !state.run) {
            ui.modelSelect.value = load.id;
            chooseModel(load.id);
        }
        finished();
        if (load.ok) hideLoadStatus = setTimeout(() => { if (!state.load) ui.loadStatus.hidden = true; }, 15000);
    }
}

async function pollProgress(load) {
    while (!load.done) {
        try {
            const response = await api(`/api/inference/load-progress?model=${encodeURIComponent(load.id)}`, { interactive: false });
            if (response.ok && !load.done) {
                const progress = await response.json();
                if (progress.phase && progress.phase !== "ready" && progress.bytes_total > 0) {
                    setProgress(progress.fraction);
                    ui.loadLabel.textContent = `Loading ${load.id} (${progress.phase})…`;
                }
            }
        } catch { /* the load's own answer says what went wrong */ }
        await sleep(PROGRESS_POLL_MS);
    }
}

/** fraction in 0...1, or null for a bar that does not know yet. */
function setProgress(fraction) {
    if (fraction === null || fraction === undefined || Number.isNaN(fraction)) {
        ui.loadProgress.removeAttribute("value");
        ui.loadPercent.textContent = "";
        return;
    }
    const percent = Math.max(0, Math.min(100, Math.floor(fraction * 100)));
    ui.loadProgress.value = percent;
    ui.loadPercent.textContent = `${percent}%`;
}

async function cancelLoad() {
    const load = state.load;
    if (!load) return;
    ui.loadCancel.disabled = true;
    try {
        await api("/api/inference/unload", { method: "POST", json: { model_path: load.id } });
    } catch (error) {
        showLoadError(`Could not cancel the load: ${error.message}`);
    } finally {
        ui.loadCancel.disabled = false;
    }
}

function chooseModel(id) {
    state.settings.model = id;
    saveSettings();
    const conversation = currentConversation();
    if (conversation) {
        conversation.model = id;
        saveConversations();
    }
    updateComposer();
}

// ─── Conversations ──────────────────────────────────────────────────────────────────

function currentConversation(create = false) {
    let conversation = state.conversations.find((c) => c.id === state.currentId);
    if (!conversation && create) {
        conversation = { id: uid(), title: "New chat", messages: [], created: Date.now(), updated: Date.now(), model: ui.modelSelect.value };
        state.conversations.push(conversation);
        selectConversation(conversation.id, { render: false });
    }
    return conversation || null;
}

let saveWarned = false;
function saveConversations() {
    try {
        localStorage.setItem(STORAGE.conversations, JSON.stringify(state.conversations));
    } catch (error) {
        if (!saveWarned) setServerStatus(`Conversations could not be saved in this browser: ${error.message}`, true);
        saveWarned = true;
    }
}

let saveTimer = null;
function saveConversationsSoon() {
    if (saveTimer) return;
    saveTimer = setTimeout(() => { saveTimer = null; saveConversations(); }, 700);
}

function selectConversation(id, { render = true } = {}) {
    state.currentId = id;
    if (id) localStorage.setItem(STORAGE.current, id);
    else localStorage.removeItem(STORAGE.current);
    const conversation = currentConversation();
    if (conversation?.model && [...ui.modelSelect.options].some((o) => o.value === conversation.model)) {
        ui.modelSelect.value = conversation.model;
    }
    if (render) {
        renderConversationList();
        renderMessages();
        setSidebar(false);
    }
}

function newChat() {
    selectConversation(null);
    ui.input.focus();
}

function deleteConversation(id) {
    const conversation = state.conversations.find((c) => c.id === id);
    if (!conversation || !confirm(`Delete "${conversation.title}"?`)) return;
    if (state.run?.conversation === conversation) stop();
    state.conversations = state.conversations.filter((c) => c !== conversation);
    saveConversations();
    if (state.currentId === id) selectConversation(null);
    else renderConversationList();
}

function titleFrom(text) {
    const line = text.replace(/\s+/g, " ").trim();
    return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

function renderConversationList() {
    ui.conversationList.replaceChildren();
    const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
    for (const conversation of sorted) {
        const item = el("li", "conversation-item");
        item.dataset.id = conversation.id;
        const open = el("button", "conversation-open", conversation.title);
        open.type = "button";
        if (conversation.id === state.currentId) open.setAttribute("aria-current", "true");
        open.addEventListener("click", () => selectConversation(conversation.id));
        const remove = el("button", "conversation-delete", "✕");
        remove.type = "button";
        remove.setAttribute("aria-label", `Delete ${conversation.title}`);
        remove.addEventListener("click", () => deleteConversation(conversation.id));
        item.append(open, remove);
        ui.conversationList.append(item);
    }
    ui.noConversations.hidden = sorted.length > 0;
}

// ─── Messages ───────────────────────────────────────────────────────────────────────

function renderMessages() {
    const conversation = currentConversation();
    ui.messages.replaceChildren();
    if (!conversation || !conversation.messages.length) {
        ui.messages.append(ui.welcome);
        return;
    }
    for (const message of conversation.messages) ui.messages.append(messageView(message).node);
    scrollToEnd(true);
}

function messageView(message) {
    const node = el("article", `message ${message.role}`);
    if (message.role === "user") {
        node.append(el("div", "message-role", "You"), el("div", "message-content plain", message.content));
        const view = { node, update() {} };
        views.set(message, view);
        return view;
    }
    const role = el("div", "message-role", message.model ? `Assistant · ${message.model}` : "Assistant");
    const status = el("div", "message-status");
    const reasoning = el("details", "reasoning");
    const reasoningSummary = el("summary", null, "Reasoning");
    const reasoningText = el("div", "reasoning-text");
    reasoning.append(reasoningSummary, reasoningText);
    const tools = el("div", "tool-calls");
    const content = el("div", "message-content markdown");
    const meta = el("div", "message-meta");
    node.append(role, status, reasoning, tools, content, meta);

    let shownContent = null;
    let shownReasoning = null;
    let shownTools = null;
    const view = {
        node,
        update() {
            node.dataset.state = message.state || "done";
            status.textContent = message.state === "error" ? message.error || "Failed" : message.status || "";
            status.hidden = !status.textContent;
            status.classList.toggle("error", message.state === "error");

            reasoning.hidden = !message.reasoning;
            reasoningSummary.textContent = message.state === "streaming" && !message.content && !message.toolCalls?.length
                ? "Reasoning…" : "Reasoning";
            if (message.reasoning !== shownReasoning) {
                reasoningText.textContent = message.reasoning || "";
                shownReasoning = message.reasoning;
            }

            const calls = (message.toolCalls || []).filter(Boolean);
            const toolsKey = JSON.stringify(calls);
            if (toolsKey !== shownTools) {
                tools.replaceChildren(...calls.map(toolCallView));
                shownTools = toolsKey;
            }
            tools.hidden = !calls.length;

            if (message.content !== shownContent) {
                content.replaceChildren(renderMarkdown(message.content || ""));
                shownContent = message.content;
            }
            content.hidden = !message.content;
            meta.replaceChildren(...statsView(message));
            meta.hidden = !meta.childNodes.length;
        },
    };
    view.update();
    views.set(message, view);
    return view;
}

function toolCallView(call) {
    const box = el("div", "tool-call");
    const head = el("div", "tool-call-head");
    head.append(el("span", "tool-call-label", "Tool call"), el("code", "tool-call-name", call.name || "(unnamed)"));
    let args = call.arguments || "";
    try {
        args = JSON.stringify(JSON.parse(args), null, 2);
    } catch { /* still streaming, or not JSON: as it came */ }
    const pre = el("pre", "tool-call-arguments");
    pre.append(el("code", null, args));
    box.append(head, pre);
    return box;
}

function statsView(message) {
    const stats = message.stats;
    if (!stats) return [];
    const parts = [];
    const part = (name, text, value) => {
        const span = el("span", `stat ${name}`, text);
        span.dataset.value = String(value);
        parts.push(span);
    };
    if (stats.ttft_ms != null) part("ttft", `${(stats.ttft_ms / 1000).toFixed(2)} s to first token`, Math.round(stats.ttft_ms));
    if (stats.tokens_per_second != null) part("tps", `${stats.tokens_per_second.toFixed(1)} tokens/s`, stats.tokens_per_second.toFixed(2));
    if (stats.tokens != null) part("tokens", `${stats.tokens} tokens`, stats.tokens);
    if (message.finish === "length") part("finish", "stopped at the length limit", "length");
    if (message.state === "stopped") part("finish", "stopped", "stopped");
    return parts;
}

function redraw(message) {
    views.get(message)?.update();
}

let scheduled = new Set();
function redrawSoon(message) {
    if (scheduled.has(message)) return;
    scheduled.add(message);
    requestAnimationFrame(() => {
        scheduled.delete(message);
        const nearEnd = isNearEnd();
        redraw(message);
        if (nearEnd) scrollToEnd();
    });
}

function isNearEnd() {
    const box = ui.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToEnd(force = false) {
    if (force || isNearEnd()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

// ─── Settings ───────────────────────────────────────────────────────────────────────

const settingFields = [
    ["system", ui.systemPrompt], ["temperature", ui.temperature], ["topP", ui.topP], ["topK", ui.topK],
    ["maxTokens", ui.maxTokens], ["thinking", ui.thinking], ["tools", ui.tools],
];

function saveSettings() {
    try {
        localStorage.setItem(STORAGE.settings, JSON.stringify(state.settings));
    } catch { /* a full storage keeps the settings for this page only */ }
}

/** The request fields the settings ask for; throws with a sentence when one is wrong. */
function requestOptions() {
    const s = state.settings;
    const options = {};
    const number = (value, name, field, integer = false) => {
        if (value === "" || value === undefined || value === null) return;
        const parsed = Number(value);
        if (!Number.isFinite(parsed) || (integer && !Number.isInteger(parsed))) throw new Error(`${name} must be a number.`);
        options[field] = parsed;
    };
    number(s.temperature, "Temperature", "temperature");
    number(s.topP, "Top P", "top_p");
    number(s.topK, "Top K", "top_k", true);
    number(s.maxTokens, "Max tokens", "max_tokens", true);
    if (s.thinking === "on") options.enable_thinking = true;
    if (s.thinking === "off") options.enable_thinking = false;
    if (s.tools && s.tools.trim()) {
        let tools;
        try {
            tools = JSON.parse(s.tools);
        } catch (error) {
            throw new Error(`Tools are not valid JSON: ${error.message}`);
        }
        if (!Array.isArray(tools)) throw new Error("Tools must be a JSON list of tool definitions.");
        if (tools.length) options.tools = tools;
    }
    return options;
}

// ─── A run: send, stream, stop ──────────────────────────────────────────────────────

function history(conversation, upTo) {
    const messages = [];
    if (state.settings.system.trim()) messages.push({ role: "system", content: state.settings.system.trim() });
    for (const message of conversation.messages) {
        if (message === upTo) break;
        if (message.role === "user") {
            messages.push({ role: "user", content: message.content });
        } else if (message.role === "assistant") {
            // A tool call the page did not run goes back as text, so the history stays valid
            // for any chat template.
            const calls = (message.toolCalls || []).filter(Boolean).map((c) => `[called ${c.name}(${c.arguments})]`);
            const content = [message.content || "", ...calls].join("\n").trim();
            if (content) messages.push({ role: "assistant", content });
        }
    }
    return messages;
}

async function send() {
    if (state.run) return;
    const text = ui.input.value.trim();
    if (!text) return;
    const model = ui.modelSelect.value;
    if (!model) {
        setSidebar(true);
        ui.loadPath.focus();
        showLoadError("Load a model first: type the path of a model file and press Load.");
        return;
    }
    let options;
    try {
        options = requestOptions();
        ui.settingsError.hidden = true;
    } catch (error) {
        ui.settingsError.textContent = error.message;
        ui.settingsError.hidden = false;
        ui.settings.open = true;
        setSidebar(true);
        return;
    }

    const conversation = currentConversation(true);
    conversation.model = model;
    conversation.messages.push({ role: "user", content: text });
    if (conversation.title === "New chat") conversation.title = titleFrom(text);
    const message = { role: "assistant", model, content: "", reasoning: "", toolCalls: [], state: "waiting", status: "Waiting for the model…" };
    conversation.messages.push(message);
    conversation.updated = Date.now();
    ui.input.value = "";

    let stopped;
    const run = {
        cancelId: `web-${uid()}`, controller: new AbortController(), conversation, message, stopped: false,
        stoppedSignal: new Promise((r) => { stopped = r; }), tokens: 0, usage: null,
    };
    run.markStopped = stopped;
    state.run = run;
    saveConversations();
    renderConversationList();
    renderMessages();
    updateComposer();

    try {
        if (state.load && state.load.id === model) {
            message.status = `Waiting for ${model} to load…`;
            redraw(message);
            await Promise.race([state.load.finished, run.stoppedSignal]);
            if (run.stopped) return;
            if (!chatModels().some((m) => m.model === model)) throw new Error(`${model} did not load.`);
        }
        if (run.stopped) return;
        const body = {
            model, messages: history(conversation, message), stream: true, stream_options: { include_usage: true },
            return_progress: true, cancel_id: run.cancelId, ...options,
        };
        message.status = "Waiting for the model…";
        redraw(message);
        run.sentAt = performance.now();
        const response = await api("/v1/chat/completions", { method: "POST", json: body, signal: run.controller.signal });
        if (!response.ok) throw await errorFrom(response);
        if (!run.firstAt) {
            message.status = "Processing the prompt…";
            redraw(message);
        }
        await readStream(response, run);
        if (!run.stopped) message.state = "done";
    } catch (error) {
        if (run.stopped || error.name === "AbortError") {
            message.state = "stopped";
        } else {
            message.state = "error";
            message.error = error instanceof TypeError ? "The server could not be reached." : error.message;
        }
    } finally {
        finishRun(run);
    }
}

async function readStream(response, run) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let boundary;
        while ((boundary = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, boundary);
            buffer = buffer.slice(boundary + 2);
            const data = frame.split("\n").filter((line) => line.startsWith("data:"))
                .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
            if (!data) continue; // a comment: the server's keep-alive
            if (data === "[DONE]") return;
            let chunk;
            try {
                chunk = JSON.parse(data);
            } catch {
                continue;
            }
            takeChunk(run, chunk);
        }
    }
    if (!run.stopped) throw new Error("The answer ended early: the connection closed.");
}

function takeChunk(run, chunk) {
    const message = run.message;
    if (chunk.error) throw new APIError(0, chunk.error.message || "The model failed.", chunk.error.code);
    if (chunk.prompt_progress && !run.firstAt) {
        const p = chunk.prompt_progress;
        const done = p.total > 0 ? Math.floor((100 * p.processed) / p.total) : 0;
        message.status = `Processing the prompt… ${done}%`;
    }
    if (chunk.usage) run.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content || delta.reasoning_content || delta.tool_calls) {
            if (!run.firstAt) run.firstAt = performance.now();
            message.state = "streaming";
            message.status = "";
            run.tokens++;
        }
        if (delta.reasoning_content) message.reasoning += delta.reasoning_content;
        if (delta.content) message.content += delta.content;
        for (const call of delta.tool_calls || []) {
            const index = call.index ?? 0;
            const slot = message.toolCalls[index] ??= { id: "", name: "", arguments: "" };
            if (call.id) slot.id = call.id;
            if (call.function?.name) slot.name += call.function.name;
            if (call.function?.arguments) slot.arguments += call.function.arguments;
        }
        if (choice.finish_reason) message.finish = choice.finish_reason;
    }
    updateStats(run);
    redrawSoon(message);
    saveConversationsSoon();
}

function updateStats(run, end = performance.now()) {
    if (!run.sentAt || !run.firstAt) return;
    const tokens = run.usage?.completion_tokens ?? run.tokens;
    const seconds = (end - run.firstAt) / 1000;
    run.message.stats = {
        ttft_ms: run.firstAt - run.sentAt,
        tokens,
        tokens_per_second: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
    };
}

function finishRun(run) {
    updateStats(run);
    const message = run.message;
    if (message.state !== "error") message.status = "";
    if (state.run === run) state.run = null;
    run.conversation.updated = Date.now();
    saveConversations();
    redraw(message);
    updateComposer();
    refreshModels(); // the model's "answering" count, now and once the server has let go of the run
    setTimeout(refreshModels, 600);
    if (document.activeElement === document.body || document.activeElement === ui.stop) ui.input.focus();
}

/** Stops the answer: tells the server (which stops the engine, also behind a proxy that keeps
 *  the connection open, and also for a request not sent yet) and aborts the request. */
function stop() {
    stopTranscription();
    const run = state.run;
    if (!run || run.stopped) return;
    run.stopped = true;
    run.message.state = "stopped";
    run.message.status = "";
    run.markStopped();
    api("/api/inference/cancel", { method: "POST", json: { cancel_id: run.cancelId } }).catch(() => { /* the abort still ends it */ });
    run.controller.abort();
    redraw(run.message);
    updateComposer();
}

// ─── Audio: a file or the microphone, transcribed into the message box ────────────

async function transcribe(blob, fileName) {
    const model = transcriptionModel();
    if (!model) {
        setAudioStatus("Load a speech-to-text model (Whisper) first.", true);
        return;
    }
    if (state.transcription) return;
    const job = { cancelId: `web-${uid()}`, controller: new AbortController(), stopped: false };
    state.transcription = job;
    updateComposer();
    setAudioStatus(`Transcribing with ${model.model}…`);
    try {
        const form = new FormData();
        form.append("file", blob, fileName);
        form.append("model", model.model);
        form.append("response_format", "json");
        form.append("cancel_id", job.cancelId);
        const response = await api("/v1/audio/transcriptions", { method: "POST", form, signal: job.controller.signal });
        if (!response.ok) throw await errorFrom(response);
        const text = ((await response.json()).text || "").trim();
        if (text) {
            const before = ui.input.value;
            ui.input.value = before && !/\s$/.test(before) ? `${before} ${text}` : before + text;
            ui.input.focus();
            ui.input.setSelectionRange(ui.input.value.length, ui.input.value.length);
        }
        setAudioStatus(text ? "The transcript is in the message box." : "No speech was heard.");
    } catch (error) {
        setAudioStatus(job.stopped ? "Transcription stopped." : `Transcription failed: ${error.message}`, !job.stopped);
    } finally {
        if (state.transcription === job) state.transcription = null;
        updateComposer();
    }
}

function stopTranscription() {
    const job = state.transcription;
    if (!job || job.stopped) return;
    job.stopped = true;
    api("/api/inference/cancel", { method: "POST", json: { cancel_id: job.cancelId } }).catch(() => {});
    job.controller.abort();
}

function setAudioStatus(text, bad = false) {
    ui.audioStatus.textContent = text;
    ui.audioStatus.classList.toggle("error", bad);
}

async function toggleRecording() {
    if (state.recording) {
        await finishRecording();
        return;
    }
    let stream;
    try {
        stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
    } catch (error) {
        setAudioStatus(`The microphone is not available: ${error.message}`, true);
        return;
    }
    const context = new AudioContext();
    const source = context.createMediaStreamSource(stream);
    // ScriptProcessorNode: deprecated, but everywhere, and it needs no worklet file.
    const processor = context.createScriptProcessor(4096, 1, 1);
    const recording = { stream, context, source, processor, chunks: [], samples: 0, startedAt: performance.now() };
    processor.onaudioprocess = (event) => {
        const data = event.inputBuffer.getChannelData(0);
        recording.chunks.push(new Float32Array(data));
        recording.samples += data.length;
    };
    source.connect(processor);
    processor.connect(context.destination);
    state.recording = recording;
    ui.record.textContent = "Stop recording";
    ui.record.classList.add("recording");
    ui.record.setAttribute("aria-pressed", "true");
    const tick = () => {
        const seconds = recording.samples / context.sampleRate;
        ui.audioStatus.dataset.seconds = seconds.toFixed(2);
        setAudioStatus(`Recording… ${Math.floor(seconds)} s`);
        if (performance.now() - recording.startedAt > MAX_RECORDING_MS) finishRecording();
    };
    recording.ticker = setInterval(tick, 250);
    tick();
}

async function finishRecording() {
    const recording = state.recording;
    if (!recording) return;
    state.recording = null;
    clearInterval(recording.ticker);
    ui.record.textContent = "Record";
    ui.record.classList.remove("recording");
    ui.record.setAttribute("aria-pressed", "false");
    recording.processor.disconnect();
    recording.source.disconnect();
    recording.stream.getTracks().forEach((track) => track.stop());
    const rate = recording.context.sampleRate;
    await recording.context.close();
    if (!recording.samples) {
        setAudioStatus("Nothing was recorded.", true);
        return;
    }
    const samples = new Float32Array(recording.samples);
    let offset = 0;
    for (const chunk of recording.chunks) {
        samples.set(chunk, offset);
        offset += chunk.length;
    }
    await transcribe(new Blob([encodeWAV(resample(samples, rate, 16000), 16000)], { type: "audio/wav" }), "recording.wav");
}

/** Averages `input` at `from` Hz down to `to` Hz (speech models want 16 kHz). */
function resample(input, from, to) {
    if (from <= to) return input;
    const ratio = from / to;
    const output = new Float32Array(Math.floor(input.length / ratio));
    for (let i = 0; i < output.length; i++) {
        const start = Math.floor(i * ratio);
        const end = Math.min(input.length, Math.floor((i + 1) * ratio));
        let sum = 0;
        for (let j = start; j < end; j++) sum += input[j];
        output[i] = end > start ? sum / (end - start) : 0;
    }
    return output;
}

/** A mono 16-bit PCM WAV file of `samples` (-1...1). */
function encodeWAV(samples, rate) {
    const buffer = new ArrayBuffer(44 + samples.length * 2);
    const view = new DataView(buffer);
    const text = (offset, value) => { for (let i = 0; i < value.length; i++) view.setUint8(offset + i, value.charCodeAt(i)); };
    text(0, "RIFF");
    view.setUint32(4, 36 + samples.length * 2, true);
    text(8, "WAVE");
    text(12, "fmt ");
    view.setUint32(16, 16, true);      // the fmt chunk's size
    view.setUint16(20, 1, true);       // PCM
    view.setUint16(22, 1, true);       // mono
    view.setUint32(24, rate, true);
    view.setUint32(28, rate * 2, true); // bytes per second
    view.setUint16(32, 2, true);       // bytes per frame
    view.setUint16(34, 16, true);      // bits per sample
    text(36, "data");
    view.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
        const s = Math.max(-1, Math.min(1, samples[i]));
        view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    return buffer;
}

// ─── The page ───────────────────────────────────────────────────────────────────────

function updateComposer() {
    const busy = Boolean(state.run);
    ui.send.hidden = busy;
    ui.stop.hidden = !busy && !state.transcription;
    ui.send.disabled = !ui.modelSelect.value;
    ui.composer.dataset.state = busy ? "running" : "idle";
    ui.messages.setAttribute("aria-busy", String(busy)); // screen readers: the answer once it is whole
    ui.audioFile.disabled = Boolean(state.transcription);
    ui.record.disabled = Boolean(state.transcription);
}

function setSidebar(open) {
    ui.app.classList.toggle("sidebar-open", open);
    ui.scrim.hidden = !open;
}

function bind() {
    ui.composer.addEventListener("submit", (event) => {
        event.preventDefault();
        send();
    });
    ui.input.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.isComposing) {
            event.preventDefault();
            send();
        }
    });
    ui.stop.addEventListener("click", stop);
    document.addEventListener("keydown", (event) => {
        if (event.key !== "Escape" || ui.keyDialog.open) return;
        if (state.run || state.transcription) {
            event.preventDefault();
            stop();
        } else if (ui.app.classList.contains("sidebar-open")) {
            setSidebar(false);
        }
    });
    ui.newChat.addEventListener("click", newChat);
    ui.openSidebar.addEventListener("click", () => setSidebar(true));
    ui.closeSidebar.addEventListener("click", () => setSidebar(false));
    ui.scrim.addEventListener("click", () => setSidebar(false));
    ui.modelSelect.addEventListener("change", () => chooseModel(ui.modelSelect.value));
    ui.loadForm.addEventListener("submit", loadModel);
    ui.loadCancel.addEventListener("click", cancelLoad);
    ui.keyForm.addEventListener("submit", (event) => {
        event.preventDefault();
        const key = ui.keyInput.value.trim();
        if (key) answerKeyDialog(key);
    });
    ui.keyCancel.addEventListener("click", () => answerKeyDialog(null));
    ui.keyDialog.addEventListener("cancel", (event) => {
        event.preventDefault();
        answerKeyDialog(null);
    });
    ui.keyButton.addEventListener("click", async () => {
        const key = await askForKey(state.key ? "Enter the key to use from now on." : "Enter this server's API key.");
        if (key !== null) {
            setKey(key);
            refreshModels();
        }
    });
    ui.audioFile.addEventListener("change", () => {
        const file = ui.audioFile.files[0];
        ui.audioFile.value = "";
        if (file) transcribe(file, file.name);
    });
    ui.record.addEventListener("click", toggleRecording);

    for (const [name, field] of settingFields) {
        field.value = state.settings[name] ?? "";
        const keep = () => {
            state.settings[name] = field.value;
            saveSettings();
        };
        field.addEventListener("input", keep);
        field.addEventListener("change", keep);
    }
    window.addEventListener("storage", (event) => {
        // Another tab changed the conversations: show them, unless this tab is mid-answer.
        if (event.key === STORAGE.conversations && !state.run) {
            state.conversations = readJSON(localStorage, STORAGE.conversations, []);
            renderConversationList();
            renderMessages();
        }
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshModels(); });
}

bind();
updateKeyButton();
renderConversationList();
renderMessages();
renderModels();
refreshModels();
setInterval(() => { if (!document.hidden) refreshModels(); }, POLL_MS);
ui.input.focus();
