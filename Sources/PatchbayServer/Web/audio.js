// Audio: a file or the microphone, transcribed by /v1/audio/transcriptions into the message box.

import { api, errorFrom } from "./api.js";
import { transcriptionModel } from "./models.js";
import { state, ui, uid, updateComposer } from "./page.js";

const MAX_RECORDING_MS = 5 * 60 * 1000;

export async function transcribe(blob, fileName) {
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

export function stopTranscription() {
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

export async function toggleRecording() {
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
