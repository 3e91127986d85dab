import Logging
import PatchbayHost
import Synchronization

/// What every route shares: configuration, plugins, models and the cancel registry.
public final class ServerState: Sendable {
    public let configuration: ServerConfiguration
    public let models: ModelRegistry
    public let cancels: CancelRegistry
    public let logger: Logger
    private let stopping = Atomic<Bool>(false)
    private let hurrying = Atomic<Bool>(false)

    public var plugins: PluginCatalog { models.plugins }

    public init(configuration: ServerConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        let plugins = PluginCatalog(logger: logger)
        for directory in configuration.pluginDirectories { plugins.discover(in: directory) }
        models = ModelRegistry(plugins: plugins, logger: logger, backendPreference: configuration.backendPreference,
                               queueCapacity: configuration.maxQueue)
        cancels = CancelRegistry()
    }

    /// Shutdown began: new generations and loads are refused.
    var isStopping: Bool { stopping.load(ordering: .relaxed) }
    func beginStopping() { stopping.store(true, ordering: .relaxed) }

    /// Shutdown must not wait for a client that stopped reading: once the grace period is
    /// over, a stalled write is cut after a second instead of the write timeout.
    func hurry() { hurrying.store(true, ordering: .relaxed) }
    var currentWriteTimeout: Duration { hurrying.load(ordering: .relaxed) ? .seconds(1) : configuration.writeTimeout }
}
