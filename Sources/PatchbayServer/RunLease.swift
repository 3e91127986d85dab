import Hummingbird
import PatchbayCore
import PatchbayHost

/// Holds a run's place in the cancel registry for as long as its response exists.
///
/// It is registered before the response starts, and removed on every exit path:
/// explicitly when the run ends, and by `deinit` when a response is dropped
/// unfinished (client gone, write failed), which also stops the engine.
final class RunLease: Sendable {
    let run: Run
    private let registry: CancelRegistry
    private let registration: CancelRegistry.RunID
    private let watchdog: Task<Void, Never>
    private let heartbeat: Task<Void, Never>
    let keepAliveInterval: Duration

    init(run: Run, keys: [CancelRegistry.Key], registry: CancelRegistry, maxDuration: Duration, keepAliveInterval: Duration) {
        self.run = run
        self.registry = registry
        self.keepAliveInterval = keepAliveInterval
        registration = registry.register(keys) { [run] in run.cancel() }
        // The backstop behind the plugin's own max_wall_ms; the run then reports a time-limit finish.
        watchdog = Task { [run] in
            guard (try? await Task.sleep(for: maxDuration)) != nil else { return }
            run.cancel(reason: .timeLimit)
        }
        // Wakes the response's writer while the engine is silent, for keep-alive writes.
        heartbeat = Task { [run] in
            while (try? await Task.sleep(for: keepAliveInterval)) != nil { run.wake() }
        }
        run.start()
    }

    deinit {
        end()
        run.cancel()
    }

    /// Deregisters the run; idempotent.
    func end() {
        registry.unregister(registration)
        watchdog.cancel()
        heartbeat.cancel()
    }

    /// Waits for the run's first output, before a streaming response commits to 200. An
    /// engine that fails before producing anything (a prompt longer than the context, a busy
    /// or lost engine) then fails the request with its own status, as the engine itself
    /// would. An engine that stays silent (a long prompt) only reports progress; after one
    /// keep-alive interval the response commits anyway, so the client hears from us.
    func firstEvents() async throws -> [GenerationEvent] {
        let deadline = ContinuousClock.now + keepAliveInterval
        var pending: [GenerationEvent] = []
        while true {
            pending += await run.nextEvents()
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
                    batch = await run.nextEvents()
                }
                if let terminal = batch.firstIndex(where: \.isTerminal) {
                    batch.removeSubrange((terminal + 1)...)
                    finished = true
                }
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
                if !out.isEmpty { try await writer.write(ByteBuffer(bytes: out)) }
            }
            try await writer.finish(nil)
        })
    }
}

extension ServerState {
    /// Creates, registers and starts a run; the returned lease is already in the cancel registry.
    func startRun(on model: LoadedModel, request: NormalizedRequest, keys: [CancelRegistry.Key]) throws(APIError) -> RunLease {
        let run = try model.createRun(request)
        return RunLease(run: run, keys: keys, registry: cancels, maxDuration: configuration.maxGenerationDuration + .seconds(1),
                        keepAliveInterval: configuration.keepAliveInterval)
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
