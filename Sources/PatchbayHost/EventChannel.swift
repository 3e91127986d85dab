import PatchbayCore
import Synchronization

/// Carries events from a plugin's thread to the task that writes the response.
///
/// The consumer takes everything buffered at once, so when the client or the
/// event loop is slower than the engine, tokens are coalesced into one write
/// instead of one wake-up each.
final class EventChannel: Sendable {
    private struct State {
        var buffer: [GenerationEvent] = []
        var waiter: CheckedContinuation<[GenerationEvent], Never>?
    }

    private let state = Mutex(State())

    /// Called from the plugin's thread.
    func push(_ event: GenerationEvent) {
        let resume = state.withLock { state -> (CheckedContinuation<[GenerationEvent], Never>, [GenerationEvent])? in
            state.buffer.append(event)
            guard let waiter = state.waiter else { return nil }
            state.waiter = nil
            defer { state.buffer.removeAll(keepingCapacity: true) }
            return (waiter, state.buffer)
        }
        if let (waiter, batch) = resume { waiter.resume(returning: batch) }
    }

    /// Waits for at least one event and returns all that are buffered.
    func next() async -> [GenerationEvent] {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> [GenerationEvent]? in
                guard !state.buffer.isEmpty else {
                    state.waiter = continuation
                    return nil
                }
                defer { state.buffer.removeAll(keepingCapacity: true) }
                return state.buffer
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}
