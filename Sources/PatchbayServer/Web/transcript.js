// The transcript: a conversation's messages as elements, each redrawn from its message as an
// answer streams in. Model output becomes DOM nodes through markdown.js, never parsed HTML.

import { renderMarkdown } from "./markdown.js";
import { el, ui } from "./page.js";

const views = new WeakMap(); // message -> its element and the function that redraws it

/** Shows `conversation` (or the welcome, for none or an empty one), scrolled to its end. */
export function renderTranscript(conversation) {
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

export function redraw(message) {
    views.get(message)?.update();
}

let scheduled = new Set();
export function redrawSoon(message) {
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
