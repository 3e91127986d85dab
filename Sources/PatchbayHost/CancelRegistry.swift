import Synchronization

/// The host's one cancel mechanism: every live generation, streaming or not, is
/// registered here under its keys, and `POST /api/inference/cancel` stops runs
/// through it.
///
/// Semantics (see DESIGN.md):
/// - `cancel_id` is a per-run key and, when a cancel carries one, it is matched
///   exclusively: other keys in the same cancel are ignored.
/// - A `cancel_id` that matches no live run is remembered for `pendingLifetime`
///   and fires the moment a run registers with it. Only `cancel_id` is remembered:
///   the other keys are shared across runs.
/// - `session_id` / `completion_id` / `message_id` cancel every live run under them.
/// - Registering (with consuming a pending cancel) and cancelling (with remembering
///   it) are each one critical section, so no cancel is lost in between.
public final class CancelRegistry: Sendable {
    public enum Key: Hashable, Sendable {
        case cancelID(String)
        case session(String)
        case completion(String)
        case message(String)
    }

    /// What a cancel request names. Empty strings count as absent.
    public struct Target: Sendable {
        public var cancelID: String?
        public var sessionID: String?
        public var completionID: String?
        public var messageID: String?

        public init(cancelID: String? = nil, sessionID: String? = nil, completionID: String? = nil, messageID: String? = nil) {
            self.cancelID = cancelID
            self.sessionID = sessionID
            self.completionID = completionID
            self.messageID = messageID
        }
    }

    public typealias RunID = UInt64

    private struct Run {
        var keys: [Key]
        var cancel: @Sendable () -> Void
    }

    private struct State {
        var nextID: RunID = 1
        var runs: [RunID: Run] = [:]
        var index: [Key: Set<RunID>] = [:]
        var pending: [String: ContinuousClock.Instant] = [:]

        mutating func prunePending(now: ContinuousClock.Instant) {
            pending = pending.filter { $0.value > now }
        }
    }

    private let state = Mutex(State())
    private let pendingLifetime: Duration
    private let clock = ContinuousClock()

    public init(pendingLifetime: Duration = .seconds(30)) {
        self.pendingLifetime = pendingLifetime
    }

    /// Registers a live run. If a cancel for its `cancel_id` is pending, it is
    /// consumed and `cancel` is called before this returns.
    public func register(_ keys: [Key], cancel: @escaping @Sendable () -> Void) -> RunID {
        let keys = keys.filter { !$0.value.isEmpty }
        let now = clock.now
        let (id, cancelledEarly) = state.withLock { state -> (RunID, Bool) in
            let id = state.nextID
            state.nextID += 1
            state.runs[id] = Run(keys: keys, cancel: cancel)
            for key in keys { state.index[key, default: []].insert(id) }
            state.prunePending(now: now)
            var consumed = false
            for case .cancelID(let value) in keys where state.pending.removeValue(forKey: value) != nil {
                consumed = true
            }
            return (id, consumed)
        }
        if cancelledEarly { cancel() }
        return id
    }

    /// Removes a run; idempotent. Call on every exit path.
    public func unregister(_ id: RunID) {
        state.withLock { state in
            guard let run = state.runs.removeValue(forKey: id) else { return }
            for key in run.keys {
                state.index[key]?.remove(id)
                if state.index[key]?.isEmpty == true { state.index[key] = nil }
            }
        }
    }

    /// Cancels what `target` names and returns how many distinct live runs that was.
    public func cancel(_ target: Target) -> Int {
        let now = clock.now
        let actions = state.withLock { state -> [@Sendable () -> Void] in
            state.prunePending(now: now)
            var matched = Set<RunID>()
            if let cancelID = target.cancelID, !cancelID.isEmpty {
                matched = state.index[.cancelID(cancelID)] ?? []
                if matched.isEmpty { state.pending[cancelID] = now + pendingLifetime }
            } else {
                let keys: [Key] = [
                    target.sessionID.map(Key.session), target.completionID.map(Key.completion),
                    target.messageID.map(Key.message),
                ].compactMap { $0 }.filter { !$0.value.isEmpty }
                for key in keys { matched.formUnion(state.index[key] ?? []) }
            }
            return matched.compactMap { state.runs[$0]?.cancel }
        }
        for action in actions { action() }
        return actions.count
    }

    /// Cancels every live run (shutdown). Returns how many.
    @discardableResult
    public func cancelAll() -> Int {
        let actions = state.withLock { state in state.runs.values.map(\.cancel) }
        for action in actions { action() }
        return actions.count
    }

    public var liveRunCount: Int { state.withLock { $0.runs.count } }
    public var pendingCount: Int {
        let now = clock.now
        return state.withLock { state in
            state.prunePending(now: now)
            return state.pending.count
        }
    }
}

extension CancelRegistry.Key {
    var value: String {
        switch self {
        case .cancelID(let value), .session(let value), .completion(let value), .message(let value): value
        }
    }
}
