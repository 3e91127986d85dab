import CPatchbayABI
import Dispatch
import Foundation
import Synchronization

/// The checker's event sink for one run: it records every event and judges it against the
/// sink's rules as it arrives (patchbay.h, pb_event and pb_event_sink):
/// - exactly one terminal event, nothing after it, delivered before run_execute returns;
/// - on_event never concurrently for one run, and only while run_execute runs;
/// - each event read within its struct_size, which must cover the fields its type uses;
///   types, finish reasons and status codes that the host's ABI minor knows;
/// - text valid UTF-8, each event whole characters (a character never split across events).
///
/// It also plays the client: `stall()` stops reading, so `backlog()` grows as a client that
/// falls behind does; a hook sees each event as it comes (to cancel on the first one).
final class RunRecorder: @unchecked Sendable {
    struct Event: Sendable {
        var type: Int32
        var text: [UInt8]
        var finishReason: Int32
        var errorCode: Int32
        var at: Double
        var segmentStart: Int64
        var segmentEnd: Int64

        var isTerminal: Bool { type == Int32(PB_EVENT_FINISH) || type == Int32(PB_EVENT_ERROR) }
        var isOutput: Bool {
            [PB_EVENT_CONTENT_DELTA, PB_EVENT_REASONING_DELTA, PB_EVENT_TOOL_CALL_DELTA, PB_EVENT_SEGMENT].map(Int32.init).contains(type)
        }
        var textString: String { String(decoding: text, as: UTF8.self) }

        /// "finish cancelled", "error 7: the engine is gone".
        var summary: String {
            if type == Int32(PB_EVENT_FINISH) { return "finish \(RunRecorder.finishName(finishReason))" }
            if type == Int32(PB_EVENT_ERROR) { return "error \(errorCode): \(String(textString.prefix(200)))" }
            return RunRecorder.typeName(type)
        }
    }

    let clause: String
    let scenario: String
    let kind: RequestKind
    let hostMinor: Int
    let created = nowMilliseconds()

    private struct State {
        var events: [Event] = []
        var terminals = 0
        var executing = false
        var executeReturned = false
        var violations: [String: [String]] = [:]
        var textEvents = 0
        var multiByte = 0
        var stalled = false
        var unread = 0
        /// Output events delivered while the client was behind (backlog at its limit).
        var outputWhileFull = 0
        var backlogLimit = 0
        var backlogCalls = 0
    }

    private let state = Mutex(State())
    private let inCallback = Atomic<Int>(0)
    private let arrived = DispatchSemaphore(value: 0)
    private let hook = Mutex<(@Sendable (Event, Int) -> Void)?>(nil)

    init(clause: String, scenario: String, kind: RequestKind, hostMinor: Int) {
        self.clause = clause
        self.scenario = scenario
        self.kind = kind
        self.hostMinor = hostMinor
        Self.keepAlive.withLock { $0.append(self) }
    }

    /// Every recorder lives until the process ends: a plugin that calls a sink late must
    /// reach a recorder that notes it, never freed memory.
    private static let keepAlive = Mutex<[RunRecorder]>([])

    // MARK: The sink

    /// A pb_event_sink of `size` bytes (PB_EVENT_SINK_SIZE_1_0 or the full 1.1 size) whose
    /// context is this recorder; guarded (ends at a PROT_NONE page) or padded with zeroes.
    func makeSink(size: Int = MemoryLayout<pb_event_sink>.size, guarded: Bool, backlogLimit: Int = 256) -> UnsafeMutablePointer<pb_event_sink> {
        let memory = GuardedMemory.allocate(size, guarded: guarded, label: "pb_event_sink (struct_size \(size)) of a \(kind.rawValue) run")
        var sink = pb_event_sink(
            struct_size: UInt32(size), context: Unmanaged.passUnretained(self).toOpaque(),
            on_event: { context, event in
                guard let context else { return }
                Unmanaged<RunRecorder>.fromOpaque(context).takeUnretainedValue().record(event)
            },
            backlog: { context in
                guard let context else { return 0 }
                return UInt32(Unmanaged<RunRecorder>.fromOpaque(context).takeUnretainedValue().backlog())
            },
            backlog_limit: UInt32(backlogLimit))
        state.withLock { $0.backlogLimit = size >= MemoryLayout<pb_event_sink>.size ? backlogLimit : 0 }
        withUnsafeBytes(of: &sink) { memory.copyMemory(from: $0.baseAddress!, byteCount: size) }
        return memory.assumingMemoryBound(to: pb_event_sink.self)
    }

    /// Called for each event after it was recorded, with its index; runs on the plugin's thread.
    func onEvent(_ body: (@Sendable (Event, Int) -> Void)?) { hook.withLock { $0 = body } }

    private func backlog() -> Int {
        state.withLock { state in
            state.backlogCalls += 1
            return state.stalled ? state.unread : 0
        }
    }

    /// The client stops reading (backlog grows) or reads again (backlog drops to zero).
    func stall(_ stalled: Bool) {
        state.withLock { state in
            state.stalled = stalled
            if !stalled { state.unread = 0 }
        }
    }

    func executeStarted() { state.withLock { $0.executing = true } }

    /// run_execute returned: the run must have ended with its terminal event by now.
    func executeReturned() {
        state.withLock { state in
            state.executing = false
            state.executeReturned = true
            if state.terminals == 0 {
                Self.note(&state, "terminal", "run_execute returned without a terminal event")
            }
        }
    }

    private func record(_ pointer: UnsafePointer<pb_event>?) {
        let at = nowMilliseconds()
        let concurrent = inCallback.exchange(1, ordering: .acquiringAndReleasing) == 1
        defer { if !concurrent { inCallback.store(0, ordering: .releasing) } }
        guard let pointer else {
            state.withLock { Self.note(&$0, "events", "on_event got a NULL event") }
            return
        }
        let size = Int(UnsafeRawPointer(pointer).load(as: UInt32.self))
        let event = PluginLibrary.read(pb_event.self, at: UnsafeRawPointer(pointer))
        var problems: [(String, String)] = []
        if concurrent { problems.append(("events", "on_event was called for this run while another call for it was still running")) }
        problems += judge(event, size: size)
        var text: [UInt8] = []
        if event.text_len > 0, event.text_len <= 1 << 26, let bytes = event.text {
            text = Array(UnsafeRawBufferPointer(start: bytes, count: event.text_len))
        }
        let recorded = Event(type: event.type, text: text, finishReason: event.finish_reason, errorCode: event.error_code, at: at,
                             segmentStart: event.segment_start_ms, segmentEnd: event.segment_end_ms)
        let index = state.withLock { state -> Int in
            let index = state.events.count
            let name = "\(Self.typeName(event.type)) event #\(index + 1)"
            if state.terminals > 0 {
                Self.note(&state, "terminal", recorded.isTerminal ? "a second terminal event (\(recorded.summary)) after \(state.events.first { $0.isTerminal }?.summary ?? "")"
                                                                  : "\(name) after the terminal event")
            }
            if !state.executing {
                Self.note(&state, "events", state.executeReturned ? "\(name) delivered after run_execute returned"
                                                                  : "\(name) delivered before run_execute was called")
            }
            for (category, message) in problems { Self.note(&state, category, "\(name): \(message)") }
            if !text.isEmpty {
                state.textEvents += 1
                let check = UTF8Check(text)
                state.multiByte += check.multiByteCharacters
                if let problem = check.description { Self.note(&state, "utf8", "\(name) \(problem): \(Self.hex(text))") }
            }
            if recorded.isTerminal { state.terminals += 1 }
            if !recorded.isTerminal {
                if state.backlogLimit > 0 && state.stalled && state.unread >= state.backlogLimit && recorded.isOutput { state.outputWhileFull += 1 }
                state.unread += 1
                if !state.stalled { state.unread = 0 }
            }
            state.events.append(recorded)
            return index
        }
        arrived.signal()
        if let body = hook.withLock({ $0 }) { body(recorded, index) }
    }

    /// What is wrong with one event, by category: its size, type, reason, code and fields.
    private func judge(_ event: pb_event, size: Int) -> [(String, String)] {
        let category = hostMinor == 0 ? "host-1.0" : "events"
        var problems: [(String, String)] = []
        func covers<F>(_ field: KeyPath<pb_event, F>) -> Bool {
            size >= MemoryLayout<pb_event>.offset(of: field)! + MemoryLayout<F>.size
        }
        let size10 = MemoryLayout<pb_event>.offset(of: \pb_event.error_code)! + MemoryLayout<pb_status>.size
        if size < size10 { problems.append(("events", "struct_size \(size) is smaller than ABI 1.0's pb_event (\(size10))")) }
        if event.text_len > 0 && event.text == nil { problems.append(("events", "text_len \(event.text_len) with a NULL text")) }
        if event.text_len > 1 << 26 { problems.append(("events", "text_len \(event.text_len) is not believable")) }
        let type = Int(event.type)
        let minorOfType = [PB_EVENT_PROGRESS, PB_EVENT_SEGMENT, PB_EVENT_LANGUAGE].contains(type) ? 1 : 0
        if type < Int(PB_EVENT_CONTENT_DELTA) || type > Int(PB_EVENT_LANGUAGE) {
            problems.append((category, "unknown event type \(type) for a host of ABI 1.\(hostMinor)"))
            return problems
        }
        if minorOfType > hostMinor {
            problems.append((category, "an ABI 1.\(minorOfType) event sent to a host of ABI 1.\(hostMinor)"))
        }
        switch type {
        case Int(PB_EVENT_TOOL_CALL_DELTA):
            if event.tool_index < 0 { problems.append(("events", "tool_index \(event.tool_index)")) }
        case Int(PB_EVENT_USAGE):
            if event.prompt_tokens < 0 || event.completion_tokens < 0 || event.cached_tokens < 0 {
                problems.append(("events", "negative token counts (\(event.prompt_tokens), \(event.completion_tokens), \(event.cached_tokens))"))
            }
        case Int(PB_EVENT_TIMINGS):
            let values = [event.prompt_ms, event.predicted_ms, event.prompt_per_second, event.predicted_per_second]
            if values.contains(where: { !$0.isFinite || $0 < 0 }) { problems.append(("events", "timings not finite and non-negative: \(values)")) }
        case Int(PB_EVENT_FINISH):
            let reason = Int(event.finish_reason)
            let known = reason >= Int(PB_FINISH_STOP) && reason <= (hostMinor >= 1 ? Int(PB_FINISH_STOP_SEQUENCE) : Int(PB_FINISH_TIME_LIMIT))
            if !known { problems.append((category, "finish reason \(reason) is not one a host of ABI 1.\(hostMinor) knows")) }
        case Int(PB_EVENT_ERROR):
            let code = Int(event.error_code)
            let known = code >= Int(PB_ERR_INVALID_REQUEST) && code <= (hostMinor >= 1 ? Int(PB_ERR_TIMED_OUT) : Int(PB_ERR_INTERNAL))
            if !known { problems.append((category, "status code \(code) is not an error a host of ABI 1.\(hostMinor) knows")) }
            if event.text_len == 0 { problems.append(("events", "an error event without a message")) }
        case Int(PB_EVENT_PROGRESS):
            if !covers(\.progress_cached) { problems.append(("events", "struct_size \(size) does not cover the progress fields")) }
            if event.progress_processed < 0 || event.progress_total < 0 || event.progress_cached < 0
                || (event.progress_total > 0 && event.progress_processed > event.progress_total) {
                problems.append(("events", "progress \(event.progress_processed) of \(event.progress_total) (cached \(event.progress_cached))"))
            }
        case Int(PB_EVENT_SEGMENT):
            if !covers(\.segment_end_ms) { problems.append(("events", "struct_size \(size) does not cover the segment fields")) }
            if event.segment_start_ms < 0 || event.segment_end_ms < event.segment_start_ms {
                problems.append(("events", "segment from \(event.segment_start_ms) ms to \(event.segment_end_ms) ms"))
            }
        case Int(PB_EVENT_LANGUAGE):
            if !covers(\.language_probability) { problems.append(("events", "struct_size \(size) does not cover language_probability")) }
            if !(0...1).contains(event.language_probability) { problems.append(("events", "language_probability \(event.language_probability)")) }
            if event.text_len == 0 { problems.append(("events", "a language event without a language")) }
        default:
            break
        }
        return problems
    }

    private static func note(_ state: inout State, _ category: String, _ message: String) {
        var list = state.violations[category, default: []]
        if list.count < 5 { list.append(message) }
        state.violations[category] = list
    }

    /// Notes a violation found outside the sink (by a scenario), under `category`.
    func note(_ category: String, _ message: String) { state.withLock { Self.note(&$0, category, message) } }

    // MARK: What the scenarios read

    var events: [Event] { state.withLock { $0.events } }
    var terminal: Event? { state.withLock { $0.events.first { $0.isTerminal } } }
    var backlogCalls: Int { state.withLock { $0.backlogCalls } }
    var outputWhileFull: Int { state.withLock { $0.outputWhileFull } }
    var violations: [String: [String]] { state.withLock { $0.violations } }

    /// Waits until `condition` holds for the events so far, or `seconds` passed.
    @discardableResult
    func wait(seconds: Double, until condition: ([Event]) -> Bool) -> Bool {
        let deadline = nowMilliseconds() + seconds * 1000
        while true {
            if state.withLock({ condition($0.events) }) { return true }
            let left = deadline - nowMilliseconds()
            if left <= 0 { return false }
            _ = arrived.wait(timeout: .now() + min(left, 5) / 1000)
        }
    }

    func report(executed: Bool) -> RunReport {
        state.withLock { state in
            RunReport(clause: clause, scenario: scenario, kind: kind, executed: executed, terminals: state.terminals,
                      terminal: state.events.first { $0.isTerminal }?.summary, events: state.events.count,
                      textEvents: state.textEvents, nonASCIICharacters: state.multiByte, violations: state.violations)
        }
    }

    static func typeName(_ type: Int32) -> String {
        let names = [1: "content", 2: "reasoning", 3: "tool-call", 4: "usage", 5: "timings", 6: "finish", 7: "error", 8: "progress",
                     9: "segment", 10: "language"]
        return names[Int(type)] ?? "type-\(type)"
    }

    static func finishName(_ reason: Int32) -> String {
        let names = [1: "stop", 2: "length", 3: "tool_calls", 4: "cancelled", 5: "time_limit", 6: "stop_sequence"]
        return names[Int(reason)] ?? "reason \(reason)"
    }

    /// The bytes in hex: all of them, or the first and last eight.
    private static func hex(_ bytes: [UInt8]) -> String {
        func show<S: Sequence<UInt8>>(_ part: S) -> String { part.map { String(format: "%02x", $0) }.joined(separator: " ") }
        return bytes.count <= 16 ? show(bytes) : "\(show(bytes.prefix(8))) … \(show(bytes.suffix(8)))"
    }
}
