import Hummingbird
import Logging
import PatchbayCore
import PatchbayHost
import ServiceLifecycle

/// Builds the HTTP application. The executable and the route tests both use this.
public func buildApplication(state: ServerState) -> some ApplicationProtocol {
    let router = Router()
    router.add(middleware: ErrorMiddleware(logger: state.logger))
    if let apiKey = state.configuration.apiKey, !apiKey.isEmpty {
        router.add(middleware: AuthMiddleware(apiKey: apiKey))
    }
    router.get("/health") { _, _ in JSONResponse.value(.object([("status", .string("ok"))])) }
    ChatCompletionsRoutes(state: state).register(on: router)
    MessagesRoutes(state: state).register(on: router)
    CompletionsRoutes(state: state).register(on: router)
    ResponsesRoutes(state: state).register(on: router)
    EmbeddingsRoutes(state: state).register(on: router)
    ModelsRoutes(state: state).register(on: router)
    InferenceRoutes(state: state).register(on: router)
    PluginsRoutes(state: state).register(on: router)
    return Application(
        router: router,
        configuration: .init(address: .hostname(state.configuration.host, port: state.configuration.port), serverName: "patchbay"),
        logger: state.logger)
}

/// On graceful shutdown: lets in-flight generations finish for the grace period, then
/// cancels the rest and waits for their streams to end, so the HTTP server can close.
/// Runs before the server is asked to stop (it is listed after it in the service group).
public struct GenerationDrain: Service {
    let state: ServerState

    public init(state: ServerState) {
        self.state = state
    }

    public func run() async throws {
        try? await gracefulShutdown()
        let cancels = state.cancels
        let live = cancels.liveRunCount
        guard live > 0 else { return }
        state.logger.info("draining in-flight generations", metadata: ["count": .stringConvertible(live)])
        if await waitUntilIdle(cancels, for: state.configuration.shutdownGracePeriod) { return }
        let cancelled = cancels.cancelAll()
        state.logger.warning("grace period over; cancelled generations", metadata: ["count": .stringConvertible(cancelled)])
        _ = await waitUntilIdle(cancels, for: .seconds(5))
    }

    private func waitUntilIdle(_ cancels: CancelRegistry, for duration: Duration) async -> Bool {
        let deadline = ContinuousClock.now + duration
        while cancels.liveRunCount > 0 {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return true
    }
}
