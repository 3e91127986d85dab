import Hummingbird
import PatchbayCore
import PatchbayHost
import Synchronization

/// One generation, from the moment its request is accepted to the end of its response:
/// waiting for its model, in the model's line, running, draining (see `GenerationState`).
///
/// It is in the cancel registry and watched for a client that leaves from the start, so a
/// cancel or a departure in any phase stops it: in line it leaves the line at once, running
/// the engine is told. One lock guards its whole state; side effects happen outside it.
///
/// - The run leaves the cancel registry and frees its model slot when the engine delivered
///   its terminal event, not when the response is written: neither an unload nor shutdown
///   waits on a client.
/// - A write the client does not take within the write timeout (it stopped reading) cuts
///   the connection, which fails the write and cancels the run.
/// - A response that drops its generation unfinished cancels the run (`Generation.Hold`).
final class Generation: Sendable {
    typealias Phase = GenerationState<Run>.Phase

    private struct Inner {
        var state: GenerationState<Run>
        var model: LoadedModel?
        var ticket: AdmissionQueue.Ticket?
        var queueDeadline: ContinuousClock.Instant?
        var heartbeat: Task<Void, Never>?
        var watchdog: Task<Void, Never>?
        var registration: CancelRegistry.RunID?
        var connectionHook: UInt64?
    }

    private let server: ServerState
    private let inner: Mutex<Inner>
    private let connection: ClientConnection?
    /// The request's access-log record, which the run fills in.
    let record: RequestRecord?

    /// Registers the generation under `keys` and hooks the client's connection.
    /// `waitingForModel`: its model is still to be loaded (`--models-dir`).
    init(server: ServerState, keys: [CancelRegistry.Key], connection: ClientConnection?, waitingForModel: Bool) {
        self.server = server
        self.connection = connection
        record = RequestRecord.current
        inner = Mutex(Inner(state: GenerationState(waitingForModel: waitingForModel)))
        // The registry and the connection outlive the generation: they hold it weakly. A
        // cancel pending for its cancel_id fires inside `register`.
        let registration = server.cancels.register(keys) { [weak self] in self?.cancel() }
        let hook = connection?.onGone { [weak self, metrics = server.metrics] in
            if self?.cancel() == true { metrics.cancelled(.clientDisconnect) }
        }
        inner.withLock { inner in
            inner.registration = registration
            inner.connectionHook = hook
        }
    }

    deinit {
        end()  // what a generation that never ran held
    }

    /// The response's hold on its generation: once the response is done with it, or drops
    /// it unfinished, the generation ends (a run still going is cancelled). The run itself
    /// keeps the generation alive until the engine ends it, so this is what notices.
    final class Hold: Sendable {
        let generation: Generation
        init(_ generation: Generation) { self.generation = generation }
        deinit { generation.end() }
    }

    var phase: Phase { inner.withLock { $0.state.phase } }
    var isCancelled: Bool { inner.withLock { $0.state.isCancelled } }

    /// The running generation's run (nil before it runs).
    var run: Run? { inner.withLock { $0.state.run } }

    // MARK: Phases

    /// The model is there: the generation takes its place in the model's line (admitted at
    /// once when a slot is free), or is refused, 429 when the line is full, 503 during shutdown.
    func enterQueue(on model: LoadedModel) throws(APIError) {
        if server.isStopping {
            throw APIError(status: 503, message: "The server is shutting down.", code: "server_shutting_down", retryAfterSeconds: 5)
        }
        guard let ticket = model.admission.enter() else {
            let (running, waiting) = model.admission.counts
            throw APIError(status: 429, message: "Model '\(model.id)' is busy: \(running) running and \(waiting) waiting, the most its queue holds (--max-queue). Try again shortly.",
                           code: "rate_limit_exceeded", retryAfterSeconds: 1)
        }
        record?.model = model.id
        let cancelledMeanwhile = inner.withLock { inner -> Bool in
            inner.state.modelArrived()
            inner.model = model
            inner.ticket = ticket
            inner.queueDeadline = .now + server.configuration.queueTimeout
            return inner.state.isCancelled
        }
        if cancelledMeanwhile { ticket.withdraw() }
    }

    /// Waits up to `patience` for the model's turn: true once admitted, or cancelled while in
    /// line (its run then starts cancelled); false while it still waits. Throws the queue
    /// timeout (503) once the line held it too long, and when the client left meanwhile.
    func waitTurn(patience: Duration) async throws -> Bool {
        let waiting = inner.withLock { inner in
            inner.state.phase == .queued ? inner.ticket.map { ($0, inner.queueDeadline ?? .now) } : nil
        }
        guard let (ticket, deadline) = waiting else { return true }
        let now = ContinuousClock.now
        let outcome = now < deadline ? await ticket.wait(upTo: min(patience, deadline - now)) : nil
        if connection?.isGone == true { throw CancellationError() }
        if outcome == .admitted || isCancelled { return true }
        if ContinuousClock.now >= deadline {
            ticket.withdraw()
            throw queueTimeout
        }
        return false
    }

    var queueTimeout: APIError {
        let model = inner.withLock { $0.model?.id } ?? ""
        return APIError(status: 503, message: "The request waited \(server.configuration.queueTimeout) for model '\(model)' and was not served; try again later.",
                        code: "queue_timeout", retryAfterSeconds: 5)
    }

    /// Hands `request` to the engine. A generation cancelled before this point starts
    /// cancelled: the engine ends it at once.
    func start(_ request: NormalizedRequest) throws(HostError) {
        guard let model = inner.withLock({ $0.model }) else { return }
        var request = request
        request.requestID = record?.id
        let run = try model.createRun(request)
        let metrics = server.metrics
        // The backstop behind the plugin's own max_wall_ms; the run then reports a time-limit finish.
        let watchdog = Task { [maxDuration = server.configuration.maxGenerationDuration + .seconds(1)] in
            guard (try? await Task.sleep(for: maxDuration)) != nil else { return }
            metrics.cancelled(.wallClock)
            run.cancel(reason: .timeLimit)
        }
        // Wakes the response's writer while the engine is silent, for keep-alive writes, and
        // cuts a connection whose client stopped taking what is written.
        let heartbeat = Task { [weak self, keepAlive = server.configuration.keepAliveInterval] in
            while (try? await Task.sleep(for: keepAlive)) != nil {
                run.wake()
                self?.cutIfStalled()
            }
        }
        let (cancelNow, over) = inner.withLock { inner in
            inner.heartbeat = heartbeat
            inner.watchdog = watchdog
            return (inner.state.started(run), inner.state.phase == .ended)
        }
        if over {
            heartbeat.cancel()
            watchdog.cancel()
        }
        run.onEnd { self.runEnded() }  // the run lets go of its hooks when it ends
        if cancelNow { run.cancel() }
        run.start()
    }

    /// The run's next batch of events (empty: the heartbeat's wake-up while it is silent).
    func nextEvents() async -> [GenerationEvent] {
        guard let run else { return [] }
        return await run.nextEvents()
    }

    /// Stops the generation in whatever phase it is. True for the first cancel of one
    /// that had work left to stop.
    @discardableResult
    func cancel() -> Bool {
        let (first, action, ticket) = inner.withLock { inner in
            let (first, action) = inner.state.cancel()
            return (first, action, inner.ticket)
        }
        switch action {
        case .none: break
        case .leaveQueue: ticket?.withdraw()
        case .cancelRun(let run): run.cancel()
        }
        return first
    }

    /// The response is done with the generation (or failed); idempotent.
    func end() {
        let (cleanup, inner) = inner.withLock { inner in (inner.state.end(), inner) }
        // A run whose result is out only waits for its engine to return: nothing to stop.
        if let run = cleanup.cancel, !run.hasEnded { run.cancel() }
        if cleanup.releaseRun { release(inner) }
        if cleanup.releaseResponse {
            inner.heartbeat?.cancel()
            if let hook = inner.connectionHook { connection?.removeHook(hook) }
        }
    }

    private func runEnded() {
        let (cleanup, inner) = inner.withLock { inner in (inner.state.runEnded(), inner) }
        if cleanup.releaseRun { release(inner) }
    }

    /// Out of the cancel registry, the model slot back, the watchdog stopped.
    private func release(_ inner: Inner) {
        if let registration = inner.registration { server.cancels.unregister(registration) }
        inner.watchdog?.cancel()
        inner.ticket?.withdraw()
        inner.ticket?.release()
    }

    // MARK: Writing the response

    /// Writes through `writer`, timed by the heartbeat's stall check. A big batch (events
    /// that piled up while the client paused) goes out in slices, each timed on its own: a
    /// client that reads slowly makes progress, one that stopped reading does not.
    func write(_ bytes: [UInt8], to writer: inout any ResponseBodyWriter) async throws {
        var start = 0
        while start < bytes.count {
            let end = min(start + Self.writeSlice, bytes.count)
            inner.withLock { $0.state.writeBegan(at: .now) }
            defer { inner.withLock { $0.state.writeEnded() } }
            try await writer.write(ByteBuffer(bytes: bytes[start..<end]))
            start = end
        }
    }

    static let writeSlice = 64 * 1024

    private func cutIfStalled() {
        let limit = server.currentWriteTimeout
        let (stalled, run) = inner.withLock { inner in (inner.state.writeStalled(at: .now, limit: limit), inner.state.run) }
        guard stalled, let run else { return }
        if !run.hasEnded { server.metrics.cancelled(.writeTimeout) }
        run.cancel()
        connection?.close()
    }
}
