// The Patchbay Swift template: a complete backend plugin, written in Swift against the C
// header alone (module.modulemap imports patchbay.h as the module CPatchbay). Copy this
// folder to start your own backend (docs/writing-a-backend.md walks through it).
//
// The "engine" is deterministic, like the C reference plugin's: a model is a small text
// file ending in `.swiftmodel` with `key=value` lines,
//
//   reply=Hello from Swift.   the reply, streamed word by word (absent: echo the last user message)
//   token_delay_ms=20         time per word (default 0)
//   context_length=4096       what model_info reports; longer prompts are refused
//
// What the host calls, and on which thread (the annotations of patchbay.h):
//   pb_plugin_entry  once, when the library is opened: returns the table at the bottom
//   load             [blocking]      reads the model file, reports progress
//   model_info       [non-blocking]  describes the model (only the fields the host has room for)
//   run_create       [non-blocking]  parses one request; no engine work yet
//   run_execute      [blocking]      streams the words, then usage, then exactly one FINISH
//   run_cancel       [any-thread]    sets a flag and wakes run_execute; idempotent
//   run_destroy, unload, shutdown    free what the matching call made
//
// Rules this file keeps (see the top of patchbay.h):
//  - Nothing crosses the boundary to be freed by the other side: strings the host passes in
//    are borrowed for the call, strings in an event live only during on_event.
//  - Every struct the host hands over is read (or written) only inside its `struct_size`:
//    `has(_:_:)` below is the header's PB_HAS (a C macro, which Swift cannot import).
//  - No Swift error or trap may reach the host: every entry point catches what it throws
//    and returns a status instead.
//
// The opaque handles pb_model and pb_run arrive in Swift as OpaquePointer; here they are
// retained Swift objects (Unmanaged), released in unload and run_destroy.
import CPatchbay
import Foundation

// ─── Who this plugin is: change these for your backend ─────────────────────────────────

private let pluginName = "swift-template"  // unique among the host's plugins; what `backend` selects
private let pluginVersion = "0.1.0"
private let pluginDescription = "Swift template: streams a scripted reply (or an echo) word by word"
private let modelFormats = "swiftmodel"  // the file extensions it claims, comma-separated
private let architecture = "swift-template"
/// How many runs of one model may decode at once (model_info's parallel_slots): the host
/// queues the rest. Each run here decodes on its own host thread, so any number would do.
private let parallelSlots: Int32 = 4

// The header's anonymous enums arrive as Int; the struct fields want their typedefs.
private let statusOK = pb_status(PB_OK)
private let logInfo = pb_log_level(PB_LOG_INFO)

/// An error a call returns: its status (PB_ERR_*) and the message for the host's buffer.
struct Failure: Error {
    let status: pb_status
    let message: String
    init(_ status: Int, _ message: String) {
        self.status = pb_status(status)
        self.message = message
    }
}

// ─── Versioned structs ─────────────────────────────────────────────────────────────────

/// PB_HAS: whether `field` lies inside the `struct_size` that the struct's writer declared.
/// `has(info.pointee.struct_size, \pb_model_info.parallel_slots)`. Touching a field outside
/// it would read or write memory the other side never had (a 1.0 host's smaller struct).
func has<T, F>(_ declared: UInt32, _ field: KeyPath<T, F>) -> Bool {
    guard let offset = MemoryLayout<T>.offset(of: field) else { return false }
    return Int(declared) >= offset + MemoryLayout<F>.size
}

// ─── The host ──────────────────────────────────────────────────────────────────────────

/// The host's table, kept from pb_plugin_entry (valid until the process ends). Written once,
/// before any other call, so no lock guards it.
nonisolated(unsafe) private var host: UnsafePointer<pb_host_api>?

/// Writes a line to the host's log under this plugin's name. [any-thread]
func log(_ message: String) {
    guard let host, has(host.pointee.struct_size, \pb_host_api.log), let log = host.pointee.log else { return }
    message.withCString { log(host.pointee.context, logInfo, $0) }
}

/// Copies `message` into the host's error buffer, cut to fit (never inside a UTF-8
/// sequence), NUL-terminated.
func writeError(_ error: UnsafeMutablePointer<CChar>?, _ size: Int, _ message: String) {
    guard let error, size > 0 else { return }
    let bytes = Array(message.utf8)
    var n = min(bytes.count, size - 1)
    while n > 0 && n < bytes.count && bytes[n] & 0xC0 == 0x80 { n -= 1 }
    for i in 0..<n { error[i] = CChar(bitPattern: bytes[i]) }
    error[n] = 0
}

/// A JSON object from a NUL-terminated UTF-8 argument (borrowed for the call).
func parseObject(_ json: UnsafePointer<CChar>?) throws(Failure) -> [String: Any] {
    guard let json,
          let object = try? JSONSerialization.jsonObject(with: Data(String(cString: json).utf8)) as? [String: Any]
    else { throw Failure(PB_ERR_INVALID_REQUEST, "the request is not a JSON object") }
    return object
}

// ─── The model ─────────────────────────────────────────────────────────────────────────

final class Model {
    let path: String
    var reply: String?
    var tokenDelay: TimeInterval = 0
    var contextLength: Int64 = 4096
    let sizeBytes: UInt64

    /// Reads a `.swiftmodel` file: `key=value` lines, `#` comments, unknown keys ignored.
    init(path: String) throws(Failure) {
        guard FileManager.default.fileExists(atPath: path) else { throw Failure(PB_ERR_NOT_FOUND, "no such file: \(path)") }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw Failure(PB_ERR_LOAD_FAILED, "cannot read \(path) as UTF-8 text")
        }
        self.path = path
        sizeBytes = UInt64(text.utf8.count)
        for (lineNumber, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            guard let equals = line.firstIndex(of: "="), !line.hasPrefix("#") else { continue }
            let key = line[..<equals].trimmingCharacters(in: .whitespaces)
            let value = String(line[line.index(after: equals)...])
            func number() throws(Failure) -> Int64 {
                guard let n = Int64(value.trimmingCharacters(in: .whitespaces)), n >= 0 else {
                    throw Failure(PB_ERR_LOAD_FAILED, "\(path):\(lineNumber + 1): \(key) must be a whole number")
                }
                return n
            }
            switch key {
            case "reply": reply = value
            case "token_delay_ms": tokenDelay = Double(try number()) / 1000
            case "context_length": contextLength = try number()
            default: break
            }
        }
    }
}

// ─── A run ─────────────────────────────────────────────────────────────────────────────

final class Run {
    let words: [String]  // the reply, as tokens
    let maxTokens: Int64
    let promptTokens: Int64
    let tokenDelay: TimeInterval
    let wallLimit: TimeInterval?
    let requestID: String
    /// Set by run_cancel from any thread; the condition cuts run_execute's sleeps short.
    private let condition = NSCondition()
    private var cancelled = false

    func cancel() {
        condition.lock()
        cancelled = true
        condition.broadcast()
        condition.unlock()
    }

    /// Waits up to `seconds`, or less when cancelled. Returns whether the run is cancelled.
    func sleepUnlessCancelled(_ seconds: TimeInterval) -> Bool {
        let until = Date(timeIntervalSinceNow: seconds)
        condition.lock()
        defer { condition.unlock() }
        while !cancelled && condition.wait(until: until) {}
        return cancelled
    }

    /// Reads a normalized request (the top of patchbay.h). No engine work here.
    init(model: Model, request: [String: Any]) throws(Failure) {
        // What the engine "reads": every message (or the prompt). The echo answers the last user message.
        let prompt: String, lastUser: String
        switch request["kind"] as? String {
        case "chat":
            let messages = request["messages"] as? [[String: Any]] ?? []
            let texts = messages.map { contentText($0["content"]) }
            prompt = texts.joined(separator: " ")
            lastUser = messages.lastIndex { $0["role"] as? String == "user" }.map { texts[$0] } ?? ""
        case "completion":
            prompt = request["prompt"] as? String ?? ""
            lastUser = prompt
        case let other?:
            throw Failure(PB_ERR_UNSUPPORTED, "this backend does not serve requests of kind '\(other)'")
        case nil:
            throw Failure(PB_ERR_INVALID_REQUEST, "the request has no kind")
        }
        promptTokens = Int64(tokens(prompt).count)
        guard promptTokens <= model.contextLength else {
            throw Failure(PB_ERR_CONTEXT_LENGTH_EXCEEDED,
                          "the prompt (\(promptTokens) tokens) exceeds the context (\(model.contextLength) tokens)")
        }
        // THE ENGINE: what this template "generates", worked out up front. Your backend's own
        // engine goes here and in run_execute's loop (which would decode one token per step).
        let reply = model.reply ?? (lastUser.allSatisfy(\.isWhitespace) ? "(nothing to echo)" : lastUser)
        words = tokens(reply)
        // Always present (the host applies its default); the context bounds it anyway.
        maxTokens = (request["max_tokens"] as? NSNumber)?.int64Value ?? model.contextLength
        wallLimit = (request["max_wall_ms"] as? NSNumber).map { $0.doubleValue / 1000 }.flatMap { $0 > 0 ? $0 : nil }
        tokenDelay = model.tokenDelay
        requestID = request["request_id"] as? String ?? "-"
    }
}

/// The text of a message's content: a string, or the text parts of an array.
func contentText(_ content: Any?) -> String {
    if let text = content as? String { return text }
    let parts = content as? [[String: Any]] ?? []
    return parts.compactMap { $0["text"] as? String }.joined(separator: " ")
}

/// Splits text into word tokens, each keeping the spaces after it, so that the tokens joined
/// give back the text exactly (and no token ends inside a UTF-8 sequence).
func tokens(_ text: String) -> [String] {
    var words: [String] = []
    var current = ""
    var inSpace = false, seenWord = false
    for scalar in text.unicodeScalars {
        if scalar.properties.isWhitespace {
            inSpace = true
        } else {
            if inSpace && seenWord {
                words.append(current)  // a word and the spaces after it
                current = ""
            }
            inSpace = false
            seenWord = true
        }
        current.unicodeScalars.append(scalar)
    }
    if !current.isEmpty { words.append(current) }
    return words
}

/// The host's event sink, valid for the duration of run_execute.
struct Sink {
    let sink: UnsafePointer<pb_event_sink>

    func send(_ event: inout pb_event) {
        guard has(sink.pointee.struct_size, \pb_event_sink.on_event), let onEvent = sink.pointee.on_event else { return }
        event.struct_size = UInt32(MemoryLayout<pb_event>.size)  // the host reads only what this covers
        // May block while the client is behind (this plugin does not set PB_FLAG_BATCHING); a
        // cancel releases it. The event and its text need only live until onEvent returns.
        onEvent(sink.pointee.context, &event)
    }

    func content(_ word: String) {
        var event = pb_event()  // all zeroes, as the header asks for the fields a type does not use
        event.type = pb_event_type(PB_EVENT_CONTENT_DELTA)
        word.withCString { text in
            event.text = text  // need not be NUL-terminated: text_len says how long it is
            event.text_len = word.utf8.count
            send(&event)
        }
    }

    func usage(prompt: Int64, completion: Int64) {
        var event = pb_event()
        event.type = pb_event_type(PB_EVENT_USAGE)
        event.prompt_tokens = prompt
        event.completion_tokens = completion
        send(&event)
    }

    /// The terminal event. Nothing may be sent after it.
    func finish(_ reason: Int) {
        var event = pb_event()
        event.type = pb_event_type(PB_EVENT_FINISH)
        event.finish_reason = pb_finish_reason(reason)
        send(&event)
    }
}

// ─── The table's functions ─────────────────────────────────────────────────────────────
// Their signatures are the header's function pointers as Swift imports them, so each
// converts to a @convention(c) pointer in the table below.

private func model(_ handle: OpaquePointer?) -> Model {
    Unmanaged<Model>.fromOpaque(UnsafeRawPointer(handle!)).takeUnretainedValue()
}

private func run(_ handle: OpaquePointer?) -> Run {
    Unmanaged<Run>.fromOpaque(UnsafeRawPointer(handle!)).takeUnretainedValue()
}

private func pluginLoad(_ requestJSON: UnsafePointer<CChar>?, _ callbacks: UnsafePointer<pb_load_callbacks>?,
                        _ outModel: UnsafeMutablePointer<OpaquePointer?>?, _ errorBuffer: UnsafeMutablePointer<CChar>?,
                        _ errorSize: Int) -> pb_status {
    do throws(Failure) {
        guard let path = try parseObject(requestJSON)["model_path"] as? String else {
            throw Failure(PB_ERR_INVALID_REQUEST, "the load request has no model_path")
        }
        let loaded = try Model(path: path)
        // Progress: a real engine reports at least every 100 ms while it reads weights. A
        // non-zero answer means the host cancelled the load.
        if let callbacks, has(callbacks.pointee.struct_size, \pb_load_callbacks.progress),
           let progress = callbacks.pointee.progress,
           progress(callbacks.pointee.context, "ready", loaded.sizeBytes, loaded.sizeBytes) != 0 {
            throw Failure(PB_ERR_CANCELLED, "the load was cancelled")
        }
        log("loaded \(path)")
        outModel?.pointee = OpaquePointer(Unmanaged.passRetained(loaded).toOpaque())
        return statusOK
    } catch {
        writeError(errorBuffer, errorSize, error.message)
        return error.status
    }
}

private func pluginModelInfo(_ handle: OpaquePointer?, _ info: UnsafeMutablePointer<pb_model_info>?) {
    guard let info else { return }
    let m = model(handle)
    // The host zeroed `info` and declared its size: a 1.0 host's struct ends after
    // `capabilities`, and writing past it would scribble on the host's memory.
    let size = info.pointee.struct_size
    if has(size, \pb_model_info.context_length) { info.pointee.context_length = m.contextLength }
    if has(size, \pb_model_info.capabilities) { info.pointee.capabilities = UInt64(PB_CAP_CHAT | PB_CAP_COMPLETION) }
    if has(size, \pb_model_info.parallel_slots) { info.pointee.parallel_slots = parallelSlots }
    if has(size, \pb_model_info.training_context_length) { info.pointee.training_context_length = m.contextLength }
    if has(size, \pb_model_info.size_bytes) { info.pointee.size_bytes = m.sizeBytes }
    if has(size, \pb_model_info.architecture) { info.pointee.architecture = staticString(architecture) }
}

private func pluginUnload(_ handle: OpaquePointer?) {
    // The host calls this only once every run of the model was destroyed.
    log("unloaded \(model(handle).path)")
    Unmanaged<Model>.fromOpaque(UnsafeRawPointer(handle!)).release()
}

private func pluginRunCreate(_ handle: OpaquePointer?, _ requestJSON: UnsafePointer<CChar>?,
                             _ outRun: UnsafeMutablePointer<OpaquePointer?>?, _ errorBuffer: UnsafeMutablePointer<CChar>?,
                             _ errorSize: Int) -> pb_status {
    do throws(Failure) {
        let created = try Run(model: model(handle), request: parseObject(requestJSON))
        // From here on run_cancel may be called on it, from any thread.
        outRun?.pointee = OpaquePointer(Unmanaged.passRetained(created).toOpaque())
        return statusOK
    } catch {
        writeError(errorBuffer, errorSize, error.message)
        return error.status
    }
}

private func pluginRunExecute(_ handle: OpaquePointer?, _ sinkPointer: UnsafePointer<pb_event_sink>?) {
    guard let sinkPointer else { return }
    let r = run(handle)
    let sink = Sink(sink: sinkPointer)
    let deadline = r.wallLimit.map { Date(timeIntervalSinceNow: $0) }
    var produced: Int64 = 0
    // The generation loop: one word per step, cancel checked before every word.
    var finish: Int
    while true {
        if Int(produced) == r.words.count { finish = PB_FINISH_STOP; break }  // the reply is complete
        if produced >= r.maxTokens { finish = PB_FINISH_LENGTH; break }
        // Pace the word; a cancel (also one that came before run_execute) ends the wait at once.
        let wait = min(r.tokenDelay, deadline.map { $0.timeIntervalSinceNow } ?? .infinity)
        if r.sleepUnlessCancelled(max(0, wait)) { finish = PB_FINISH_CANCELLED; break }
        if let deadline, Date() >= deadline { finish = PB_FINISH_TIME_LIMIT; break }
        sink.content(r.words[Int(produced)])
        produced += 1
    }
    // The end of every run: usage, then exactly one terminal event, whatever happened.
    sink.usage(prompt: r.promptTokens, completion: produced)
    let why = [PB_FINISH_STOP: "stop", PB_FINISH_LENGTH: "length", PB_FINISH_CANCELLED: "cancelled"][finish] ?? "time limit"
    log("request \(r.requestID): run ended (\(why)) after \(produced) tokens")
    sink.finish(finish)
}

private func pluginRunCancel(_ handle: OpaquePointer?) {
    // [non-blocking][any-thread], idempotent: before, during or after run_execute.
    run(handle).cancel()
}

private func pluginRunDestroy(_ handle: OpaquePointer?) {
    Unmanaged<Run>.fromOpaque(UnsafeRawPointer(handle!)).release()
}

private func pluginShutdown() {
    // ABI 1.1, optional: the host exits. This plugin has no threads or global state to stop.
    log("\(pluginName) plugin shut down")
}

// ─── The table and the entry point ─────────────────────────────────────────────────────

/// A C string that lives until the process ends (the table's strings must).
private func staticString(_ text: String) -> UnsafePointer<CChar> {
    UnsafePointer(strdup(text)!)
}

/// The table, built once: Swift initializes a global lazily, exactly once, thread-safely.
/// It must stay valid and unchanged until the process ends, so it is never freed.
nonisolated(unsafe) private let pluginTable: UnsafePointer<pb_plugin_api> = {
    var table = pb_plugin_api()  // all zeroes: every optional function NULL
    table.struct_size = UInt32(MemoryLayout<pb_plugin_api>.size)
    table.abi_major = UInt16(PB_ABI_VERSION_MAJOR)
    table.abi_minor = UInt16(PB_ABI_VERSION_MINOR)
    table.name = staticString(pluginName)
    table.version = staticString(pluginVersion)
    table.description = staticString(pluginDescription)
    table.model_formats = staticString(modelFormats)
    table.capabilities = UInt64(PB_CAP_CHAT | PB_CAP_COMPLETION)
    table.load = pluginLoad
    table.model_info = pluginModelInfo
    table.unload = pluginUnload
    table.run_create = pluginRunCreate
    table.run_execute = pluginRunExecute
    table.run_cancel = pluginRunCancel
    table.run_destroy = pluginRunDestroy
    // count_tokens, embed (optional, with PB_CAP_TOKENIZE / PB_CAP_EMBEDDINGS): left NULL.
    // ── ABI 1.1 ── flags 0: not PB_FLAG_BATCHING, each run decodes on the host thread that
    // executes it. probe NULL: the host picks this plugin by the file's extension.
    table.shutdown = pluginShutdown
    let pointer = UnsafeMutablePointer<pb_plugin_api>.allocate(capacity: 1)
    pointer.initialize(to: table)
    return UnsafePointer(pointer)
}()

/// The one exported symbol. [non-blocking] Called once, right after the library is opened.
@_cdecl("pb_plugin_entry")
public func pb_plugin_entry(_ hostAPI: UnsafePointer<pb_host_api>?) -> UnsafePointer<pb_plugin_api>? {
    // Only struct_size, abi_major and abi_minor keep their place across majors, so a host of
    // another major is declined before anything else of its table is read.
    guard let hostAPI, hostAPI.pointee.abi_major == UInt16(PB_ABI_VERSION_MAJOR) else { return nil }
    host = hostAPI
    // This plugin sends only what ABI 1.0 already had (content, usage, finish), so it works
    // with any 1.x host. A plugin that sends something a minor added checks first, e.g.
    // `hostAPI.pointee.abi_minor >= 1` before a PB_EVENT_PROGRESS, and sends the nearest
    // 1.0 value (PB_ERR_ENGINE_UNAVAILABLE for PB_ERR_BUSY, ...) to an older host.
    return pluginTable
}
