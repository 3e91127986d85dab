// Conversations: the chats and the settings this browser keeps in localStorage, which one is
// open, and the list of them in the sidebar.

import { STORAGE, el, readJSON, setServerStatus, setSidebar, state, ui, uid } from "./page.js";
import { renderTranscript } from "./transcript.js";

// An answer that was still arriving when the page closed ends there.
for (const conversation of state.conversations) {
    for (const message of conversation.messages || []) {
        if (message.state === "waiting" || message.state === "streaming") {
            message.state = "stopped";
            message.status = "";
        }
    }
}

// Stopping an answer is run.js's, which imports this module; app.js hands its stop over here.
let stopRun = () => {};
/** What deleting the conversation an answer is streaming into calls first. */
export function setStopRun(stop) {
    stopRun = stop;
}

export function currentConversation(create = false) {
    let conversation = state.conversations.find((c) => c.id === state.currentId);
    if (!conversation && create) {
        conversation = { id: uid(), title: "New chat", messages: [], created: Date.now(), updated: Date.now(), model: ui.modelSelect.value };
        state.conversations.push(conversation);
        selectConversation(conversation.id, { render: false });
    }
    return conversation || null;
}

let saveWarned = false;
export function saveConversations() {
    try {
        localStorage.setItem(STORAGE.conversations, JSON.stringify(state.conversations));
    } catch (error) {
        if (!saveWarned) setServerStatus(`Conversations could not be saved in this browser: ${error.message}`, true);
        saveWarned = true;
    }
}

let saveTimer = null;
export function saveConversationsSoon() {
    if (saveTimer) return;
    saveTimer = setTimeout(() => { saveTimer = null; saveConversations(); }, 700);
}

/** Re-reads the conversations another tab saved. */
export function reloadConversations() {
    state.conversations = readJSON(localStorage, STORAGE.conversations, []);
}

export function saveSettings() {
    try {
        localStorage.setItem(STORAGE.settings, JSON.stringify(state.settings));
    } catch { /* a full storage keeps the settings for this page only */ }
}

export function selectConversation(id, { render = true } = {}) {
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

export function newChat() {
    selectConversation(null);
    ui.input.focus();
}

function deleteConversation(id) {
    const conversation = state.conversations.find((c) => c.id === id);
    if (!conversation || !confirm(`Delete "${conversation.title}"?`)) return;
    if (state.run?.conversation === conversation) stopRun();
    state.conversations = state.conversations.filter((c) => c !== conversation);
    saveConversations();
    if (state.currentId === id) selectConversation(null);
    else renderConversationList();
}

export function titleFrom(text) {
    const line = text.replace(/\s+/g, " ").trim();
    return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

export function renderConversationList() {
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

/** The open conversation's messages, in the transcript. */
export function renderMessages() {
    renderTranscript(currentConversation());
}
