//! `#[repr(C)]` mirrors of what this plugin uses from `patchbay.h`, field for field and in
//! the header's order, under the header's own names (so you can read the two side by side).
//! `build.rs` compiles a small C program against the real header and checks at compile time
//! that every offset and size here matches it.
//!
//! Versioning (the top of patchbay.h): every struct starts with `struct_size`, the sizeof its
//! WRITER was compiled with. Read (or, for a struct the host hands you to fill, write) a
//! field only when it lies inside that size: that is `pb_has!` below, Rust's `PB_HAS`.
#![allow(non_camel_case_types, dead_code)]

use std::ffi::{c_char, c_void};

pub const PB_ABI_VERSION_MAJOR: u16 = 1;
/// The minor version these mirrors are written against. A newer 1.x header only appends,
/// so these mirrors stay valid for it (build.rs checks that too).
pub const PB_ABI_VERSION_MINOR: u16 = 1;

// ─── Status codes (pb_status) ─────────────────────────────────────────────────────────
pub type pb_status = i32;
pub const PB_OK: pb_status = 0;
pub const PB_ERR_INVALID_REQUEST: pb_status = 1;
pub const PB_ERR_NOT_FOUND: pb_status = 2;
pub const PB_ERR_UNSUPPORTED: pb_status = 3;
pub const PB_ERR_LOAD_FAILED: pb_status = 4;
pub const PB_ERR_CANCELLED: pb_status = 5;
pub const PB_ERR_CONTEXT_LENGTH_EXCEEDED: pb_status = 6;
pub const PB_ERR_ENGINE_UNAVAILABLE: pb_status = 7;
pub const PB_ERR_OUT_OF_MEMORY: pb_status = 8;
pub const PB_ERR_INTERNAL: pb_status = 9;
pub const PB_ERR_BUSY: pb_status = 10; // 1.1: send only to a host whose abi_minor >= 1

// ─── Capabilities (pb_plugin_api.capabilities, pb_model_info.capabilities) ─────────────
pub const PB_CAP_CHAT: u64 = 1 << 0;
pub const PB_CAP_COMPLETION: u64 = 1 << 1;

// ─── Events ───────────────────────────────────────────────────────────────────────────
pub type pb_event_type = i32;
pub const PB_EVENT_CONTENT_DELTA: pb_event_type = 1;
pub const PB_EVENT_USAGE: pb_event_type = 4;
pub const PB_EVENT_FINISH: pb_event_type = 6; // terminal
pub const PB_EVENT_ERROR: pb_event_type = 7; // terminal

pub type pb_finish_reason = i32;
pub const PB_FINISH_STOP: pb_finish_reason = 1;
pub const PB_FINISH_LENGTH: pb_finish_reason = 2;
pub const PB_FINISH_CANCELLED: pb_finish_reason = 4;
pub const PB_FINISH_TIME_LIMIT: pb_finish_reason = 5;

pub type pb_log_level = i32;
pub const PB_LOG_DEBUG: pb_log_level = 0;
pub const PB_LOG_INFO: pb_log_level = 1;
pub const PB_LOG_WARNING: pb_log_level = 2;
pub const PB_LOG_ERROR: pb_log_level = 3;

/// Opaque handles: the host only stores and passes back these pointers. This plugin's
/// pointers really point at its own `Model` and `Run` (src/lib.rs).
#[repr(C)]
pub struct pb_model {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct pb_run {
    _opaque: [u8; 0],
}

/// One event. The plugin writes it: `pb_event::new` sets `struct_size` to this size and
/// zeroes every field, as the header asks for the fields an event type does not use.
#[repr(C)]
pub struct pb_event {
    pub struct_size: u32,
    pub r#type: pb_event_type,
    pub text: *const c_char,
    pub text_len: usize,
    pub tool_index: i32,
    pub tool_call_id: *const c_char,
    pub tool_name: *const c_char,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub prompt_ms: f64,
    pub predicted_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_per_second: f64,
    pub finish_reason: pb_finish_reason,
    pub error_code: pb_status,
    // ── ABI 1.1 ──
    pub retry_after_ms: u32,
    pub progress_processed: i64,
    pub progress_total: i64,
    pub progress_cached: i64,
    pub segment_start_ms: i64,
    pub segment_end_ms: i64,
    pub language_probability: f64,
}

impl pb_event {
    pub fn new(r#type: pb_event_type) -> pb_event {
        // All zeroes is a valid pb_event: null pointers and zero numbers.
        let mut event: pb_event = unsafe { std::mem::zeroed() };
        event.struct_size = std::mem::size_of::<pb_event>() as u32;
        event.r#type = r#type;
        event
    }
}

/// Where a run's events go (the host writes it; valid during run_execute).
#[repr(C)]
pub struct pb_event_sink {
    pub struct_size: u32,
    pub context: *mut c_void,
    pub on_event: Option<unsafe extern "C" fn(context: *mut c_void, event: *const pb_event)>,
    // ── ABI 1.1 ──
    pub backlog: Option<unsafe extern "C" fn(context: *mut c_void) -> u32>,
    pub backlog_limit: u32,
}

/// A named byte buffer beside the JSON (ABI 1.1; only for run_create_with_inputs, which
/// this template does not implement).
#[repr(C)]
pub struct pb_byte_input {
    pub struct_size: u32,
    pub name: *const c_char,
    pub media_type: *const c_char,
    pub data: *const u8,
    pub size: usize,
}

/// Load progress callbacks (the host writes it; valid during load).
#[repr(C)]
pub struct pb_load_callbacks {
    pub struct_size: u32,
    pub context: *mut c_void,
    pub progress: Option<
        unsafe extern "C" fn(context: *mut c_void, phase: *const c_char, loaded: u64, total: u64) -> i32,
    >,
}

/// What the host learns about a model. The HOST allocates and zeroes it and sets
/// struct_size; the plugin writes only the fields inside that size.
#[repr(C)]
pub struct pb_model_info {
    pub struct_size: u32,
    pub context_length: i64,
    pub capabilities: u64,
    // ── ABI 1.1 ──
    pub parallel_slots: i32,
    pub embedding_dimensions: i64,
    pub training_context_length: i64,
    pub parameter_count: i64,
    pub size_bytes: u64,
    pub architecture: *const c_char,
}

/// The host's table (host → plugin), valid until the process ends.
#[repr(C)]
pub struct pb_host_api {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub context: *mut c_void,
    pub log: Option<unsafe extern "C" fn(context: *mut c_void, level: pb_log_level, message: *const c_char)>,
}

/// The plugin's table (plugin → host). `Option<fn>` is a nullable C function pointer.
#[repr(C)]
pub struct pb_plugin_api {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub name: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,
    pub model_formats: *const c_char,
    pub capabilities: u64,
    pub load: Option<
        unsafe extern "C" fn(
            request_json: *const c_char,
            callbacks: *const pb_load_callbacks,
            out_model: *mut *mut pb_model,
            error: *mut c_char,
            error_size: usize,
        ) -> pb_status,
    >,
    pub model_info: Option<unsafe extern "C" fn(model: *mut pb_model, info: *mut pb_model_info)>,
    pub unload: Option<unsafe extern "C" fn(model: *mut pb_model)>,
    pub run_create: Option<
        unsafe extern "C" fn(
            model: *mut pb_model,
            request_json: *const c_char,
            out_run: *mut *mut pb_run,
            error: *mut c_char,
            error_size: usize,
        ) -> pb_status,
    >,
    pub run_execute: Option<unsafe extern "C" fn(run: *mut pb_run, sink: *const pb_event_sink)>,
    pub run_cancel: Option<unsafe extern "C" fn(run: *mut pb_run)>,
    pub run_destroy: Option<unsafe extern "C" fn(run: *mut pb_run)>,
    pub count_tokens: Option<
        unsafe extern "C" fn(
            model: *mut pb_model,
            request_json: *const c_char,
            out_count: *mut i64,
            error: *mut c_char,
            error_size: usize,
        ) -> pb_status,
    >,
    pub embed: Option<
        unsafe extern "C" fn(
            model: *mut pb_model,
            text: *const c_char,
            text_len: usize,
            out: *mut f32,
            out_capacity: usize,
            out_dimensions: *mut usize,
            error: *mut c_char,
            error_size: usize,
        ) -> pb_status,
    >,
    // ── ABI 1.1 ──
    pub flags: u64,
    pub probe: Option<unsafe extern "C" fn(model_path: *const c_char, detail: *mut c_char, detail_size: usize) -> i32>,
    pub run_create_with_inputs: Option<
        unsafe extern "C" fn(
            model: *mut pb_model,
            request_json: *const c_char,
            inputs: *const *const pb_byte_input,
            input_count: usize,
            out_run: *mut *mut pb_run,
            error: *mut c_char,
            error_size: usize,
        ) -> pb_status,
    >,
    pub shutdown: Option<unsafe extern "C" fn()>,
}

// The table is a `static` that holds raw pointers to static strings. Nothing ever writes
// to it, so sharing it between threads is safe; Rust needs to be told.
unsafe impl Sync for pb_plugin_api {}

/// The size of the field a closure points at, without touching any memory (for `pb_has!`).
pub fn field_size<S, F>(_field: fn(&S) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// `PB_HAS(ptr, field)`: whether `field` lies inside the `struct_size` that the struct's
/// writer declared. `pb_has!(info, pb_model_info, parallel_slots)`; `info` is a raw pointer.
/// Reading or writing a field outside it would touch memory the other side never had.
macro_rules! pb_has {
    ($ptr:expr, $ty:ident, $field:ident) => {{
        let ptr: *const $ty = $ptr as *const $ty;
        let declared = unsafe { (*ptr).struct_size } as usize;
        declared >= ::core::mem::offset_of!($ty, $field) + $crate::abi::field_size(|s: &$ty| &s.$field)
    }};
}
pub(crate) use pb_has;

// The layout check build.rs generated from patchbay.h: compile-time asserts on every
// offset and size above (empty when no C compiler was found).
include!(concat!(env!("OUT_DIR"), "/layout_check.rs"));
