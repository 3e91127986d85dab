import ArgumentParser
import Foundation
import Hummingbird
import Logging
import Metrics
import Prometheus
import PatchbayCore
import PatchbayHost
import PatchbayServer
import ServiceLifecycle

@main
struct Patchbay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "patchbay",
        abstract: "A local inference server with pluggable backends.",
        subcommands: [Serve.self, PluginCommand.self],
        defaultSubcommand: Serve.self)
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve the OpenAI, Anthropic and model-management APIs.")

    @Option(help: "Address to bind.") var host = "127.0.0.1"
    @Option(help: "Port to listen on.") var port = 8000
    @Option(help: ArgumentHelp(
        "Folder whose shared libraries are loaded as backend plugins (repeatable).",
        discussion: "POST /api/plugins/load opens libraries from these folders only."))
    var pluginDir: [String] = []
    @Option(help: "Require this key (Authorization: Bearer, or x-api-key). Also read from PATCHBAY_API_KEY.") var apiKey: String?
    @Option(help: ArgumentHelp(
        "Require this key on the management routes (load, unload, validate, plugins). Also read from PATCHBAY_ADMIN_KEY.",
        discussion: "Without it, --api-key guards those routes too."))
    var adminKey: String?
    @Option(help: ArgumentHelp(
        "Host names to accept in the Host header besides loopback names and the bound address (repeatable or comma-separated; '*.example.com', '*').",
        discussion: "Requests naming another host are refused (403): this stops DNS-rebinding web pages."))
    var allowedHosts: [String] = []
    @Option(help: ArgumentHelp(
        "Web origins whose pages may call the API, e.g. https://chat.example.com (repeatable or comma-separated; '*' for any). Also read from PATCHBAY_CORS_ORIGINS.",
        discussion: "Without it, requests from pages of other origins are refused (403)."))
    var corsOrigins: [String] = []
    @Option(help: "A response write the client does not take within this many seconds cuts its connection and stops its generation.")
    var writeTimeoutSeconds = 30.0
    @Option(help: "Largest accepted request body, in MiB.") var maxBodyMb = 100
    @Option(help: "Largest audio file /v1/audio/transcriptions accepts, in MiB.") var maxAudioMb = 25
    @Option(help: "Requests that may wait for a busy model's slots, per model; past that, 429.") var maxQueue = 64
    @Option(help: "A request waiting this many seconds for a slot gets 503.") var queueTimeoutSeconds = 300.0
    @Flag(help: "No admission queue: every request goes to its engine at once (which queues or refuses by itself).")
    var noAdmissionQueue = false
    @Flag(help: "No metrics: GET /metrics answers 404 and nothing is recorded.") var noMetrics = false
    @Flag(help: "No access-log line per request.") var noAccessLog = false
    @Option(help: ArgumentHelp(
        "Folder of model files that requests may name (by file name without extension): loaded on first use, listed by /v1/models.",
        discussion: "Off unless set."))
    var modelsDir: String?
    @Option(help: "How long a model may sit idle before it is unloaded, unless its load says (keep_alive): seconds, or 30s, 5m, 1h; -1 keeps models loaded.")
    var modelKeepAlive = "-1"
    @Option(help: "Wall-clock cap on one generation, in seconds.") var maxGenerationSeconds = 600
    @Option(help: "On SIGTERM/SIGINT, how long in-flight generations may finish before they are cancelled, in seconds.")
    var shutdownGraceSeconds = 10
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"
    @Option(help: "Log lines as text (for people) or json (one object per line, for log collectors).") var logFormat = "text"
    @Option(help: ArgumentHelp(
        "Backend plugin to prefer when several can load a model file (repeatable, or comma-separated, first wins).",
        discussion: "Without it, the plugin whose probe is most confident wins, then the plugin name in alphabetical order. 'backend' in a load request always wins."))
    var preferBackend: [String] = []
    @Option(help: "While an engine processes a prompt and sends nothing, streams get an SSE keep-alive comment this often, in seconds.")
    var keepAliveSeconds = 1.0

    func validate() throws {
        guard (1...65535).contains(port) else { throw ValidationError("--port must be in 1...65535") }
        guard maxBodyMb > 0 else { throw ValidationError("--max-body-mb must be positive") }
        guard maxAudioMb > 0 else { throw ValidationError("--max-audio-mb must be positive") }
        guard maxQueue >= 0 else { throw ValidationError("--max-queue must not be negative") }
        guard KeepAlive(parsing: modelKeepAlive) != nil else { throw ValidationError("--model-keep-alive must be seconds or a duration like 5m") }
        if let modelsDir {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: modelsDir, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw ValidationError("--models-dir \(modelsDir) is not a folder")
            }
        }
        guard queueTimeoutSeconds > 0 else { throw ValidationError("--queue-timeout-seconds must be positive") }
        guard maxGenerationSeconds > 0 else { throw ValidationError("--max-generation-seconds must be positive") }
        guard shutdownGraceSeconds >= 0 else { throw ValidationError("--shutdown-grace-seconds must not be negative") }
        guard writeTimeoutSeconds >= 1 && writeTimeoutSeconds <= 3600 else { throw ValidationError("--write-timeout-seconds must be in 1...3600") }
        guard keepAliveSeconds >= 0.05 && keepAliveSeconds <= 60 else { throw ValidationError("--keep-alive-seconds must be in 0.05...60") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        guard ["text", "json"].contains(logFormat) else { throw ValidationError("--log-format must be text or json") }
    }

    func run() async throws {
        SystemMemory.limitArenas()
        if logFormat == "json" { LoggingSystem.bootstrap { JSONLogHandler(label: $0) } }
        // Every metric the server records goes to this registry, which GET /metrics shows.
        let metricsRegistry = noMetrics ? nil : PrometheusCollectorRegistry()
        if let metricsRegistry { MetricsSystem.bootstrap(ServerMetrics.factory(registry: metricsRegistry)) }
        var logger = Logger(label: "patchbay")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        let environment = ProcessInfo.processInfo.environment
        configuration.pluginDirectories = pluginDir
        configuration.apiKey = apiKey ?? environment["PATCHBAY_API_KEY"]
        configuration.adminKey = adminKey ?? environment["PATCHBAY_ADMIN_KEY"]
        configuration.allowedHosts = Self.list(allowedHosts)
        configuration.corsOrigins = Self.list(corsOrigins.isEmpty ? [environment["PATCHBAY_CORS_ORIGINS"] ?? ""] : corsOrigins)
        configuration.writeTimeout = .milliseconds(Int(writeTimeoutSeconds * 1000))
        configuration.maxBodyBytes = maxBodyMb * 1024 * 1024
        configuration.maxAudioBytes = maxAudioMb * 1024 * 1024
        configuration.maxQueue = maxQueue
        configuration.admissionQueue = !noAdmissionQueue
        configuration.accessLog = !noAccessLog
        configuration.modelsDirectory = modelsDir.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        configuration.modelKeepAlive = KeepAlive(parsing: modelKeepAlive)?.idleLimit
        configuration.queueTimeout = .milliseconds(Int(queueTimeoutSeconds * 1000))
        configuration.maxGenerationDuration = .seconds(maxGenerationSeconds)
        configuration.shutdownGracePeriod = .seconds(shutdownGraceSeconds)
        configuration.backendPreference = Self.list(preferBackend)
        configuration.keepAliveInterval = .milliseconds(Int(keepAliveSeconds * 1000))

        let state = ServerState(configuration: configuration, logger: logger, metricsRegistry: metricsRegistry)
        let app = buildApplication(state: state)
        // Graceful shutdown runs in reverse order: the drain first (at once: new generations
        // get 503), then the idle unloader, then the HTTP server.
        let services = ServiceGroup(
            configuration: .init(
                services: [.init(service: app), .init(service: IdleModelUnloader(state: state)),
                           .init(service: GenerationDrain(state: state))],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await services.run()
        // Every model is released, so no engine process outlives the host; then each
        // plugin may stop its own threads.
        await state.models.unloadAll()
        state.plugins.shutdownAll()
        logger.info("stopped")
    }

    /// Repeated and comma-separated values as one list.
    static func list(_ values: [String]) -> [String] {
        values.flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }
}
