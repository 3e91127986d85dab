/// A generation's life as plain data: which phase it is in, whether it was cancelled, and
/// when its response's current write began. Every change is a method that returns what the
/// caller must do next; the caller holds the lock (`Generation`) and acts after letting go
/// of it, so no side effect (a plugin call, a continuation) ever runs under the lock.
///
///     waitingForModel ──▶ queued ──▶ running ──▶ draining ──▶ ended
///            └──────────────┴───────────┴──────────────────────▲ (failed, dropped)
///
/// - `waitingForModel`: the named model is being loaded on first use.
/// - `queued`: in the model's admission line (an admitted ticket passes through at once).
/// - `running`: the engine has the run.
/// - `draining`: the engine is done with the run (it returned, after delivering the
///   terminal event); the response may still be being written. The run is out of the
///   cancel registry and its slot is free: neither an unload nor shutdown waits for a client.
/// - `ended`: the response is done (or was dropped); nothing is held.
///
/// Generic over the run so that unit tests drive it without a plugin.
struct GenerationState<RunHandle> {
    enum Phase: Equatable, Sendable {
        case waitingForModel, queued, running, draining, ended

        /// The SSE comment a stream hears while nothing else flows in this phase.
        var silenceComment: String {
            switch self {
            case .waitingForModel: "loading model"
            case .queued: "queued"
            case .running, .draining, .ended: "keep-alive"
            }
        }
    }

    /// What the caller must do after a cancel.
    enum CancelAction {
        /// Nothing to stop yet: the run starts cancelled once there is one.
        case none
        /// Take the ticket out of the model's line.
        case leaveQueue
        /// Ask the engine to stop.
        case cancelRun(RunHandle)
    }

    /// What the caller must do once the generation is over.
    struct Cleanup {
        /// Leave the cancel registry, free the model slot, stop the wall-clock watchdog.
        var releaseRun = false
        /// Stop the heartbeat and the client-departure hook.
        var releaseResponse = false
        /// Cancel a run that is still going (the response was dropped).
        var cancel: RunHandle?
    }

    private(set) var phase: Phase
    private(set) var isCancelled = false
    private(set) var run: RunHandle?
    /// Whether the run's resources were already given back (once only).
    private var runReleased = false
    /// When the response's write in progress began; nil while none is.
    private var writeStartedAt: ContinuousClock.Instant?

    init(waitingForModel: Bool) {
        phase = waitingForModel ? .waitingForModel : .queued
    }

    /// The model is there: into its line.
    mutating func modelArrived() {
        if phase == .waitingForModel { phase = .queued }
    }

    /// Admitted (or cancelled while waiting: the run then starts cancelled, and the engine
    /// ends it at once with the usual answer of a cancelled run). True when the run should
    /// be cancelled the moment it exists.
    mutating func started(_ run: RunHandle) -> Bool {
        guard phase == .queued || phase == .waitingForModel else { return true }
        self.run = run
        phase = .running
        return isCancelled
    }

    /// A cancel from the API, a client that left, the write timeout or shutdown. `first`
    /// is true for the first cancel of a generation that had work left to stop.
    mutating func cancel() -> (first: Bool, action: CancelAction) {
        let first = !isCancelled
        isCancelled = true
        switch phase {
        case .waitingForModel: return (first, .none)
        case .queued: return (first, .leaveQueue)
        case .running: return (first, run.map(CancelAction.cancelRun) ?? .none)
        case .draining, .ended: return (false, .none)
        }
    }

    /// The engine returned the run (its terminal event delivered).
    mutating func runEnded() -> Cleanup {
        if phase == .running { phase = .draining }
        return takeRunRelease()
    }

    /// The generation failed before its run started (a full or timed-out line, a refused
    /// request), or its response is done, or was dropped unfinished. A run still going is
    /// to be cancelled (unless its result is out), and gives its resources back when its
    /// engine returns it.
    mutating func end() -> Cleanup {
        // A generation that never ran gives back now; one that ran, when its engine returns it.
        var cleanup = run == nil ? takeRunRelease() : Cleanup()
        if phase == .running { cleanup.cancel = run }
        if phase != .ended {
            cleanup.releaseResponse = true
            phase = .ended
        }
        return cleanup
    }

    private mutating func takeRunRelease() -> Cleanup {
        var cleanup = Cleanup()
        if !runReleased {
            runReleased = true
            cleanup.releaseRun = true
        }
        return cleanup
    }

    // MARK: The response's writes

    mutating func writeBegan(at now: ContinuousClock.Instant) { writeStartedAt = now }
    mutating func writeEnded() { writeStartedAt = nil }

    /// Whether a write has waited longer than `limit` (the client stopped reading).
    func writeStalled(at now: ContinuousClock.Instant, limit: Duration) -> Bool {
        writeStartedAt.map { now - $0 >= limit } ?? false
    }
}
