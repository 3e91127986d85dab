// The server's API as the page calls it: fetch with the key (asking for one on a 401), the
// server's error envelopes as APIError, and the events of a streamed answer.

import { STORAGE, state, ui } from "./page.js";

export class APIError extends Error {
    constructor(status, message, code) {
        super(message);
        this.status = status;
        this.code = code;
    }
}

export async function errorFrom(response) {
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
export async function api(path, { method = "GET", json, form, signal, interactive = true } = {}) {
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

/** Reads a text/event-stream answer: each event's data, parsed as JSON, goes to `onEvent`; a
 *  comment (the server's keep-alive) and data that is not JSON are skipped. True when the
 *  stream ended with [DONE], false when the connection closed before it. */
export async function readEvents(response, onEvent) {
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
            if (data === "[DONE]") return true;
            let chunk;
            try {
                chunk = JSON.parse(data);
            } catch {
                continue;
            }
            onEvent(chunk);
        }
    }
    return false;
}

// ─── The key ────────────────────────────────────────────────────────────────────────

function keyReason(error) {
    if (/admin key/i.test(error.message)) {
        return "This action needs the admin key (the server was started with --admin-key).";
    }
    return state.key ? "The server refused this key. Enter the right one."
        : "This server needs an API key (it was started with --api-key).";
}

let keyRequest = null; // {promise, resolve}: one dialog for every request that got a 401

export function askForKey(reason) {
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

export function answerKeyDialog(value) {
    const request = keyRequest;
    keyRequest = null;
    if (ui.keyDialog.open) ui.keyDialog.close();
    request?.resolve(value);
}

export function setKey(key) {
    state.key = key;
    state.keyDeclined = false;
    if (key) sessionStorage.setItem(STORAGE.key, key);
    else sessionStorage.removeItem(STORAGE.key);
    updateKeyButton();
}

export function updateKeyButton() {
    ui.keyButton.hidden = !(state.key || state.keyDeclined);
    ui.keyButton.textContent = state.key ? "Change key" : "Enter API key";
}
