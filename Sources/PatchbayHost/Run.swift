import CPatchbayABI
import Foundation
import PatchbayCore
import Synchronization

/// One generation on a plugin: created (cheap, validates), then executed on a
/// thread of its own, while `cancel()` may be called from anywhere.
///
/// The plugin's run handle is destroyed when the last reference goes: after
/// execution returned and after the cancel registry let go of it, so a late
/// cancel never touches a freed handle.
public final class Run: Sendable {
    public let model: LoadedModel
    let id: UInt64
    nonisolated(unsafe) private let handle: OpaquePointer
    private let channel = EventChannel()
    private let started = Atomic<Bool>(false)

    init(model: LoadedModel, id: UInt64, handle: OpaquePointer) {
        self.model = model
        self.id = id
        self.handle = handle
    }

    deinit {
        model.plugin.api.pointee.run_destroy(handle)
        model.runEnded(id)
    }

    /// Asks the plugin to stop this run. Idempotent, thread-safe, non-blocking.
    public func cancel() {
        model.plugin.api.pointee.run_cancel(handle)
        channel.release()
    }

    /// Starts execution on a dedicated thread (plugins block while they generate).
    /// Call once; `events()` then yields everything up to the terminal event.
    public func start() {
        guard !started.exchange(true, ordering: .relaxed) else { return }
        let thread = Thread { [self] in
            var sink = pb_event_sink(
                struct_size: UInt32(MemoryLayout<pb_event_sink>.size),
                context: Unmanaged.passUnretained(channel).toOpaque(),
                on_event: { context, event in
                    guard let context, let event else { return }
                    let channel = Unmanaged<EventChannel>.fromOpaque(context).takeUnretainedValue()
                    channel.push(GenerationEvent(event.pointee))
                })
            model.plugin.api.pointee.run_execute(handle, &sink)
        }
        thread.name = "patchbay-run"
        thread.start()
    }

    /// The next batch of events; after a terminal event has been returned, do not call again.
    public func nextEvents() async -> [GenerationEvent] {
        await channel.next()
    }
}

extension GenerationEvent {
    /// Copies a C event into Swift values (its pointers die with the callback).
    init(_ event: pb_event) {
        func text() -> String {
            guard let pointer = event.text, event.text_len > 0 else { return "" }
            let bytes = UnsafeRawBufferPointer(start: pointer, count: event.text_len)
            return String(decoding: bytes, as: UTF8.self)
        }
        switch event.type {
        case Int32(PB_EVENT_CONTENT_DELTA): self = .content(text())
        case Int32(PB_EVENT_REASONING_DELTA): self = .reasoning(text())
        case Int32(PB_EVENT_TOOL_CALL_DELTA):
            self = .toolCall(ToolCallDelta(
                index: Int(event.tool_index), id: event.tool_call_id.map { String(cString: $0) },
                name: event.tool_name.map { String(cString: $0) }, arguments: text()))
        case Int32(PB_EVENT_USAGE):
            self = .usage(Usage(promptTokens: Int(event.prompt_tokens), completionTokens: Int(event.completion_tokens),
                                cachedTokens: Int(event.cached_tokens)))
        case Int32(PB_EVENT_TIMINGS):
            self = .timings(Timings(promptMilliseconds: event.prompt_ms, predictedMilliseconds: event.predicted_ms,
                                    promptPerSecond: event.prompt_per_second, predictedPerSecond: event.predicted_per_second))
        case Int32(PB_EVENT_FINISH):
            self = .finish(FinishReason(event.finish_reason))
        case Int32(PB_EVENT_ERROR):
            let message = text()
            self = .error(APIError(pluginStatus: event.error_code, message: message.isEmpty ? "the engine failed" : message))
        default:
            self = .error(APIError(status: 502, message: "the plugin sent an unknown event type \(event.type)", code: "plugin_error"))
        }
    }
}

extension FinishReason {
    init(_ reason: pb_finish_reason) {
        switch reason {
        case Int32(PB_FINISH_LENGTH): self = .length
        case Int32(PB_FINISH_TOOL_CALLS): self = .toolCalls
        case Int32(PB_FINISH_CANCELLED): self = .cancelled
        case Int32(PB_FINISH_TIME_LIMIT): self = .timeLimit
        default: self = .stop
        }
    }
}

extension APIError {
    /// Maps a plugin status code to what the client sees.
    public init(pluginStatus status: pb_status, message: String) {
        switch status {
        case Int32(PB_ERR_INVALID_REQUEST): self = .invalidRequest(message)
        case Int32(PB_ERR_NOT_FOUND): self = .notFound(message, code: "not_found")
        case Int32(PB_ERR_UNSUPPORTED): self = .invalidRequest(message, code: "unsupported_parameter")
        case Int32(PB_ERR_LOAD_FAILED): self = APIError(status: 500, message: message, code: "load_failed")
        case Int32(PB_ERR_CANCELLED): self = APIError(status: 499, message: message, code: "cancelled")
        case Int32(PB_ERR_CONTEXT_LENGTH_EXCEEDED):
            self = .invalidRequest(message, param: "messages", code: "context_length_exceeded")
        case Int32(PB_ERR_ENGINE_UNAVAILABLE): self = APIError(status: 502, message: message, code: "engine_unavailable")
        case Int32(PB_ERR_OUT_OF_MEMORY): self = APIError(status: 507, message: message, code: "out_of_memory")
        default: self = APIError(status: 500, message: message, code: "engine_error")
        }
    }
}
