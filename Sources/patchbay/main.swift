import ArgumentParser
import Foundation
import Hummingbird
import Logging
import PatchbayServer
import ServiceLifecycle

@main
struct Patchbay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "patchbay",
        abstract: "A local inference server with pluggable backends.",
        subcommands: [Serve.self],
        defaultSubcommand: Serve.self)
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve the OpenAI, Anthropic and model-management APIs.")

    @Option(help: "Address to bind.") var host = "127.0.0.1"
    @Option(help: "Port to listen on.") var port = 8000
    @Option(help: "Folder whose shared libraries are loaded as backend plugins.") var pluginDir: String?
    @Option(help: "Require this key (Authorization: Bearer, or x-api-key). Also read from PATCHBAY_API_KEY.") var apiKey: String?
    @Option(help: "Largest accepted request body, in MiB.") var maxBodyMb = 100
    @Option(help: "Wall-clock cap on one generation, in seconds.") var maxGenerationSeconds = 600
    @Option(help: "On SIGTERM/SIGINT, how long in-flight generations may finish before they are cancelled, in seconds.")
    var shutdownGraceSeconds = 10
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"
    @Option(help: ArgumentHelp(
        "Backend plugin to prefer when several can load a model file (repeatable, or comma-separated, first wins).",
        discussion: "Without it, the plugin whose probe is most confident wins, then the plugin name in alphabetical order. 'backend' in a load request always wins."))
    var preferBackend: [String] = []
    @Option(help: "While an engine processes a prompt and sends nothing, streams get an SSE keep-alive comment this often, in seconds.")
    var keepAliveSeconds = 1.0

    func validate() throws {
        guard (1...65535).contains(port) else { throw ValidationError("--port must be in 1...65535") }
        guard maxBodyMb > 0 else { throw ValidationError("--max-body-mb must be positive") }
        guard maxGenerationSeconds > 0 else { throw ValidationError("--max-generation-seconds must be positive") }
        guard shutdownGraceSeconds >= 0 else { throw ValidationError("--shutdown-grace-seconds must not be negative") }
        guard keepAliveSeconds >= 0.05 && keepAliveSeconds <= 60 else { throw ValidationError("--keep-alive-seconds must be in 0.05...60") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
    }

    func run() async throws {
        var logger = Logger(label: "patchbay")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.pluginDirectory = pluginDir
        configuration.apiKey = apiKey ?? ProcessInfo.processInfo.environment["PATCHBAY_API_KEY"]
        configuration.maxBodyBytes = maxBodyMb * 1024 * 1024
        configuration.maxGenerationDuration = .seconds(maxGenerationSeconds)
        configuration.shutdownGracePeriod = .seconds(shutdownGraceSeconds)
        configuration.backendPreference = preferBackend.flatMap { $0.split(separator: ",") }
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        configuration.keepAliveInterval = .milliseconds(Int(keepAliveSeconds * 1000))

        let state = ServerState(configuration: configuration, logger: logger)
        let app = buildApplication(state: state)
        // Graceful shutdown runs in reverse order: the drain first, then the HTTP server.
        let services = ServiceGroup(
            configuration: .init(
                services: [.init(service: app), .init(service: GenerationDrain(state: state))],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await services.run()
        // Every model is released, so no engine process outlives the host; then each
        // plugin may stop its own threads.
        await state.models.unloadAll()
        state.plugins.shutdownAll()
        logger.info("stopped")
    }
}
