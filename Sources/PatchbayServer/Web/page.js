// What every part of the chat page shares: the elements it drives (by id), its state, the keys
// it keeps in the browser's storage, and a few helpers. It imports nothing.

export const STORAGE = {
    conversations: "patchbay.conversations.v1",
    current: "patchbay.current-conversation.v1",
    settings: "patchbay.settings.v1",
    key: "patchbay.api-key", // sessionStorage: gone when the tab closes
};

const $ = (id) => document.getElementById(id);
export const ui = {
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

export const state = {
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

export function readJSON(storage, key, fallback) {
    try {
        const value = JSON.parse(storage.getItem(key));
        return value ?? fallback;
    } catch {
        return fallback;
    }
}

export function uid() {
    return crypto.randomUUID ? crypto.randomUUID()
        : Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

export function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function setServerStatus(text, bad = false) {
    ui.serverStatus.textContent = text;
    ui.serverStatus.classList.toggle("bad", bad);
}

export function updateComposer() {
    const busy = Boolean(state.run);
    ui.send.hidden = busy;
    ui.stop.hidden = !busy && !state.transcription;
    ui.send.disabled = !ui.modelSelect.value;
    ui.composer.dataset.state = busy ? "running" : "idle";
    ui.messages.setAttribute("aria-busy", String(busy)); // screen readers: the answer once it is whole
    ui.audioFile.disabled = Boolean(state.transcription);
    ui.record.disabled = Boolean(state.transcription);
}

export function setSidebar(open) {
    ui.app.classList.toggle("sidebar-open", open);
    ui.scrim.hidden = !open;
}
