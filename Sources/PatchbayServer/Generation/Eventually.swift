import Synchronization

/// A value that a task of its own is working out, waited for in pieces: between them the
/// waiter does periodic work (a stream's keep-alive comment while its model loads).
final class Eventually<Value: Sendable>: Sendable {
    private struct State {
        var result: Result<Value, any Error>?
        var waiter: (id: UInt64, continuation: CheckedContinuation<Void, Never>)?
        var waits: UInt64 = 0
    }

    private let state = Mutex(State())

    init(_ work: @escaping @Sendable () async throws -> Value) {
        Task { [self] in
            let result: Result<Value, any Error>
            do { result = .success(try await work()) } catch { result = .failure(error) }
            let waiter = state.withLock { state in
                state.result = result
                defer { state.waiter = nil }
                return state.waiter?.continuation
            }
            waiter?.resume()
        }
    }

    /// The value (or its error), or nil when `patience` ran out first.
    func value(within patience: Duration) async throws -> Value? {
        let id = state.withLock { state -> UInt64 in
            state.waits += 1
            return state.waits
        }
        let timer = Task { [self] in
            guard (try? await Task.sleep(for: patience)) != nil else { return }
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                guard let waiter = state.waiter, waiter.id == id else { return nil }
                state.waiter = nil
                return waiter.continuation
            }
            waiter?.resume()
        }
        defer { timer.cancel() }
        await withCheckedContinuation { continuation in
            let done = state.withLock { state -> Bool in
                if state.result == nil { state.waiter = (id, continuation) }
                return state.result != nil
            }
            if done { continuation.resume() }
        }
        return try state.withLock { $0.result }?.get()
    }
}
