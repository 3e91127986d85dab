import Hummingbird
import Synchronization
import PatchbayCore
import PatchbayHost

/// A generation from the moment its request is accepted: first in its model's line
/// (`AdmissionQueue`), then running (`RunLease`). It is in the cancel registry, and watched
/// for a client that leaves, from the start: a cancel or a departure while it waits takes
/// it out of line at once.
///
///     let pending = try state.enterQueue(on: model, request: normalized, keys: keys, connection: connection)
///     let lease = try await pending.run()               // not streamed: wait, then run
///     return try await pending.stream(encoder: encoder)  // streamed: keep-alive comments while in line
final class PendingRun: Sendable {
    private let state: ServerState
    private let model: LoadedModel
    private let request: NormalizedRequest
    private let present: @Sendable (GenerationEvent) -> GenerationEvent
    private let ticket: AdmissionQueue.Ticket
    private let target: CancelTarget
    private let registration: CancelRegistry.RunID
    private let connection: ClientConnection?
    private let connectionHook: UInt64?
    /// The request's access-log record, which the run fills in.
    private let record: RequestRecord?
    /// Set once a lease took over the registration and the hook.
    private let handedOver = Atomic<Bool>(false)

    init(state: ServerState, model: LoadedModel, request: NormalizedRequest, keys: [CancelRegistry.Key],
         connection: ClientConnection?, ticket: AdmissionQueue.Ticket,
         presenting present: @escaping @Sendable (GenerationEvent) -> GenerationEvent) {
        self.state = state
        self.model = model
        let record = RequestRecord.current
        self.record = record
        record?.model = model.id
        var request = request
        request.requestID = record?.id
        self.request = request
        self.present = present
        self.ticket = ticket
        self.connection = connection
        let target = CancelTarget(ticket: ticket)
        self.target = target
        registration = state.cancels.register(keys) { target.cancel() }
        connectionHook = connection?.onGone { [metrics = state.metrics] in
            if target.cancel() { metrics.cancelled(.clientDisconnect) }
        }
    }

    deinit {
        // Never handed to a lease (the request failed before its run started): give back
        // what it held.
        if !handedOver.load(ordering: .relaxed) {
            ticket.withdraw()
            ticket.release()
            state.cancels.unregister(registration)
            if let connectionHook { connection?.removeHook(connectionHook) }
        }
    }

    /// Waits for the model's turn, at most the queue timeout (then 503), and starts the run.
    /// A run cancelled while it waited starts cancelled: the engine ends it at once and the
    /// client gets the usual answer of a cancelled run.
    func run() async throws -> RunLease {
        guard try await waitTurn(patience: state.configuration.queueTimeout) else {
            ticket.withdraw()
            throw queueTimeout
        }
        return try startRun()
    }

    /// The streamed response. Before committing to 200 it waits up to one keep-alive
    /// interval, for its turn and then for the engine's first output, so that an error
    /// either way (a full line, a prompt too long) is a status code. Past that it sends
    /// SSE keep-alive comments while in line; a queue timeout then arrives in-band.
    func stream(encoder: some EventStreamEncoder) async throws -> Response {
        let keepAlive = state.configuration.keepAliveInterval
        if try await waitTurn(patience: keepAlive) {
            let lease = try startRun()
            return lease.eventStream(startingWith: try await lease.firstEvents(), encoder: encoder)
        }
        return Response(status: .ok, headers: eventStreamHeaders, body: ResponseBody { [self] writer in
            var encoder = encoder
            let deadline = ContinuousClock.now + state.configuration.queueTimeout - keepAlive
            while true {
                var out: [UInt8] = []
                SSE.comment("queued", into: &out)
                try await writer.write(ByteBuffer(bytes: out))
                let now = ContinuousClock.now
                if now >= deadline { break }
                if try await waitTurn(patience: min(keepAlive, deadline - now)) { break }
            }
            guard ticket.isAdmitted || target.isCancelled else {
                ticket.withdraw()
                var out: [UInt8] = []
                encoder.encode(.error(queueTimeout), into: &out)
                try await writer.write(ByteBuffer(bytes: out))
                try await writer.finish(nil)
                return
            }
            let lease = try startRun()
            try await lease.writeStream(to: &writer, encoder: encoder)
        })
    }

    /// True once admitted, or cancelled while in line (its run then starts cancelled);
    /// false when `patience` ran out first. Throws when the client left meanwhile.
    private func waitTurn(patience: Duration) async throws -> Bool {
        let outcome = await ticket.wait(upTo: patience)
        if connection?.isGone == true { throw CancellationError() }
        return outcome == .admitted || target.isCancelled
    }

    private var queueTimeout: APIError {
        APIError(status: 503, message: "The request waited \(state.configuration.queueTimeout) for model '\(model.id)' and was not served; try again later.",
                 code: "queue_timeout", retryAfterSeconds: 5)
    }

    private func startRun() throws -> RunLease {
        let run = try model.createRun(request)
        handedOver.store(true, ordering: .relaxed)
        return RunLease(run: run, registration: registration, target: target, ticket: ticket, state: state,
                        connection: connection, connectionHook: connectionHook, record: record, presenting: present)
    }
}

/// What a cancel stops: the request's place in line while it waits, then its run.
final class CancelTarget: Sendable {
    private struct State {
        var run: Run?
        var cancelled = false
    }

    private let ticket: AdmissionQueue.Ticket
    private let state = Mutex(State())

    init(ticket: AdmissionQueue.Ticket) {
        self.ticket = ticket
    }

    var isCancelled: Bool { state.withLock { $0.cancelled } }

    /// True for the first cancel of a request still waiting or running.
    @discardableResult
    func cancel() -> Bool {
        let (first, run) = state.withLock { state -> (Bool, Run?) in
            defer { state.cancelled = true }
            return (!state.cancelled, state.run)
        }
        let waiting = ticket.withdraw()
        run?.cancel()
        return first && (waiting || run.map { !$0.hasEnded } ?? false)
    }

    /// The run takes over; a cancel that came while it waited cancels it now.
    func attach(_ run: Run) {
        let cancelled = state.withLock { state -> Bool in
            state.run = run
            return state.cancelled
        }
        if cancelled { run.cancel() }
    }
}
