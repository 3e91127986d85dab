//! The Patchbay Rust template: a complete backend plugin in about 400 lines of std-only Rust.
//! Copy this folder to start your own backend (docs/writing-a-backend.md walks through it).
//!
//! The "engine" is deterministic, like the C reference plugin's: a model is a small text
//! file ending in `.rsmodel` with `key=value` lines,
//!
//!   reply=Hello from Rust.   the reply, streamed word by word (absent: echo the last user message)
//!   token_delay_ms=20        time per word (default 0)
//!   context_length=4096      what model_info reports; longer prompts are refused
//!
//! What the host calls, and on which thread (the annotations of patchbay.h):
//!   pb_plugin_entry  once, when the library is opened: returns the table below
//!   load             [blocking]      reads the model file, reports progress
//!   model_info       [non-blocking]  describes the model (only the fields the host has room for)
//!   run_create       [non-blocking]  parses one request; no engine work yet
//!   run_execute      [blocking]      streams the words, then usage, then exactly one FINISH
//!   run_cancel       [any-thread]    sets a flag and wakes run_execute; idempotent
//!   run_destroy, unload, shutdown    free what the matching call made
//!
//! Rules this file keeps (see the top of patchbay.h):
//!  - Nothing crosses the boundary to be freed by the other side: strings the host passes in
//!    are borrowed for the call, strings in an event live only during on_event.
//!  - Every struct the host hands over is read (or written) only inside its `struct_size`:
//!    `pb_has!` is the header's PB_HAS.
//!  - A panic must never reach the host: this crate builds with panic = "abort", and the
//!    code below returns errors instead of panicking.

mod abi;
mod json;

use abi::*;
use json::Json;
use std::ffi::{c_char, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

// ─── Who this plugin is: change these for your backend ────────────────────────────────

const NAME: &CStr = c"rust-template"; // unique among the host's plugins; what `backend` selects
const VERSION: &CStr = c"0.1.0";
const DESCRIPTION: &CStr = c"Rust template: streams a scripted reply (or an echo) word by word";
const MODEL_FORMATS: &CStr = c"rsmodel"; // the file extensions it claims, comma-separated
const ARCHITECTURE: &CStr = c"rust-template"; // model_info's architecture
/// How many runs of one model may decode at once (model_info's parallel_slots): the host
/// queues the rest. Each run here decodes on its own host thread, so any number would do.
const PARALLEL_SLOTS: i32 = 4;

// ─── The host ─────────────────────────────────────────────────────────────────────────

/// The host's table, kept from pb_plugin_entry (it stays valid until the process ends).
static HOST: AtomicPtr<pb_host_api> = AtomicPtr::new(ptr::null_mut());

/// Writes a line to the host's log under this plugin's name. [any-thread]
fn log(level: pb_log_level, message: &str) {
    let host = HOST.load(Ordering::Acquire);
    if host.is_null() || !pb_has!(host, pb_host_api, log) {
        return;
    }
    let Ok(line) = CString::new(message.replace('\0', " ")) else { return };
    if let Some(log) = unsafe { (*host).log } {
        unsafe { log((*host).context, level, line.as_ptr()) };
    }
}

/// Copies `message` into the host's error buffer, cut to fit, NUL-terminated.
unsafe fn write_error(error: *mut c_char, error_size: usize, message: &str) {
    if error.is_null() || error_size == 0 {
        return;
    }
    let mut n = message.len().min(error_size - 1);
    while !message.is_char_boundary(n) {
        n -= 1; // never cut a UTF-8 sequence in half
    }
    ptr::copy_nonoverlapping(message.as_ptr(), error as *mut u8, n);
    *error.add(n) = 0;
}

/// A NUL-terminated UTF-8 argument, borrowed for the duration of the call.
unsafe fn borrowed_str<'a>(text: *const c_char) -> Option<&'a str> {
    if text.is_null() { None } else { CStr::from_ptr(text).to_str().ok() }
}

/// An error a call returns: its status and the message for the host's buffer.
type Failure = (pb_status, String);

// ─── The model ────────────────────────────────────────────────────────────────────────

struct Model {
    path: String,
    reply: Option<String>,
    token_delay: Duration,
    context_length: i64,
    size_bytes: u64,
}

impl Model {
    /// Reads a `.rsmodel` file: `key=value` lines, `#` comments, unknown keys ignored.
    fn open(path: &str) -> Result<Model, Failure> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let status = if e.kind() == std::io::ErrorKind::NotFound { PB_ERR_NOT_FOUND } else { PB_ERR_LOAD_FAILED };
            (status, format!("cannot read {path}: {e}"))
        })?;
        let mut model = Model {
            path: path.to_string(),
            reply: None,
            token_delay: Duration::ZERO,
            context_length: 4096,
            size_bytes: text.len() as u64,
        };
        for (number, line) in text.lines().enumerate() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let bad = |what: &str| (PB_ERR_LOAD_FAILED, format!("{path}:{}: {key} must be {what}", number + 1));
            match key.trim() {
                k if k.starts_with('#') => {}
                "reply" => model.reply = Some(value.to_string()),
                "token_delay_ms" => {
                    model.token_delay = Duration::from_millis(value.trim().parse().map_err(|_| bad("a whole number"))?)
                }
                "context_length" => {
                    model.context_length = value.trim().parse().map_err(|_| bad("a whole number"))?;
                }
                _ => {}
            }
        }
        Ok(model)
    }
}

// ─── A run ────────────────────────────────────────────────────────────────────────────

struct Run {
    words: Vec<String>, // the reply, as tokens
    max_tokens: i64,
    prompt_tokens: i64,
    token_delay: Duration,
    wall_limit: Option<Duration>,
    request_id: String,
    /// Set by run_cancel from any thread; the condvar cuts run_execute's sleeps short.
    cancelled: Mutex<bool>,
    wake: Condvar,
}

impl Run {
    fn cancel(&self) {
        *self.cancelled.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Waits up to `time`, or less when cancelled. Returns whether the run is cancelled.
    fn sleep_unless_cancelled(&self, time: Duration) -> bool {
        let flag = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
        let (flag, _) = self.wake.wait_timeout_while(flag, time, |cancelled| !*cancelled).unwrap_or_else(|e| e.into_inner());
        *flag
    }
}

/// Splits text into word tokens, each keeping the spaces after it, so that the tokens
/// joined give back the text exactly. (Splitting at spaces never splits a UTF-8 sequence.)
fn tokens(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut start = 0;
    let (mut in_space, mut seen_word) = (false, false);
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            in_space = true;
        } else {
            if in_space && seen_word {
                words.push(text[start..i].to_string()); // a word and the spaces after it
                start = i;
            }
            in_space = false;
            seen_word = true;
        }
    }
    if start < text.len() {
        words.push(text[start..].to_string());
    }
    words
}

/// The text of a message's content: a string, or the text parts of an array.
fn content_text(content: Option<&Json>) -> String {
    match content {
        Some(Json::String(text)) => text.clone(),
        Some(Json::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Json::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Reads a normalized request (the top of patchbay.h) into a run. No engine work here.
fn prepare_run(model: &Model, request_json: &str) -> Result<Run, Failure> {
    let invalid = |message: &str| (PB_ERR_INVALID_REQUEST, message.to_string());
    let request = Json::parse(request_json).ok_or_else(|| invalid("the request is not valid JSON"))?;
    // What the engine "reads": every message (or the prompt). The echo answers the last user message.
    let (prompt, last_user) = match request.get("kind").and_then(Json::as_str) {
        Some("chat") => {
            let messages = request.get("messages").map(Json::as_array).unwrap_or_default();
            let texts: Vec<String> = messages.iter().map(|m| content_text(m.get("content"))).collect();
            let last_user = messages
                .iter()
                .rposition(|m| m.get("role").and_then(Json::as_str) == Some("user"))
                .map(|i| texts[i].clone());
            (texts.join(" "), last_user.unwrap_or_default())
        }
        Some("completion") => {
            let prompt = request.get("prompt").and_then(Json::as_str).unwrap_or("").to_string();
            (prompt.clone(), prompt)
        }
        Some(other) => return Err((PB_ERR_UNSUPPORTED, format!("this backend does not serve requests of kind '{other}'"))),
        None => return Err(invalid("the request has no kind")),
    };
    let prompt_tokens = tokens(&prompt).len() as i64;
    if prompt_tokens > model.context_length {
        return Err((
            PB_ERR_CONTEXT_LENGTH_EXCEEDED,
            format!("the prompt ({prompt_tokens} tokens) exceeds the context ({} tokens)", model.context_length),
        ));
    }
    // THE ENGINE: what this template "generates", worked out up front. Your backend's own
    // engine goes here and in run_execute's loop (which would decode one token per step).
    let reply = match &model.reply {
        Some(reply) => reply.clone(),
        None if last_user.trim().is_empty() => "(nothing to echo)".to_string(),
        None => last_user,
    };
    let number = |key: &str| request.get(key).and_then(Json::as_f64);
    Ok(Run {
        words: tokens(&reply),
        // Always present (the host applies its default); the context bounds it anyway.
        max_tokens: number("max_tokens").map_or(model.context_length, |n| n as i64),
        prompt_tokens,
        token_delay: model.token_delay,
        wall_limit: number("max_wall_ms").filter(|ms| *ms > 0.0).map(|ms| Duration::from_millis(ms as u64)),
        request_id: request.get("request_id").and_then(Json::as_str).unwrap_or("-").to_string(),
        cancelled: Mutex::new(false),
        wake: Condvar::new(),
    })
}

/// The host's event sink, borrowed for the duration of run_execute.
struct Sink<'a>(&'a pb_event_sink);

impl Sink<'_> {
    fn send(&self, event: &pb_event) {
        let sink: *const pb_event_sink = self.0;
        if pb_has!(sink, pb_event_sink, on_event) {
            if let Some(on_event) = self.0.on_event {
                // May block while the client is behind (this plugin does not set
                // PB_FLAG_BATCHING); a cancel releases it. `event` and its text only need to
                // live until on_event returns: the host copies what it keeps.
                unsafe { on_event(self.0.context, event) };
            }
        }
    }

    fn content(&self, text: &str) {
        let mut event = pb_event::new(PB_EVENT_CONTENT_DELTA);
        event.text = text.as_ptr() as *const c_char; // need not be NUL-terminated: text_len says
        event.text_len = text.len();
        self.send(&event);
    }

    fn usage(&self, prompt_tokens: i64, completion_tokens: i64) {
        let mut event = pb_event::new(PB_EVENT_USAGE);
        event.prompt_tokens = prompt_tokens;
        event.completion_tokens = completion_tokens;
        self.send(&event);
    }

    /// The terminal event. Nothing may be sent after it.
    fn finish(&self, reason: pb_finish_reason) {
        let mut event = pb_event::new(PB_EVENT_FINISH);
        event.finish_reason = reason;
        self.send(&event);
    }
}

// ─── The table's functions ────────────────────────────────────────────────────────────
// Each is `unsafe extern "C"`: the host calls it with raw pointers that the header
// promises are valid. The opaque pb_model / pb_run handles are our Box<Model> / Box<Run>.

unsafe extern "C" fn load(
    request_json: *const c_char,
    callbacks: *const pb_load_callbacks,
    out_model: *mut *mut pb_model,
    error: *mut c_char,
    error_size: usize,
) -> pb_status {
    let request = borrowed_str(request_json).and_then(Json::parse);
    let Some(path) = request.as_ref().and_then(|r| r.get("model_path")).and_then(Json::as_str) else {
        write_error(error, error_size, "the load request has no model_path");
        return PB_ERR_INVALID_REQUEST;
    };
    let model = match Model::open(path) {
        Ok(model) => model,
        Err((status, message)) => {
            write_error(error, error_size, &message);
            return status;
        }
    };
    // Progress: a real engine reports at least every 100 ms while it reads weights. A
    // non-zero answer means the host cancelled the load.
    if !callbacks.is_null() && pb_has!(callbacks, pb_load_callbacks, progress) {
        if let Some(progress) = (*callbacks).progress {
            if progress((*callbacks).context, c"ready".as_ptr(), model.size_bytes, model.size_bytes) != 0 {
                write_error(error, error_size, "the load was cancelled");
                return PB_ERR_CANCELLED;
            }
        }
    }
    log(PB_LOG_INFO, &format!("loaded {}", model.path));
    *out_model = Box::into_raw(Box::new(model)) as *mut pb_model;
    PB_OK
}

unsafe extern "C" fn model_info(model: *mut pb_model, info: *mut pb_model_info) {
    let model = &*(model as *const Model);
    // The host zeroed `info` and declared its size: a 1.0 host's struct ends after
    // `capabilities`, and writing past it would scribble on the host's memory.
    if pb_has!(info, pb_model_info, context_length) {
        (*info).context_length = model.context_length;
    }
    if pb_has!(info, pb_model_info, capabilities) {
        (*info).capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION;
    }
    if pb_has!(info, pb_model_info, parallel_slots) {
        (*info).parallel_slots = PARALLEL_SLOTS;
    }
    if pb_has!(info, pb_model_info, training_context_length) {
        (*info).training_context_length = model.context_length;
    }
    if pb_has!(info, pb_model_info, size_bytes) {
        (*info).size_bytes = model.size_bytes;
    }
    if pb_has!(info, pb_model_info, architecture) {
        (*info).architecture = ARCHITECTURE.as_ptr(); // static: valid until unload and beyond
    }
}

unsafe extern "C" fn unload(model: *mut pb_model) {
    // The host calls this only once every run of the model was destroyed.
    let model = Box::from_raw(model as *mut Model);
    log(PB_LOG_INFO, &format!("unloaded {}", model.path));
}

unsafe extern "C" fn run_create(
    model: *mut pb_model,
    request_json: *const c_char,
    out_run: *mut *mut pb_run,
    error: *mut c_char,
    error_size: usize,
) -> pb_status {
    let model = &*(model as *const Model);
    let Some(request_json) = borrowed_str(request_json) else {
        write_error(error, error_size, "the request is not UTF-8");
        return PB_ERR_INVALID_REQUEST;
    };
    match prepare_run(model, request_json) {
        Ok(run) => {
            // From here on run_cancel may be called on it, from any thread.
            *out_run = Box::into_raw(Box::new(run)) as *mut pb_run;
            PB_OK
        }
        Err((status, message)) => {
            write_error(error, error_size, &message);
            status
        }
    }
}

unsafe extern "C" fn run_execute(run: *mut pb_run, sink: *const pb_event_sink) {
    // Shared, not mutable: run_cancel may read the same Run from another thread meanwhile.
    let run = &*(run as *const Run);
    let sink = Sink(&*sink);
    let started = Instant::now();
    let deadline = run.wall_limit.map(|limit| started + limit);
    let mut produced: i64 = 0;
    // The generation loop: one word per step, cancel checked before every word.
    let finish = loop {
        if produced as usize == run.words.len() {
            break PB_FINISH_STOP; // the reply is complete
        }
        if produced >= run.max_tokens {
            break PB_FINISH_LENGTH;
        }
        // Pace the word; a cancel (also one that came before run_execute) ends the wait at once.
        let mut wait = run.token_delay;
        if let Some(deadline) = deadline {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        if run.sleep_unless_cancelled(wait) {
            break PB_FINISH_CANCELLED;
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break PB_FINISH_TIME_LIMIT;
        }
        sink.content(&run.words[produced as usize]);
        produced += 1;
    };
    // The end of every run: usage, then exactly one terminal event, whatever happened.
    sink.usage(run.prompt_tokens, produced);
    let why = match finish {
        PB_FINISH_STOP => "stop",
        PB_FINISH_LENGTH => "length",
        PB_FINISH_CANCELLED => "cancelled",
        _ => "time limit",
    };
    log(PB_LOG_INFO, &format!("request {}: run ended ({why}) after {produced} tokens", run.request_id));
    sink.finish(finish);
}

unsafe extern "C" fn run_cancel(run: *mut pb_run) {
    // [non-blocking][any-thread], idempotent: before, during or after run_execute.
    (*(run as *const Run)).cancel();
}

unsafe extern "C" fn run_destroy(run: *mut pb_run) {
    drop(Box::from_raw(run as *mut Run));
}

unsafe extern "C" fn shutdown() {
    // ABI 1.1, optional: the host exits. This plugin has no threads or global state to stop.
    log(PB_LOG_INFO, &format!("{} plugin shut down", NAME.to_string_lossy()));
}

// ─── The table and the entry point ────────────────────────────────────────────────────

static PLUGIN_API: pb_plugin_api = pb_plugin_api {
    struct_size: std::mem::size_of::<pb_plugin_api>() as u32,
    abi_major: PB_ABI_VERSION_MAJOR,
    abi_minor: PB_ABI_VERSION_MINOR,
    name: NAME.as_ptr(),
    version: VERSION.as_ptr(),
    description: DESCRIPTION.as_ptr(),
    model_formats: MODEL_FORMATS.as_ptr(),
    capabilities: PB_CAP_CHAT | PB_CAP_COMPLETION,
    load: Some(load),
    model_info: Some(model_info),
    unload: Some(unload),
    run_create: Some(run_create),
    run_execute: Some(run_execute),
    run_cancel: Some(run_cancel),
    run_destroy: Some(run_destroy),
    count_tokens: None, // optional (PB_CAP_TOKENIZE)
    embed: None,        // optional (PB_CAP_EMBEDDINGS)
    // ── ABI 1.1 ──
    flags: 0,     // not PB_FLAG_BATCHING: each run decodes on the host thread that executes it
    probe: None,  // without probe the host picks this plugin by the file's extension
    run_create_with_inputs: None,
    shutdown: Some(shutdown),
};

/// The one exported symbol. [non-blocking] Called once, right after the library is opened.
#[no_mangle]
pub unsafe extern "C" fn pb_plugin_entry(host: *const pb_host_api) -> *const pb_plugin_api {
    // Only struct_size, abi_major and abi_minor keep their place across majors, so a host
    // of another major is declined before anything else of its table is read.
    if host.is_null() || (*host).abi_major != PB_ABI_VERSION_MAJOR {
        return ptr::null();
    }
    HOST.store(host as *mut pb_host_api, Ordering::Release);
    // This plugin sends only what ABI 1.0 already had (content, usage, finish), so it works
    // with any 1.x host. A plugin that sends something a minor added checks first, e.g.
    // `(*host).abi_minor >= 1` before a PB_EVENT_PROGRESS, and sends the nearest 1.0 value
    // (PB_ERR_ENGINE_UNAVAILABLE for PB_ERR_BUSY, ...) to an older host.
    &PLUGIN_API
}

#[cfg(test)]
mod tests {
    use super::tokens;

    #[test]
    fn tokens_give_back_the_text() {
        for text in ["Hello there, world", "  lead and trail  ", "one", "", "héllo wörld 😀 ok"] {
            assert_eq!(tokens(text).concat(), text);
        }
        assert_eq!(tokens("a b  c"), ["a ", "b  ", "c"]);
        assert_eq!(tokens("  lead"), ["  lead"]);
    }
}
