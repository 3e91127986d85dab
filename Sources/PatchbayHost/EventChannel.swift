import Dispatch
import PatchbayCore
import Synchronization

/// Carries events from a plugin's thread to the task that writes the response.
///
/// The consumer takes everything buffered at once, so when the client is slower than
/// the engine, tokens are coalesced into one write instead of one wake-up each. The
/// buffer is bounded: an engine that runs `capacity` events ahead of its client waits
/// in `push` (backpressure), so memory stays flat and a cancel is not queued behind a
/// backlog. `release()` lifts the bound for good, so a cancelled run can end at once.
final class EventChannel: Sendable {
    private struct State {
        var buffer: [GenerationEvent] = []
        var waiter: CheckedContinuation<[GenerationEvent], Never>?
        var producerWaiting = false
        var released = false
    }

    static let capacity = 256
    private let state = Mutex(State())
    private let producerWake = DispatchSemaphore(value: 0)

    /// Called from the plugin's thread; may block while the consumer is behind.
    func push(_ event: GenerationEvent) {
        while true {
            let outcome = state.withLock { state -> (appended: Bool, resume: (CheckedContinuation<[GenerationEvent], Never>, [GenerationEvent])?) in
                guard state.buffer.count < Self.capacity || state.released || event.isTerminal else {
                    state.producerWaiting = true
                    return (false, nil)
                }
                state.buffer.append(event)
                guard let waiter = state.waiter else { return (true, nil) }
                state.waiter = nil
                defer { state.buffer.removeAll(keepingCapacity: true) }
                return (true, (waiter, state.buffer))
            }
            if let (waiter, batch) = outcome.resume { waiter.resume(returning: batch) }
            if outcome.appended { return }
            producerWake.wait()
        }
    }

    /// Waits for at least one event and returns all that are buffered.
    func next() async -> [GenerationEvent] {
        await withCheckedContinuation { continuation in
            let (ready, wakeProducer) = state.withLock { state -> ([GenerationEvent]?, Bool) in
                guard !state.buffer.isEmpty else {
                    state.waiter = continuation
                    return (nil, false)
                }
                defer {
                    state.buffer.removeAll(keepingCapacity: true)
                    state.producerWaiting = false
                }
                return (state.buffer, state.producerWaiting)
            }
            if wakeProducer { producerWake.signal() }
            if let ready { continuation.resume(returning: ready) }
        }
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
