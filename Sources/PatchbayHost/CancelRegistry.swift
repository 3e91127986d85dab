import Synchronization

/// The host's one cancel mechanism: every live generation, streaming or not, is
/// registered here under its keys, and `POST /api/inference/cancel` stops runs
/// through it.
///
/// Semantics (see DESIGN.md):
/// - `cancel_id` is a per-run key and, when a cancel carries one, it is matched
///   exclusively: other keys in the same cancel are ignored.
/// - A `cancel_id` that matches no live run is remembered for `pendingLifetime`
///   and fires the moment a run registers with it (a Stop sent before its request
///   arrived). Only `cancel_id` is remembered: the other keys are shared across runs.
/// - A `cancel_id` whose run ended within `pendingLifetime` is a no-op instead: a Stop
///   that raced a natural finish must not cancel the next run that reuses the id.
/// - Both memories hold at most `memoryLimit` ids; past that the oldest go first.
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
        /// Cancels that came before their run, and runs that ended: id → when forgotten.
        var pending = ExpiringSet()
        var finished = ExpiringSet()
    }

    private let state = Mutex(State())
    private let pendingLifetime: Duration
    private let memoryLimit: Int
    private let clock = ContinuousClock()

    public init(pendingLifetime: Duration = .seconds(30), memoryLimit: Int = 10_000) {
        self.pendingLifetime = pendingLifetime
        self.memoryLimit = memoryLimit
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
            var consumed = false
            for case .cancelID(let value) in keys where state.pending.remove(value, now: now) {
                consumed = true
            }
            return (id, consumed)
        }
        if cancelledEarly { cancel() }
        return id
    }

    /// Removes a run; idempotent. Call when the run ended, on every path.
    public func unregister(_ id: RunID) {
        let now = clock.now
        state.withLock { state in
            guard let run = state.runs.removeValue(forKey: id) else { return }
            for case .cancelID(let value) in run.keys {
                state.finished.insert(value, until: now + pendingLifetime, limit: memoryLimit, now: now)
            }
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
            var matched = Set<RunID>()
            if let cancelID = target.cancelID, !cancelID.isEmpty {
                matched = state.index[.cancelID(cancelID)] ?? []
                if matched.isEmpty && !state.finished.contains(cancelID, now: now) {
                    state.pending.insert(cancelID, until: now + pendingLifetime, limit: memoryLimit, now: now)
                }
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
            state.pending.prune(now: now)
            return state.pending.count
        }
    }

    public var finishedCount: Int {
        let now = clock.now
        return state.withLock { state in
            state.finished.prune(now: now)
            return state.finished.count
        }
    }
}

/// Ids remembered until a deadline, at most `limit` of them (the oldest go first).
/// One lifetime applies to all, so insertion order is also expiry order: a queue of
/// (id, deadline) entries finds what to forget without scanning. An entry whose id was
/// removed or inserted again since is stale and skipped.
private struct ExpiringSet {
    private var expiry: [String: ContinuousClock.Instant] = [:]
    private var queue: [(id: String, deadline: ContinuousClock.Instant)] = []
    private var head = 0

    var count: Int { expiry.count }

    mutating func insert(_ id: String, until deadline: ContinuousClock.Instant, limit: Int, now: ContinuousClock.Instant) {
        prune(now: now)
        expiry[id] = deadline
        queue.append((id, deadline))
        while expiry.count > limit, head < queue.count { popHead() }
        if queue.count - head > 2 * max(limit, 1) { compact() }
    }

    mutating func contains(_ id: String, now: ContinuousClock.Instant) -> Bool {
        prune(now: now)
        return expiry[id] != nil
    }

    /// Removes `id`; true when it was remembered.
    mutating func remove(_ id: String, now: ContinuousClock.Instant) -> Bool {
        prune(now: now)
        return expiry.removeValue(forKey: id) != nil
    }

    mutating func prune(now: ContinuousClock.Instant) {
        while head < queue.count, queue[head].deadline <= now { popHead() }
        if head > 1024 && head * 2 > queue.count { compact() }
    }

    /// Forgets the oldest entry's id, unless the entry is stale.
    private mutating func popHead() {
        let entry = queue[head]
        head += 1
        if expiry[entry.id] == entry.deadline { expiry[entry.id] = nil }
    }

    private mutating func compact() {
        queue = queue[head...].filter { expiry[$0.id] == $0.deadline }
        head = 0
    }
}

extension CancelRegistry.Key {
    var value: String {
        switch self {
        case .cancelID(let value), .session(let value), .completion(let value), .message(let value): value
        }
    }
}
