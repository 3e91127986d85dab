import CPatchbayABI
import Foundation
import PatchbayCore
import Synchronization

/// One generation on a plugin: created (cheap, validates), then executed on a
/// thread of its own, while `cancel()` may be called from anywhere.
///
/// The run ends when the plugin's execution returns (its terminal event delivered): the
/// handle is destroyed then, the model no longer counts the run, and the `onEnd` hooks
/// run. How fast a client reads what is left does not matter to the engine or to an
/// unload. A run that is never started is destroyed when the last reference goes.
/// Cancel and destroy exclude each other, so a late cancel never touches a freed handle.
public final class Run: Sendable {
    /// Why a run was asked to stop; a run stopped by the host's wall-clock cap reports
    /// a time-limit finish, not a cancel.
    public enum CancelReason: Int, Sendable {
        case request = 1, timeLimit, slowClient
    }

    public let model: LoadedModel
    let id: UInt64
    nonisolated(unsafe) private let handle: OpaquePointer
    /// Byte inputs the plugin may read until `run_destroy`. Stored properties are released
    /// after `deinit`'s body, so they outlive the `run_destroy` call there.
    private let inputs: ByteInputStorage?
    private let channel: EventChannel
    private let started = Atomic<Bool>(false)
    private let cancelReason = Atomic<Int>(0)
    /// Set once the terminal event was delivered; anything after it is dropped.
    private let ended = Atomic<Bool>(false)
    private let startedAt = ContinuousClock.now
    /// The handle's life: live until destroyed, with what to call when that happens.
    private struct Life {
        var destroyed = false
        var endHooks: [@Sendable () -> Void] = []
    }
    private let life = Mutex(Life())

    init(model: LoadedModel, id: UInt64, handle: OpaquePointer, inputs: ByteInputStorage?) {
        self.model = model
        self.id = id
        self.handle = handle
        self.inputs = inputs
        channel = EventChannel(blocking: !model.plugin.isBatching)
    }

    deinit {
        destroy()
    }

    /// Destroys the plugin's handle (once) and tells whoever waits for the run's end.
    private func destroy() {
        let hooks = life.withLock { life -> [@Sendable () -> Void]? in
            guard !life.destroyed else { return nil }
            life.destroyed = true
            defer { life.endHooks = [] }
            return life.endHooks
        }
        guard let hooks else { return }
        model.plugin.table.run_destroy(handle)
        model.runEnded(id)
        for hook in hooks { hook() }
    }

    /// Whether the engine delivered the run's terminal event.
    public var hasEnded: Bool { ended.load(ordering: .relaxed) }

    /// Calls `body` once when the run has ended (at once if it has).
    public func onEnd(_ body: @escaping @Sendable () -> Void) {
        let ended = life.withLock { life in
            if !life.destroyed { life.endHooks.append(body) }
            return life.destroyed
        }
        if ended { body() }
    }

    /// Asks the plugin to stop this run. Idempotent, thread-safe, non-blocking.
    /// The first reason given is the one the run reports.
    public func cancel(reason: CancelReason = .request) {
        _ = cancelReason.compareExchange(expected: 0, desired: reason.rawValue, ordering: .relaxed)
        // run_cancel is non-blocking, so holding the lock over it is cheap; it keeps
        // destroy() from freeing the handle meanwhile.
        life.withLock { life in
            if !life.destroyed { model.plugin.table.run_cancel(handle) }
        }
        channel.release()
    }

    /// Starts execution on a dedicated thread (plugins block while they generate).
    /// Call once; `nextEvents()` then yields everything up to the terminal event.
    public func start() {
        guard !started.exchange(true, ordering: .relaxed) else { return }
        let thread = Thread { [self] in
            var sink = pb_event_sink(
                struct_size: UInt32(MemoryLayout<pb_event_sink>.size),
                context: Unmanaged.passUnretained(self).toOpaque(),
                on_event: { context, event in
                    guard let context, let event else { return }
                    let run = Unmanaged<Run>.fromOpaque(context).takeUnretainedValue()
                    // An event type of a newer minor that this host does not know is skipped.
                    guard let event = GenerationEvent(ABIStructs.read(pb_event.self, at: event)) else { return }
                    run.deliver(event)
                },
                backlog: { context in
                    guard let context else { return 0 }
                    return UInt32(Unmanaged<Run>.fromOpaque(context).takeUnretainedValue().channel.backlog)
                },
                backlog_limit: UInt32(EventChannel.capacity))
            model.plugin.table.run_execute(handle, &sink)
            // The contract says every run ends with one terminal event; a plugin that
            // broke it must not leave its client waiting forever.
            if !ended.load(ordering: .acquiring) {
                deliver(.error(HostError(.engineFailed, "The backend '\(model.plugin.name)' ended the run without a result.",
                                         code: "plugin_error")))
            }
            destroy()
        }
        thread.name = "patchbay-run"
        thread.start()
    }

    /// Called on the plugin's thread for each event.
    private func deliver(_ event: GenerationEvent) {
        if ended.load(ordering: .acquiring) { return }
        var event = event
        switch event {
        case .finish(.cancelled) where cancelReason.load(ordering: .relaxed) == CancelReason.timeLimit.rawValue:
            event = .finish(.timeLimit)
        case .progress(var progress):
            progress.elapsedMilliseconds = Int((ContinuousClock.now - startedAt) / .milliseconds(1))
            event = .progress(progress)
        default: break
        }
        if event.isTerminal { ended.store(true, ordering: .releasing) }
        if channel.push(event) == .overflowed { cancel(reason: .slowClient) }
    }

    /// The next batch of events; after a terminal event has been returned, do not call again.
    /// An empty batch means `wake()` was called while nothing was pending.
    public func nextEvents() async -> [GenerationEvent] {
        await channel.next()
    }

    /// Makes a waiting `nextEvents()` return (with no events) so that the consumer can
    /// do periodic work, such as a keep-alive write.
    public func wake() {
        channel.wake()
    }
}

/// The byte inputs of one run as the plugin sees them: C structs and their bytes, kept
/// alive and unchanged until the run is destroyed.
final class ByteInputStorage: Sendable {
    nonisolated(unsafe) let pointers: UnsafeMutablePointer<UnsafePointer<pb_byte_input>?>
    let count: Int
    nonisolated(unsafe) private let structs: UnsafeMutablePointer<pb_byte_input>
    nonisolated(unsafe) private let strings: [UnsafeMutablePointer<CChar>]
    nonisolated(unsafe) private let buffers: [UnsafeMutableRawBufferPointer]

    init(_ inputs: [ByteInput]) {
        count = inputs.count
        structs = .allocate(capacity: max(1, inputs.count))
        pointers = .allocate(capacity: max(1, inputs.count))
        var strings: [UnsafeMutablePointer<CChar>] = []
        var buffers: [UnsafeMutableRawBufferPointer] = []
        for (index, input) in inputs.enumerated() {
            let name = strdup(input.name)!
            let mediaType = strdup(input.mediaType)!
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, input.bytes.count), alignment: 16)
            input.bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
            strings += [name, mediaType]
            buffers.append(buffer)
            (structs + index).initialize(to: pb_byte_input(
                struct_size: UInt32(MemoryLayout<pb_byte_input>.size), name: name, media_type: mediaType,
                data: buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), size: input.bytes.count))
            pointers[index] = UnsafePointer(structs + index)
        }
        self.strings = strings
        self.buffers = buffers
    }

    deinit {
        structs.deinitialize(count: count)
        structs.deallocate()
        pointers.deallocate()
        strings.forEach { free($0) }
        buffers.forEach { $0.deallocate() }
    }
}

extension GenerationEvent {
    /// Copies a C event into Swift values (its pointers die with the callback). `event`
    /// was read within its writer's size, so fields a 1.0 plugin does not have are zero.
    /// Nil for an event type this host does not know.
    init?(_ event: pb_event) {
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
        case Int32(PB_EVENT_PROGRESS):
            self = .progress(PromptProgress(processed: Int(event.progress_processed), total: Int(event.progress_total),
                                            cached: Int(event.progress_cached)))
        case Int32(PB_EVENT_SEGMENT):
            self = .segment(TranscriptSegment(startMilliseconds: Int(event.segment_start_ms),
                                              endMilliseconds: Int(event.segment_end_ms), text: text()))
        case Int32(PB_EVENT_LANGUAGE):
            self = .language(text(), probability: event.language_probability)
        case Int32(PB_EVENT_FINISH):
            self = .finish(event.finish_reason == Int32(PB_FINISH_STOP_SEQUENCE) ? .stopSequence(text()) : FinishReason(event.finish_reason))
        case Int32(PB_EVENT_ERROR):
            let message = text()
            self = .error(HostError(pluginStatus: event.error_code, message: message.isEmpty ? "the engine failed" : message,
                                    retryAfterMilliseconds: Int(event.retry_after_ms)))
        default:
            return nil
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

extension HostError {
    /// What a plugin's status code means. Busy, overloaded and timed-out engines say when
    /// to try again.
    public init(pluginStatus status: pb_status, message: String, retryAfterMilliseconds: Int = 0) {
        switch status {
        case Int32(PB_ERR_INVALID_REQUEST): self.init(.invalidRequest, message)
        case Int32(PB_ERR_NOT_FOUND): self.init(.notFound, message, code: "not_found")
        case Int32(PB_ERR_UNSUPPORTED): self.init(.invalidRequest, message, code: "unsupported_parameter")
        case Int32(PB_ERR_LOAD_FAILED): self.init(.failed, message, code: "load_failed")
        case Int32(PB_ERR_CANCELLED): self.init(.cancelled, message, code: "cancelled")
        case Int32(PB_ERR_CONTEXT_LENGTH_EXCEEDED): self.init(.invalidRequest, message, param: "messages", code: "context_length_exceeded")
        case Int32(PB_ERR_ENGINE_UNAVAILABLE) where retryAfterMilliseconds > 0:
            // Down for a known while (a crashing engine backed off): unavailable, try later.
            self.init(.unavailable, message, code: "engine_unavailable", retryAfterMilliseconds: retryAfterMilliseconds)
        case Int32(PB_ERR_ENGINE_UNAVAILABLE): self.init(.engineFailed, message, code: "engine_unavailable")
        case Int32(PB_ERR_OUT_OF_MEMORY): self.init(.outOfMemory, message, code: "out_of_memory")
        case Int32(PB_ERR_BUSY): self.init(.busy, message, code: "rate_limit_exceeded", retryAfterMilliseconds: retryAfterMilliseconds)
        case Int32(PB_ERR_OVERLOADED): self.init(.unavailable, message, code: "engine_overloaded", retryAfterMilliseconds: retryAfterMilliseconds)
        case Int32(PB_ERR_TIMED_OUT): self.init(.unavailable, message, code: "engine_timeout", retryAfterMilliseconds: retryAfterMilliseconds)
        default: self.init(.failed, message, code: "engine_error")
        }
    }
}
