import Hummingbird
import Synchronization
import PatchbayCore
import PatchbayHost

/// A run as its HTTP response sees it: in the cancel registry until the engine ends it,
/// watched for a client that leaves, and written with a timeout.
///
/// - The run leaves the cancel registry when the engine delivered its terminal event, not
///   when the response is written: neither an unload nor shutdown waits on a client.
/// - A client that goes away (closes its side, or the connection drops) cancels the run,
///   also while a non-streaming request or a silent engine writes nothing.
/// - A write the client does not take within the write timeout (it stopped reading)
///   cuts the connection, which fails the write and cancels the run.
/// - A response dropped unfinished cancels the run (`deinit`).
final class RunLease: Sendable {
    let run: Run
    let keepAliveInterval: Duration
    /// How the response shows each event (a transcript as chat text); identity by default.
    private let present: @Sendable (GenerationEvent) -> GenerationEvent
    private let connection: ClientConnection?
    private let connectionHook: UInt64?
    private let writes: WriteClock
    private let watchdog: Task<Void, Never>
    private let heartbeat: Task<Void, Never>
    private let record: RequestRecord?
    private let metrics: ServerMetrics
    private let sawOutput = Atomic<Bool>(false)

    /// Takes over from `PendingRun`: its cancel registration, its cancel target and its hook
    /// on the connection, and the model slot its ticket holds, given back when the run ends.
    init(run: Run, registration: CancelRegistry.RunID, target: CancelTarget, ticket: AdmissionQueue.Ticket,
         state: ServerState, connection: ClientConnection?, connectionHook: UInt64?, record: RequestRecord?,
         presenting present: @escaping @Sendable (GenerationEvent) -> GenerationEvent) {
        self.run = run
        self.present = present
        self.keepAliveInterval = state.configuration.keepAliveInterval
        self.connection = connection
        self.connectionHook = connectionHook
        self.record = record
        let metrics = state.metrics
        self.metrics = metrics
        let writes = WriteClock()
        self.writes = writes
        let registry = state.cancels
        // The backstop behind the plugin's own max_wall_ms; the run then reports a time-limit finish.
        let watchdog = Task { [run, maxDuration = state.configuration.maxGenerationDuration + .seconds(1)] in
            guard (try? await Task.sleep(for: maxDuration)) != nil else { return }
            metrics.cancelled(.wallClock)
            run.cancel(reason: .timeLimit)
        }
        self.watchdog = watchdog
        run.onEnd {
            registry.unregister(registration)
            watchdog.cancel()
            ticket.release()
        }
        // Wakes the response's writer while the engine is silent, for keep-alive writes, and
        // cuts a connection whose client stopped taking what is written.
        heartbeat = Task { [run, writes, connection, keepAliveInterval, state] in
            while (try? await Task.sleep(for: keepAliveInterval)) != nil {
                run.wake()
                if writes.stalled(longerThan: state.currentWriteTimeout) {
                    if !run.hasEnded { metrics.cancelled(.writeTimeout) }
                    run.cancel()
                    connection?.close()
                }
            }
        }
        target.attach(run)
        run.start()
    }

    deinit {
        end()
        run.cancel()
    }

    /// The response is done with the run; idempotent.
    func end() {
        heartbeat.cancel()
        if let connectionHook { connection?.removeHook(connectionHook) }
    }

    /// Writes through `writer`, timed by the heartbeat's stall check. A big batch (events
    /// that piled up while the client paused) goes out in slices, each timed on its own: a
    /// client that reads slowly makes progress, one that stopped reading does not.
    func write(_ bytes: [UInt8], to writer: inout any ResponseBodyWriter) async throws {
        var start = 0
        while start < bytes.count {
            let end = min(start + Self.writeSlice, bytes.count)
            writes.begin()
            defer { writes.end() }
            try await writer.write(ByteBuffer(bytes: bytes[start..<end]))
            start = end
        }
    }

    static let writeSlice = 64 * 1024

    /// Waits for the run's first output, before a streaming response commits to 200. An
    /// engine that fails before producing anything (a prompt longer than the context, a busy
    /// or lost engine) then fails the request with its own status, as the engine itself
    /// would. An engine that stays silent (a long prompt) only reports progress; after one
    /// keep-alive interval the response commits anyway, so the client hears from us.
    func firstEvents() async throws -> [GenerationEvent] {
        let deadline = ContinuousClock.now + keepAliveInterval
        var pending: [GenerationEvent] = []
        while true {
            pending += await run.nextEvents().map(present)
            if let first = pending.first(where: { !$0.isProgress }) {
                if case .error(let error) = first {
                    end()
                    throw error
                }
                return pending
            }
            if ContinuousClock.now >= deadline { return pending }
        }
    }

    /// Hands each batch of events to `body`, up to and including the terminal event,
    /// starting with `first` (from `firstEvents`) when given. A batch may be empty: the
    /// heartbeat's wake-up while the engine is silent.
    /// If `body` throws (the client went away), the run is cancelled.
    func pump(startingWith first: [GenerationEvent]? = nil, _ body: ([GenerationEvent]) async throws -> Void) async throws {
        do {
            var finished = false
            var pending = first
            while !finished {
                var batch: [GenerationEvent]
                if let taken = pending {
                    batch = taken
                    pending = nil
                } else {
                    batch = await run.nextEvents().map(present)
                }
                if let terminal = batch.firstIndex(where: \.isTerminal) {
                    batch.removeSubrange((terminal + 1)...)
                    finished = true
                }
                observe(batch)
                try await body(batch)
            }
            end()
        } catch {
            run.cancel()
            end()
            throw error
        }
    }
}

extension RunLease {
    /// Feeds the access-log record, and at the run's end its metrics.
    /// Only the first output matters (time to first token), then usage and the end: the
    /// tokens in between are skipped without touching the record's lock.
    private func observe(_ events: [GenerationEvent]) {
        guard let record else { return }
        for event in events {
            switch event {
            case .content, .reasoning, .toolCall, .segment:
                if sawOutput.load(ordering: .relaxed) { continue }
                sawOutput.store(true, ordering: .relaxed)
                record.observe(event)
            case .progress, .timings, .language:
                continue
            case .usage, .finish, .error:
                record.observe(event)
                if event.isTerminal { record.reportRun(to: metrics) }
            }
        }
    }

    /// The whole run, for a response that is not streamed; an engine error is thrown.
    func collect() async throws -> ChatCompletionAccumulator {
        var result = ChatCompletionAccumulator()
        try await pump { events in events.forEach { result.add($0) } }
        if let error = result.error { throw error }
        return result
    }

    /// The streaming response: the run's events through `encoder`, starting with `first`.
    /// While the engine sends nothing to show (prompt processing), an SSE comment goes out
    /// every keep-alive interval: proxies keep the connection open, and a client that left
    /// is noticed. A write that fails (the client went away) cancels the run.
    func eventStream(startingWith first: [GenerationEvent], encoder: some EventStreamEncoder) -> Response {
        Response(status: .ok, headers: eventStreamHeaders, body: ResponseBody { [self, encoder] writer in
            try await writeStream(to: &writer, startingWith: first, encoder: encoder)
        })
    }

    /// The run's events through `encoder` into a committed SSE response, then its end.
    func writeStream(to writer: inout any ResponseBodyWriter, startingWith first: [GenerationEvent]? = nil,
                     encoder: some EventStreamEncoder) async throws {
        var encoder = encoder
        // When the client last heard something other than progress.
        var lastSign: ContinuousClock.Instant?
        try await pump(startingWith: first) { events in
            var out: [UInt8] = []
            for event in events { encoder.encode(event, into: &out) }
            let silent = events.allSatisfy(\.isProgress)
            if !silent {
                lastSign = .now
            } else if lastSign.map({ ContinuousClock.now - $0 >= keepAliveInterval }) ?? true {
                SSE.comment("keep-alive", into: &out)
                lastSign = .now
            }
            if !out.isEmpty { try await write(out, to: &writer) }
        }
        try await writer.finish(nil)
    }
}

extension ServerState {
    /// Puts a generation in its model's line (see `PendingRun`): admitted at once when a
    /// slot is free, 429 when the line is full. During shutdown, 503.
    func enterQueue(on model: LoadedModel, request: NormalizedRequest, keys: [CancelRegistry.Key],
                    connection: ClientConnection?,
                    presenting present: @escaping @Sendable (GenerationEvent) -> GenerationEvent = { $0 }) throws(APIError) -> PendingRun {
        if isStopping {
            throw APIError(status: 503, message: "The server is shutting down.", code: "server_shutting_down", retryAfterSeconds: 5)
        }
        guard let ticket = model.admission.enter() else {
            let (running, waiting) = model.admission.counts
            throw APIError(status: 429, message: "Model '\(model.id)' is busy: \(running) running and \(waiting) waiting, the most its queue holds (--max-queue). Try again shortly.",
                           code: "rate_limit_exceeded", retryAfterSeconds: 1)
        }
        return PendingRun(state: self, model: model, request: request, keys: keys, connection: connection, ticket: ticket,
                          presenting: present)
    }

    /// `max_tokens` when the client sets none: the model's context length, never a small number.
    func defaultMaxTokens(for model: LoadedModel) -> Int {
        model.contextLength ?? configuration.fallbackMaxTokens
    }

    var maxWallMilliseconds: Int {
        let (seconds, attoseconds) = configuration.maxGenerationDuration.components
        return Int(seconds) * 1000 + Int(attoseconds / 1_000_000_000_000_000)
    }
}

/// When the write in progress began, so that a heartbeat can tell a stalled one.
final class WriteClock: Sendable {
    /// Nanoseconds since `origin` when the current write began; -1 when none is in progress.
    private let startedAt = Atomic<Int64>(-1)
    private let origin = ContinuousClock.now

    func begin() { startedAt.store(Self.nanoseconds(ContinuousClock.now - origin), ordering: .relaxed) }
    func end() { startedAt.store(-1, ordering: .relaxed) }

    func stalled(longerThan limit: Duration) -> Bool {
        let started = startedAt.load(ordering: .relaxed)
        return started >= 0 && Self.nanoseconds(ContinuousClock.now - origin) - started >= Self.nanoseconds(limit)
    }

    private static func nanoseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
