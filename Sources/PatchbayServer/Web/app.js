// Patchbay's chat page. It is an ordinary client of the server's public API: it lists and
// loads models through /api/inference, chats through /v1/chat/completions (streamed), stops a
// run through /api/inference/cancel, transcribes through /v1/audio/transcriptions, and sends
// the same API key any client would. Model output reaches the page only as text
// (markdown.js builds DOM nodes; nothing here parses HTML).
//
// This module wires the others to the page's controls and starts it:
//   page.js           the elements, the shared state, the storage keys, small helpers
//   api.js            fetch with the key, error envelopes, the key dialog, streamed events
//   models.js         the models list, load (with progress), cancel, unload, the model menu
//   conversations.js  the conversations and settings kept in this browser, the sidebar list
//   transcript.js     the messages as elements, redrawn as an answer streams
//   run.js            one answer: send, stream into the transcript, stop
//   audio.js          a file or the microphone, transcribed into the message box

import { answerKeyDialog, askForKey, setKey, updateKeyButton } from "./api.js";
import { toggleRecording, transcribe } from "./audio.js";
import {
    newChat, reloadConversations, renderConversationList, renderMessages, saveSettings, setStopRun,
} from "./conversations.js";
import { cancelLoad, chooseModel, loadModel, refreshModels, renderModels } from "./models.js";
import { STORAGE, setSidebar, state, ui } from "./page.js";
import { send, stop } from "./run.js";

const POLL_MS = 3000;

const settingFields = [
    ["system", ui.systemPrompt], ["temperature", ui.temperature], ["topP", ui.topP], ["topK", ui.topK],
    ["maxTokens", ui.maxTokens], ["thinking", ui.thinking], ["tools", ui.tools],
];

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
            reloadConversations();
            renderConversationList();
            renderMessages();
        }
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshModels(); });
}

setStopRun(stop); // deleting the conversation being answered stops the answer first
bind();
updateKeyButton();
renderConversationList();
renderMessages();
renderModels();
refreshModels();
setInterval(() => { if (!document.hidden) refreshModels(); }, POLL_MS);
ui.input.focus();
