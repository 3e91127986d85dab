import Hummingbird
import Logging
import PatchbayCore
import PatchbayHost
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Builds the HTTP application. The executable and the route tests both use this.
public func buildApplication(state: ServerState) -> some ApplicationProtocol {
    let configuration = state.configuration
    let routes = declaredRoutes(state)
    let router = Router(context: PatchbayRequestContext.self)
    let policy = OriginPolicy(boundHost: configuration.host, allowedHosts: configuration.allowedHosts, corsOrigins: configuration.corsOrigins)
    // Outermost: every request gets its route's traits, its id, its access-log line and its
    // metric, refused ones too.
    router.add(middleware: AccessLog(logger: configuration.accessLog ? state.logger : nil, metrics: state.metrics,
                                     routes: RouteTable(routes, groups: [.openAI, .anthropic, .management])))
    router.add(middleware: CORSHeaders(policy: policy))
    // Every error below becomes a response here, in the route's dialect.
    router.add(middleware: ErrorMiddleware(logger: state.logger))
    // Requests a web page must not make never reach a route or the key check.
    router.add(middleware: RequestGuard(policy: policy))
    let auth = AuthMiddleware(apiKey: configuration.apiKey, adminKey: configuration.adminKey)
    if auth.isEnabled { router.add(middleware: auth) }
    for route in routes {
        router.on(RouterPath(route.path), method: route.method, use: route.handler)
    }
    return Application(
        router: router,
        // A connection with no request in flight for two minutes is closed (a client that
        // opens connections and sends nothing must not hold them forever).
        server: .http1(configuration: .init(additionalChannelHandlers: [ClientDepartureHandler()], idleTimeout: .seconds(120))),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "patchbay"),
        logger: state.logger)
}

/// Every route the server has, each declared once with its group: its dialect, its access
/// class and its metric label come from there (`RouteTraits`).
func declaredRoutes(_ state: ServerState) -> [DeclaredRoute] {
    let openAI = RouteGroup.openAI
    let maxAudioBytes = state.configuration.maxAudioBytes
    let operations = [
        // For load balancers: 200 while serving, 503 once shutdown began.
        openAI.get("/health", access: .open) { _, _ in
            state.isStopping
                ? JSONResponse.value(.object([("status", .string("shutting_down"))]), status: .serviceUnavailable)
                : JSONResponse.value(.object([("status", .string("ok")), ("plugins", .int(Int64(state.plugins.plugins.count))),
                                              ("models", .int(Int64(state.models.models.count)))]))
        },
        openAI.get("/metrics", access: .management) { _, _ in
            guard state.metrics.registry != nil else { throw APIError.notFound("Metrics are off (--no-metrics).", code: "metrics_off") }
            return state.metricsResponse()
        },
    ]
    let generations = [
        openAI.post("/v1/chat/completions") { try await state.serveGeneration(ChatCompletionsRoute(maxAudioBytes: maxAudioBytes), $0, context: $1) },
        openAI.post("/v1/completions") { try await state.serveGeneration(CompletionsRoute(), $0, context: $1) },
        openAI.post("/v1/responses") { try await state.serveGeneration(ResponsesRoute(), $0, context: $1) },
        openAI.post("/v1/audio/transcriptions", takesMultipartForm: true) {
            try await state.serveGeneration(TranscriptionsRoute(maxAudioBytes: maxAudioBytes), $0, context: $1)
        },
        RouteGroup.anthropic.post("/v1/messages") { try await state.serveGeneration(MessagesRoute(), $0, context: $1) },
        RouteGroup.anthropic.post("/v1/messages/count_tokens") { request, _ in try await state.countTokens(request) },
    ]
    return operations + generations + EmbeddingsRoutes(state: state).routes + ModelsRoutes(state: state).routes
        + InferenceRoutes(state: state).routes + PluginsRoutes(state: state).routes + WebRoutes(state: state).routes
}

extension ServerState {
    /// `GET /metrics`: Prometheus's text format.
    func metricsResponse() -> Response {
        let current = models.models
        let ids = Set(current.map(\.id))
        let gone = reportedModels.withLock { reported in
            defer { reported = ids }
            return reported.subtracting(ids).sorted()
        }
        return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: metrics.exposition(models: current, gone: gone))))
    }
}

/// On graceful shutdown: refuses new generations (503), lets in-flight ones finish for
/// the grace period, then cancels the rest and waits for their engines to stop, so the
/// HTTP server can close. A second SIGINT/SIGTERM ends the grace period at once.
/// Runs before the server is asked to stop (it is listed after it in the service group).
public struct GenerationDrain: Service {
    let state: ServerState

    public init(state: ServerState) {
        self.state = state
    }

    public func run() async throws {
        try? await gracefulShutdown()
        state.beginStopping()
        defer { state.hurry() }
        let cancels = state.cancels
        let live = cancels.liveRunCount
        guard live > 0 else { return }
        state.logger.info("draining in-flight generations; a second signal stops them now", metadata: ["count": .stringConvertible(live)])
        let impatience = SecondSignal()
        let listener = Task {
            for await _ in await UnixSignalsSequence(trapping: .sigterm, .sigint) {
                impatience.raise()
                return
            }
        }
        defer { listener.cancel() }
        if await waitUntilIdle(cancels, for: state.configuration.shutdownGracePeriod, unless: impatience) { return }
        let cancelled = cancels.cancelAll()
        state.metrics.cancelled(.shutdown, count: cancelled)
        state.logger.warning("grace period over; cancelled generations", metadata: ["count": .stringConvertible(cancelled)])
        _ = await waitUntilIdle(cancels, for: .seconds(5), unless: nil)
    }

    /// True when every run ended in time; false on timeout or once `interrupt` was raised.
    private func waitUntilIdle(_ cancels: CancelRegistry, for duration: Duration, unless interrupt: SecondSignal?) async -> Bool {
        let deadline = ContinuousClock.now + duration
        while cancels.liveRunCount > 0 {
            if ContinuousClock.now >= deadline || interrupt?.isRaised == true { return false }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return true
    }
}

/// Set when a second SIGINT/SIGTERM arrives during the grace period.
private final class SecondSignal: Sendable {
    private let raised = Atomic<Bool>(false)
    func raise() { raised.store(true, ordering: .relaxed) }
    var isRaised: Bool { raised.load(ordering: .relaxed) }
}
