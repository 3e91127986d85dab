import Dispatch
import PatchbayCore
import Synchronization

/// Carries events from a plugin's thread to the task that writes the response.
///
/// The consumer takes everything buffered at once, so when the client is slower than
/// the engine, tokens are coalesced into one write instead of one wake-up each.
///
/// Memory stays bounded in one of two ways (patchbay.h, `pb_event_sink`):
/// - blocking (a plugin with one thread per run): an engine that runs `capacity` events
///   ahead of its client waits in `push` (backpressure), so a cancel is not queued
///   behind a backlog. `release()` lifts the bound for good, so a cancelled run ends at once.
/// - non-blocking (a batching plugin, whose one thread serves every run): `push` never
///   waits; the plugin reads `backlog` and pauses the run itself. A plugin that does not
///   is cut off past `byteLimit`: the run is cancelled and its response ends with an error.
final class EventChannel: Sendable {
    enum PushResult { case accepted, overflowed }

    private struct State {
        var buffer: [GenerationEvent] = []
        var bufferedBytes = 0
        var waiter: CheckedContinuation<[GenerationEvent], Never>?
        var producerWaiting = false
        var released = false
        var overflowed = false
    }

    static let capacity = 256
    /// What a non-blocking channel holds at most for a client that does not read.
    static let byteLimit = 16 << 20

    private let blocking: Bool
    private let state = Mutex(State())
    private let producerWake = DispatchSemaphore(value: 0)

    init(blocking: Bool) {
        self.blocking = blocking
    }

    /// Events delivered but not yet taken by the consumer.
    var backlog: Int { state.withLock { $0.buffer.count } }

    /// Called from the plugin's thread. In blocking mode it may wait while the consumer is
    /// behind; `.overflowed` (once) means the consumer fell too far behind and the run
    /// should be cancelled.
    func push(_ event: GenerationEvent) -> PushResult {
        while true {
            var result = PushResult.accepted
            let outcome = state.withLock { state -> (appended: Bool, resume: (CheckedContinuation<[GenerationEvent], Never>, [GenerationEvent])?) in
                var event = event
                if blocking {
                    guard state.buffer.count < Self.capacity || state.released || event.isTerminal else {
                        state.producerWaiting = true
                        return (false, nil)
                    }
                } else {
                    if state.overflowed && !event.isTerminal { return (true, nil) }
                    state.bufferedBytes += event.approximateBytes
                    if !state.overflowed && state.bufferedBytes > Self.byteLimit && !event.isTerminal {
                        state.overflowed = true
                        result = .overflowed
                        return (true, nil)
                    }
                    if state.overflowed, case .finish = event {
                        event = .error(HostError(.unavailable, "The client did not read the response fast enough; the generation was stopped.",
                                                 code: "client_too_slow"))
                    }
                }
                state.buffer.append(event)
                guard let waiter = state.waiter else { return (true, nil) }
                state.waiter = nil
                defer {
                    state.buffer.removeAll(keepingCapacity: true)
                    state.bufferedBytes = 0
                }
                return (true, (waiter, state.buffer))
            }
            if let (waiter, batch) = outcome.resume { waiter.resume(returning: batch) }
            if outcome.appended { return result }
            producerWake.wait()
        }
    }

    /// Waits for at least one event (or a `wake()`) and returns all that are buffered.
    func next() async -> [GenerationEvent] {
        await withCheckedContinuation { continuation in
            let (ready, wakeProducer) = state.withLock { state -> ([GenerationEvent]?, Bool) in
                guard !state.buffer.isEmpty else {
                    state.waiter = continuation
                    return (nil, false)
                }
                defer {
                    state.buffer.removeAll(keepingCapacity: true)
                    state.bufferedBytes = 0
                    state.producerWaiting = false
                }
                return (state.buffer, state.producerWaiting)
            }
            if wakeProducer { producerWake.signal() }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// Makes a pending `next()` return an empty batch.
    func wake() {
        let waiter = state.withLock { state in
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: [])
    }

    /// Stops applying backpressure (the run was cancelled, or nobody reads any more).
    func release() {
        let wakeProducer = state.withLock { state in
            state.released = true
            defer { state.producerWaiting = false }
            return state.producerWaiting
        }
        if wakeProducer { producerWake.signal() }
    }
}

extension GenerationEvent {
    /// Roughly what the event costs to hold: its text plus a constant.
    var approximateBytes: Int {
        switch self {
        case .content(let text), .reasoning(let text): 64 + text.utf8.count
        case .toolCall(let call): 64 + call.arguments.utf8.count
        case .segment(let segment): 64 + segment.text.utf8.count
        default: 64
        }
    }
}
