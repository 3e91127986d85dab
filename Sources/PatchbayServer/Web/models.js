// Models: what the server has loaded (/api/inference/status, polled), loading one with its
// progress bar, cancelling a load, unloading, and the model menu above the transcript.

import { api, errorFrom } from "./api.js";
import { currentConversation, saveConversations, saveSettings } from "./conversations.js";
import { el, setServerStatus, sleep, state, ui, updateComposer } from "./page.js";

const PROGRESS_POLL_MS = 150;

const capabilities = (model) => model.capabilities || [];
export const chatModels = () => state.models.filter((m) => capabilities(m).includes("chat"));

export function transcriptionModel() {
    const able = state.models.filter((m) => capabilities(m).includes("transcription"));
    return able.find((m) => !capabilities(m).includes("chat")) || able[0] || null;
}

let refreshing = null;
export function refreshModels() {
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

export function renderModels() {
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

export function showLoadError(message) {
    ui.loadError.textContent = message;
    ui.loadError.hidden = !message;
}

let hideLoadStatus = null;

export async function loadModel(event) {
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

export async function cancelLoad() {
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

export function chooseModel(id) {
    state.settings.model = id;
    saveSettings();
    const conversation = currentConversation();
    if (conversation) {
        conversation.model = id;
        saveConversations();
    }
    updateComposer();
}
