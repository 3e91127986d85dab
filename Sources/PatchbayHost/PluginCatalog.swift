import Foundation
import Logging
import Synchronization

/// The plugins this host has opened, and the libraries it refused and why.
public final class PluginCatalog: Sendable {
    public struct Refusal: Sendable {
        public var path: String
        public var reason: String
    }

    private struct State {
        var plugins: [Plugin] = []
        var refusals: [Refusal] = []
    }

    private let state = Mutex(State())
    private let logger: Logger

    public init(logger: Logger) {
        self.logger = logger
    }

    public var plugins: [Plugin] { state.withLock { $0.plugins } }
    public var refusals: [Refusal] { state.withLock { $0.refusals } }

    /// Opens every shared library in `directory`. A library that is refused is logged and
    /// remembered; the others load regardless.
    public func discover(in directory: String) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        if names.isEmpty { logger.warning("no plugins found", metadata: ["plugin_dir": .string(directory)]) }
        for name in names.sorted() where name.hasSuffix(".so") || name.hasSuffix(".dylib") {
            let path = URL(fileURLWithPath: directory).appendingPathComponent(name).path
            do {
                _ = try load(path: path)
            } catch {
                // Already logged and remembered by load(path:).
            }
        }
    }

    /// Opens one library at runtime and adds it, e.g. a new backend dropped in by an operator.
    @discardableResult
    public func load(path: String) throws(PluginLoadError) -> Plugin {
        let path = URL(fileURLWithPath: path).standardizedFileURL.path
        do throws(PluginLoadError) {
            if let existing = state.withLock({ $0.plugins.first { $0.path == path } }) {
                throw PluginLoadError(path: path, reason: "already loaded as plugin '\(existing.name)'")
            }
            let plugin = try PluginLoader.open(path: path, logger: logger)
            try state.withLock { state throws(PluginLoadError) in
                if let clash = state.plugins.first(where: { $0.name == plugin.name }) {
                    throw PluginLoadError(path: path, reason: "a plugin named '\(plugin.name)' is already loaded from \(clash.path)")
                }
                state.plugins.append(plugin)
                state.refusals.removeAll { $0.path == path }
            }
            logger.info("plugin loaded", metadata: [
                "name": .string(plugin.name), "version": .string(plugin.version), "abi": .string(plugin.abiVersion),
                "path": .string(path),
            ])
            return plugin
        } catch {
            logger.error("plugin refused: \(error.description)")
            state.withLock { state in
                state.refusals.removeAll { $0.path == path }
                state.refusals.append(Refusal(path: path, reason: error.reason))
            }
            throw error
        }
    }

    public func plugin(named name: String) -> Plugin? {
        state.withLock { $0.plugins.first { $0.name == name } }
    }

    /// What every plugin answers when asked whether it can load `path` (its probe, or for a
    /// 1.0 plugin its file extensions), in the order the plugins were opened.
    public func probe(modelPath path: String) -> [(plugin: Plugin, score: Int, detail: String)] {
        plugins.map { plugin in
            let (score, detail) = plugin.probe(modelPath: path)
            return (plugin, score, detail)
        }
    }

    /// Calls every plugin's `shutdown` once (at exit, after every model was unloaded).
    public func shutdownAll() {
        for plugin in plugins { plugin.shutdown() }
    }
}
