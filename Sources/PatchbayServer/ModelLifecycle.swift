import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost
import ServiceLifecycle
import Synchronization

/// Models that load on first use (`--models-dir`) and unload when idle (`keep_alive`).
extension ServerState {
    /// A file in `--models-dir` that a plugin can load, by the name a request uses for it
    /// (the file's name without its extension, as a load without an alias names it).
    struct AvailableModel {
        var id: String
        var path: String
        var backend: String
    }

    /// What `--models-dir` offers (none without it): its files that some plugin claims.
    var availableModels: [AvailableModel] {
        guard let directory = configuration.modelsDirectory,
              let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return [] }
        return names.sorted().compactMap { name in
            let path = URL(fileURLWithPath: directory).appendingPathComponent(name).path
            var isDirectory: ObjCBool = false
            guard !name.hasPrefix("."), FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue,
                  let plugin = try? models.resolvePlugin(modelPath: path, backend: nil) else { return nil }
            return AvailableModel(id: URL(fileURLWithPath: name).deletingPathExtension().lastPathComponent, path: path, backend: plugin.name)
        }
    }

    /// The model a request names; one in `--models-dir` that is not loaded yet is loaded
    /// first (requests naming it meanwhile share that one load).
    func model(named name: String?) async throws -> LoadedModel {
        do {
            return try models.model(named: name)
        } catch {
            guard let name, let available = availableModels.first(where: { $0.id == name }) else { throw error }
            return try await loadOnDemand(available)
        }
    }

    /// Whether a request naming `name` would wait for a load first.
    func needsLoad(_ name: String?) -> Bool {
        guard configuration.modelsDirectory != nil, let name, (try? models.model(named: name)) == nil else { return false }
        return availableModels.contains { $0.id == name }
    }

    private func loadOnDemand(_ available: AvailableModel) async throws -> LoadedModel {
        if isStopping { throw ModelRegistry.shuttingDown }
        let load = onDemandLoads.withLock { loads -> Task<LoadedModel, any Error> in
            if let running = loads[available.id] { return running }
            let task = Task { [self] in
                defer { _ = onDemandLoads.withLock { $0.removeValue(forKey: available.id) } }
                logger.info("loading on first use", metadata: ["model": .string(available.id), "path": .string(available.path)])
                let request = LoadModelRequest(modelPath: available.path)
                let started = ContinuousClock.now
                do {
                    let (model, alreadyLoaded) = try await models.load(request, body: .object([("model_path", .string(available.path))]))
                    if !alreadyLoaded {
                        model.keepAlive = configuration.modelKeepAlive
                        metrics.modelLoad(backend: model.plugin.name, succeeded: true, duration: .now - started)
                    }
                    return model
                } catch {
                    metrics.modelLoad(backend: available.backend, succeeded: false, duration: .now - started)
                    throw error
                }
            }
            loads[available.id] = task
            return task
        }
        return try await load.value
    }
}

/// Unloads models idle for longer than their `keep_alive`; checks twice a second.
public struct IdleModelUnloader: Service {
    let state: ServerState

    public init(state: ServerState) {
        self.state = state
    }

    public func run() async throws {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            try? await Task.sleep(for: .milliseconds(500))
            for model in state.models.models where model.idleTooLong {
                state.logger.info("unloading idle model", metadata: ["model": .string(model.id)])
                _ = try? await state.models.unload(named: model.id, forceCancelActive: false)
            }
        }
    }
}
