import Logging
import PatchbayHost

/// What every route shares: configuration, plugins, models and the cancel registry.
public final class ServerState: Sendable {
    public let configuration: ServerConfiguration
    public let models: ModelRegistry
    public let cancels: CancelRegistry
    public let logger: Logger

    public var plugins: PluginCatalog { models.plugins }

    public init(configuration: ServerConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        let plugins = PluginCatalog(logger: logger)
        if let directory = configuration.pluginDirectory { plugins.discover(in: directory) }
        models = ModelRegistry(plugins: plugins, logger: logger, backendPreference: configuration.backendPreference)
        cancels = CancelRegistry()
    }
}
