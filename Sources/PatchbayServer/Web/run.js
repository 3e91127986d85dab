// A run: one answer. Send the conversation to /v1/chat/completions (streamed, with a
// cancel_id), wait for the model first if this page is still loading it, stream the answer
// into its message with the prompt's progress and the speed, and stop it.

import { APIError, api, errorFrom, readEvents } from "./api.js";
import { stopTranscription } from "./audio.js";
import {
    currentConversation, renderConversationList, renderMessages, saveConversations, saveConversationsSoon, titleFrom,
} from "./conversations.js";
import { chatModels, refreshModels, showLoadError } from "./models.js";
import { setSidebar, state, ui, uid, updateComposer } from "./page.js";
import { redraw, redrawSoon } from "./transcript.js";

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

export async function send() {
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
    const ended = await readEvents(response, (chunk) => takeChunk(run, chunk));
    if (!ended && !run.stopped) throw new Error("The answer ended early: the connection closed.");
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
 *  the connection open, and also for a request not sent yet) and aborts the request. It stops
 *  a transcription in flight too. */
export function stop() {
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
