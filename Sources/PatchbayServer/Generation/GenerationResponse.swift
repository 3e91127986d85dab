import Foundation
import HTTPTypes
import Hummingbird
import PatchbayCore
import PatchbayHost

extension ServerState {
    /// Serves one generation request of `route`: decode, validate, then a `Generation`
    /// through its phases, answered collected or as one SSE stream.
    func serveGeneration<Route: GenerationRoute>(_ route: Route, _ request: Request, context: PatchbayRequestContext) async throws -> Response {
        let body = try await route.decode(request, server: self)
        try body.validate()
        let id = Route.idPrefix + randomHex(24)
        let generation = Generation(server: self, keys: body.cancelKeys(runKey: Route.runKey(id)),
                                    connection: context.connection, waitingForModel: needsLoad(body.modelName))
        let response = GenerationResponse(route: route, body: body, id: id, hold: Generation.Hold(generation), server: self,
                                          dialect: context.route.dialect)
        return try await body.isStreaming ? response.stream() : response.collect()
    }
}

let eventStreamHeaders: HTTPFields = [
    .contentType: "text/event-stream",
    .cacheControl: "no-cache",
    HTTPField.Name("X-Accel-Buffering")!: "no",
]

/// Drives one generation to its response.
///
/// A collected answer waits through every phase and renders the result. A stream decides
/// as late as it can when to commit to 200, so that an early error is a status code: it
/// waits up to one keep-alive interval for its turn in line and then for the engine's
/// first output (a full line, a prompt too long: 429, 400). A model that must be loaded
/// first commits at once. After the commit one SSE body serves every phase: while nothing
/// else flows, it sends a comment naming the phase (`: loading model`, `: queued`,
/// `: keep-alive`) every keep-alive interval, and an error arrives in-band.
struct GenerationResponse<Route: GenerationRoute>: Sendable {
    let route: Route
    let body: Route.Body
    let id: String
    let hold: Generation.Hold
    let server: ServerState
    let dialect: Dialect

    private var generation: Generation { hold.generation }
    private var keepAlive: Duration { server.configuration.keepAliveInterval }

    /// Waiting for the model → in line: the model (loaded on first use), the route's plan
    /// for it, the capability check, a place in the model's line.
    private func prepare() async throws -> GenerationPlan {
        let model = try await server.model(named: body.modelName)
        let plan = try route.plan(body, id: id, model: model, limits: server.limits(for: model))
        try server.check(plan.request, against: model)
        try generation.enterQueue(on: model)
        return plan
    }

    func collect() async throws -> Response {
        let plan = try await prepare()
        guard case .collect(var collector) = plan.reply else { preconditionFailure("a collected answer needs a collector") }
        while try await !generation.waitTurn(patience: server.configuration.queueTimeout) {}
        try generation.start(plan.request)
        var output = EventOutput(plan: plan, record: generation.record, metrics: server.metrics)
        try await pump(&output) { events in events.forEach { collector.add($0) } }
        generation.end()
        if let error = collector.error { throw error }
        return collector.response()
    }

    func stream() async throws -> Response {
        guard generation.phase != .waitingForModel else { return eventStream(plan: nil, output: nil, first: []) }
        let plan = try await prepare()
        guard try await generation.waitTurn(patience: keepAlive) else { return eventStream(plan: plan, output: nil, first: []) }
        try generation.start(plan.request)
        var output = EventOutput(plan: plan, record: generation.record, metrics: server.metrics)
        // `output` goes to the body as firstEvents left it: it may have seen the terminal event.
        let first = try await firstEvents(&output)
        return eventStream(plan: plan, output: output, first: first)
    }

    /// The run's events until its first output, for at most one keep-alive interval (an
    /// engine that stays silent, a long prompt, only reports progress). An engine that
    /// fails before producing anything fails the request with its own status.
    private func firstEvents(_ output: inout EventOutput) async throws -> [GenerationEvent] {
        let deadline = ContinuousClock.now + keepAlive
        var pending: [GenerationEvent] = []
        while ContinuousClock.now < deadline && !pending.contains(where: { !$0.isProgress }) {
            pending += output.take(await generation.nextEvents())
        }
        if case .error(let error)? = pending.first(where: { !$0.isProgress }) {
            generation.end()
            throw error
        }
        return pending
    }

    /// The committed SSE response, from whatever phase the generation is in.
    private func eventStream(plan: GenerationPlan?, output: EventOutput?, first: [GenerationEvent]) -> Response {
        Response(status: .ok, headers: eventStreamHeaders, body: ResponseBody { [self, known = plan] writer in
            var encoder: (any EventStreamEncoder)?
            if case .stream(let given)? = plan?.reply { encoder = given }
            var silence = Silence(interval: keepAlive)
            do {
                let plan: GenerationPlan
                if let known { plan = known } else { plan = try await awaitPlan(writer: &writer, silence: &silence) }
                if encoder == nil, case .stream(let given) = plan.reply { encoder = given }
                while try await !generation.waitTurn(patience: keepAlive) {
                    try await write(silence.comment(for: .queued), to: &writer)
                }
                var output = output ?? EventOutput(plan: plan, record: generation.record, metrics: server.metrics)
                if generation.run == nil { try generation.start(plan.request) }
                try await pump(&output, startingWith: first) { events in
                    var out: [UInt8] = []
                    for event in events { encoder?.encode(event, into: &out) }
                    if events.allSatisfy(\.isProgress) {
                        out += silence.comment(for: .running)
                    } else {
                        silence.heard()
                    }
                    try await write(out, to: &writer)
                }
            } catch let error where error is APIError || error is HostError {
                var out: [UInt8] = []
                if encoder == nil { encoder = dialect.errorEncoder }
                encoder?.encode(error: APIError(from: error), into: &out)
                try await write(out, to: &writer)
            }
            generation.end()
            try await writer.finish(nil)
        })
    }

    /// The stream's wait for its model: a comment every keep-alive interval until it is loaded.
    private func awaitPlan(writer: inout any ResponseBodyWriter, silence: inout Silence) async throws -> GenerationPlan {
        let plan = Eventually { try await prepare() }
        while true {
            try await write(silence.comment(for: .waitingForModel), to: &writer)
            if let plan = try await plan.value(within: keepAlive) { return plan }
        }
    }

    private func write(_ bytes: [UInt8], to writer: inout any ResponseBodyWriter) async throws {
        if !bytes.isEmpty { try await generation.write(bytes, to: &writer) }
    }

    /// Hands each batch of events to `body` up to and including the terminal event,
    /// starting with `first` when given. A batch may be empty: the heartbeat's wake-up while
    /// the engine is silent. If `body` throws (the client went away), the run is cancelled.
    private func pump(_ output: inout EventOutput, startingWith first: [GenerationEvent]? = nil,
                      _ body: ([GenerationEvent]) async throws -> Void) async throws {
        func deliver(_ batch: [GenerationEvent]) async throws {
            do {
                try await body(batch)
            } catch {
                generation.cancel()
                throw error
            }
        }
        // `first` was taken already: it may hold the terminal event (an engine that was done
        // before the first read), so it goes out whether or not `output` is finished.
        if let first { try await deliver(first) }
        while !output.finished {
            try await deliver(output.take(await generation.nextEvents()))
        }
    }
}

/// What the response does with a run's events before its dialect sees them: cut after the
/// terminal event, a transcript shown as chat text, the access-log record and metrics fed.
struct EventOutput: Sendable {
    private let showsTranscriptAsContent: Bool
    private let record: RequestRecord?
    private let metrics: ServerMetrics
    private var transcriptStarted = false
    private var sawOutput = false
    private(set) var finished = false

    init(plan: GenerationPlan, record: RequestRecord?, metrics: ServerMetrics) {
        showsTranscriptAsContent = plan.showsTranscriptAsContent
        self.record = record
        self.metrics = metrics
    }

    mutating func take(_ events: [GenerationEvent]) -> [GenerationEvent] {
        var batch: [GenerationEvent] = []
        batch.reserveCapacity(events.count)
        for event in events where !finished {
            let event = present(event)
            observe(event)
            batch.append(event)
            finished = event.isTerminal
        }
        return batch
    }

    /// A transcript's segments in order as assistant text, the first without the space
    /// Whisper puts before each.
    private mutating func present(_ event: GenerationEvent) -> GenerationEvent {
        guard showsTranscriptAsContent, case .segment(let segment) = event else { return event }
        defer { transcriptStarted = true }
        return .content(transcriptStarted ? segment.text : String(segment.text.drop { $0.isWhitespace }))
    }

    /// Only the first output matters to the record (time to first token), then usage and
    /// the end: the tokens in between are skipped without touching the record's lock.
    private mutating func observe(_ event: GenerationEvent) {
        guard let record else { return }
        switch event {
        case .content, .reasoning, .toolCall, .segment:
            if sawOutput { return }
            sawOutput = true
            record.observe(event)
        case .progress, .timings, .language:
            return
        case .usage, .finish, .error:
            record.observe(event)
            if event.isTerminal { record.reportRun(to: metrics) }
        }
    }
}

/// When a stream last told its client something, so that silence gets a comment once per
/// keep-alive interval, and at once when the client has heard nothing yet.
struct Silence {
    let interval: Duration
    private var lastHeard: ContinuousClock.Instant?

    init(interval: Duration) {
        self.interval = interval
    }

    mutating func heard() { lastHeard = .now }

    /// The comment for `phase` when one is due, else nothing.
    mutating func comment(for phase: Generation.Phase) -> [UInt8] {
        guard lastHeard.map({ ContinuousClock.now - $0 >= interval }) ?? true else { return [] }
        lastHeard = .now
        var out: [UInt8] = []
        SSE.comment(phase.silenceComment, into: &out)
        return out
    }
}

extension Dialect {
    /// How an error after a stream's 200 is written before the route's own encoder exists
    /// (the model failed to load).
    var errorEncoder: any EventStreamEncoder {
        switch self {
        case .anthropic: AnthropicStreamEncoder(id: "msg_\(randomHex(24))", model: "")
        case .openAI, .management: ChatCompletionStreamEncoder(id: "", created: 0, model: "", includeUsage: false)
        }
    }
}
