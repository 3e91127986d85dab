//! Checks the `#[repr(C)]` mirrors in src/abi.rs against the real patchbay.h, so a typo in
//! a mirror is a compile error instead of a crash in the host. It compiles a tiny C program
//! against the header with the system C compiler, runs it to learn every offset, size and
//! constant, and writes compile-time asserts that src/abi.rs includes.
//!
//! The header: $PATCHBAY_H, else ./patchbay.h next to Cargo.toml, else the one in the
//! Patchbay repository (../../Sources/CPatchbayABI/include/patchbay.h). Without a header or
//! a C compiler the plugin still builds, with a warning that nothing was checked.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every struct src/abi.rs mirrors, with its fields in the header's order.
const STRUCTS: &[(&str, &[&str])] = &[
    ("pb_event", &["struct_size", "type", "text", "text_len", "tool_index", "tool_call_id", "tool_name",
        "prompt_tokens", "completion_tokens", "cached_tokens", "prompt_ms", "predicted_ms", "prompt_per_second",
        "predicted_per_second", "finish_reason", "error_code", "retry_after_ms", "progress_processed",
        "progress_total", "progress_cached", "segment_start_ms", "segment_end_ms", "language_probability"]),
    ("pb_event_sink", &["struct_size", "context", "on_event", "backlog", "backlog_limit"]),
    ("pb_byte_input", &["struct_size", "name", "media_type", "data", "size"]),
    ("pb_load_callbacks", &["struct_size", "context", "progress"]),
    ("pb_model_info", &["struct_size", "context_length", "capabilities", "parallel_slots", "embedding_dimensions",
        "training_context_length", "parameter_count", "size_bytes", "architecture"]),
    ("pb_host_api", &["struct_size", "abi_major", "abi_minor", "context", "log"]),
    ("pb_plugin_api", &["struct_size", "abi_major", "abi_minor", "name", "version", "description", "model_formats",
        "capabilities", "load", "model_info", "unload", "run_create", "run_execute", "run_cancel", "run_destroy",
        "count_tokens", "embed", "flags", "probe", "run_create_with_inputs", "shutdown"]),
];

/// Every constant src/abi.rs copies from the header.
const CONSTANTS: &[&str] = &[
    "PB_OK", "PB_ERR_INVALID_REQUEST", "PB_ERR_NOT_FOUND", "PB_ERR_UNSUPPORTED", "PB_ERR_LOAD_FAILED",
    "PB_ERR_CANCELLED", "PB_ERR_CONTEXT_LENGTH_EXCEEDED", "PB_ERR_ENGINE_UNAVAILABLE", "PB_ERR_OUT_OF_MEMORY",
    "PB_ERR_INTERNAL", "PB_ERR_BUSY", "PB_CAP_CHAT", "PB_CAP_COMPLETION", "PB_EVENT_CONTENT_DELTA", "PB_EVENT_USAGE",
    "PB_EVENT_FINISH", "PB_EVENT_ERROR", "PB_FINISH_STOP", "PB_FINISH_LENGTH", "PB_FINISH_CANCELLED",
    "PB_FINISH_TIME_LIMIT", "PB_LOG_DEBUG", "PB_LOG_INFO", "PB_LOG_WARNING", "PB_LOG_ERROR",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PATCHBAY_H");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let generated = match check_layout(&out) {
        Ok(code) => code,
        Err(why) => {
            println!("cargo:warning=the mirrors in src/abi.rs were NOT checked against patchbay.h: {why}");
            String::from("// not checked: see the build warning\n")
        }
    };
    fs::write(out.join("layout_check.rs"), generated).unwrap();
}

fn find_header() -> Result<PathBuf, String> {
    if let Ok(path) = env::var("PATCHBAY_H") {
        let path = PathBuf::from(path);
        // Asked for by name: a wrong path is an error, not a warning.
        assert!(path.is_file(), "PATCHBAY_H={} is not a file", path.display());
        return Ok(path);
    }
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    for candidate in [dir.join("patchbay.h"), dir.join("../../Sources/CPatchbayABI/include/patchbay.h")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err("no patchbay.h found (set PATCHBAY_H=/path/to/patchbay.h)".into())
}

fn check_layout(out: &Path) -> Result<String, String> {
    let header = find_header()?;
    println!("cargo:rerun-if-changed={}", header.display());
    if env::var("HOST") != env::var("TARGET") {
        return Err("cross-compiling: the layout program cannot run here".into());
    }
    // A C program that prints what the compiler knows about each struct.
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"patchbay.h\"\nint main(void) {\n");
    c.push_str("printf(\"version %d %d\\n\", PB_ABI_VERSION_MAJOR, PB_ABI_VERSION_MINOR);\n");
    for (name, fields) in STRUCTS {
        c.push_str(&format!("printf(\"size {name} %zu\\n\", sizeof({name}));\n"));
        for field in *fields {
            c.push_str(&format!(
                "printf(\"field {name} {field} %zu %zu\\n\", offsetof({name}, {field}), sizeof((({name} *)0)->{field}));\n"
            ));
        }
    }
    for constant in CONSTANTS {
        c.push_str(&format!("printf(\"const {constant} %lld\\n\", (long long)({constant}));\n"));
    }
    c.push_str("return 0;\n}\n");
    let source = out.join("layout.c");
    let program = out.join("layout");
    fs::write(&source, c).unwrap();
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let include = header.parent().unwrap();
    let compiled = Command::new(&cc)
        .arg("-I").arg(include).arg(&source).arg("-o").arg(&program)
        .status()
        .map_err(|e| format!("cannot run the C compiler `{cc}`: {e}"))?;
    if !compiled.success() {
        panic!("{} does not compile with {cc}: is it really patchbay.h?", header.display());
    }
    let output = Command::new(&program).output().map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let report = String::from_utf8(output.stdout).unwrap();

    // Compile-time asserts: every offset and size, every constant, and the whole struct's
    // size when the header is the minor these mirrors were written for. A newer 1.x header
    // only appends fields, so there the prefix must match and the total may grow.
    let mut rust = String::from(
        "// Generated by build.rs from patchbay.h. Do not edit.\n\
         const fn size_of_pointee<T>(_: *const T) -> usize { ::core::mem::size_of::<T>() }\n",
    );
    let mut header_minor = String::new();
    for line in report.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["version", major, minor] => {
                writeln!(rust, "const _: () = assert!(PB_ABI_VERSION_MAJOR == {major}, \"patchbay.h has another ABI major: these mirrors do not fit it\");").unwrap();
                writeln!(rust, "const _: () = assert!(PB_ABI_VERSION_MINOR <= {minor}, \"patchbay.h is older than these mirrors\");").unwrap();
                header_minor = minor.to_string();
            }
            ["size", name, size] => {
                writeln!(rust, "const _: () = assert!(PB_ABI_VERSION_MINOR != {header_minor} || ::core::mem::size_of::<{name}>() == {size}, \"size of {name} differs from patchbay.h\");").unwrap();
            }
            ["field", name, field, offset, size] => {
                let rust_field = if *field == "type" { "r#type" } else { field }; // a Rust keyword
                writeln!(rust, "const _: () = {{ assert!(::core::mem::offset_of!({name}, {rust_field}) == {offset}, \"offset of {name}.{field} differs from patchbay.h\"); \
                    let probe = ::core::mem::MaybeUninit::<{name}>::uninit(); let p = probe.as_ptr(); \
                    assert!(size_of_pointee(unsafe {{ ::core::ptr::addr_of!((*p).{rust_field}) }}) == {size}, \"size of {name}.{field} differs from patchbay.h\"); }};").unwrap();
            }
            ["const", name, value] => {
                writeln!(rust, "const _: () = assert!({name} as i64 == {value}, \"{name} differs from patchbay.h\");").unwrap();
            }
            _ => {}
        }
    }
    Ok(rust)
}
