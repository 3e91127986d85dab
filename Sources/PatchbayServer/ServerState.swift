import Logging
import PatchbayHost
import Prometheus
import Synchronization

/// What every route shares: configuration, plugins, models and the cancel registry.
public final class ServerState: Sendable {
    public let configuration: ServerConfiguration
    public let models: ModelRegistry
    public let cancels: CancelRegistry
    public let logger: Logger
    let metrics: ServerMetrics
    private let stopping = Atomic<Bool>(false)
    /// The models `/metrics` showed last time, so that an unloaded one's gauges go to 0.
    let reportedModels = Mutex<Set<String>>([])
    /// Loads from `--models-dir` in progress, by model id, shared by the requests that wait for them.
    let onDemandLoads = Mutex<[String: Task<LoadedModel, any Error>]>([:])
    private let hurrying = Atomic<Bool>(false)

    public var plugins: PluginCatalog { models.plugins }

    /// `metricsRegistry`: where the metrics go (the one swift-metrics was bootstrapped
    /// with), for `GET /metrics`; nil serves no metrics.
    public init(configuration: ServerConfiguration, logger: Logger, metricsRegistry: PrometheusCollectorRegistry? = nil) {
        self.configuration = configuration
        self.logger = logger
        metrics = ServerMetrics(registry: metricsRegistry)
        let plugins = PluginCatalog(logger: logger)
        for directory in configuration.pluginDirectories { plugins.discover(in: directory) }
        models = ModelRegistry(plugins: plugins, logger: logger, backendPreference: configuration.backendPreference,
                               queueCapacity: configuration.admissionQueue ? configuration.maxQueue : nil)
        cancels = CancelRegistry()
        metrics.pluginRefused(count: plugins.refusals.count)
    }

    /// Shutdown began: new generations and loads are refused.
    var isStopping: Bool { stopping.load(ordering: .relaxed) }
    func beginStopping() { stopping.store(true, ordering: .relaxed) }

    /// Shutdown must not wait for a client that stopped reading: once the grace period is
    /// over, a stalled write is cut after a second instead of the write timeout.
    func hurry() { hurrying.store(true, ordering: .relaxed) }
    var currentWriteTimeout: Duration { hurrying.load(ordering: .relaxed) ? .seconds(1) : configuration.writeTimeout }
}
