import CPatchbayABI
import Foundation
import Logging
import PatchbayCore
import Synchronization

/// Which plugin holds which model: loading (with progress), serving, unloading.
public final class ModelRegistry: Sendable {
    /// Progress of one load, as `/api/inference/load-progress` reports it.
    public struct LoadProgress: Sendable, Equatable {
        public var modelID: String?
        public var phase: String?
        public var bytesLoaded: UInt64 = 0
        public var bytesTotal: UInt64 = 0

        public var fraction: Double {
            if phase == "ready" { return 1 }
            guard bytesTotal > 0 else { return 0 }
            return min(1, Double(bytesLoaded) / Double(bytesTotal))
        }

        static let idle = LoadProgress()
    }

    private struct State {
        var models: [LoadedModel] = []
        /// Models taken out of `models` whose unload has not finished.
        var unloading: [LoadedModel] = []
        var loading: [String: LoadTracker] = [:]
        /// The load that started last, so a UI polling without naming a model sees it.
        var latestLoad: LoadTracker?
        /// Set at shutdown: no model may be added any more.
        var closed = false
    }

    public let plugins: PluginCatalog
    /// Plugin names in order of preference, for a file several plugins can load.
    public let backendPreference: [String]
    /// How many requests may wait for each model's slots (`--max-queue`); nil: no admission
    /// queue, every request goes to the engine at once.
    public let queueCapacity: Int?
    private let state = Mutex(State())
    private let logger: Logger

    public init(plugins: PluginCatalog, logger: Logger, backendPreference: [String] = [], queueCapacity: Int? = 64) {
        self.plugins = plugins
        self.logger = logger
        self.backendPreference = backendPreference
        self.queueCapacity = queueCapacity
    }

    public var models: [LoadedModel] { state.withLock { $0.models } }
    public var loadingIDs: [String] { state.withLock { $0.loading.keys.sorted() } }

    /// The model a request names. No name (or "default") means the model loaded first.
    public func model(named name: String?) throws(HostError) -> LoadedModel {
        let models = self.models
        guard let name, !name.isEmpty, name != "default" else {
            guard let first = models.first else {
                throw .invalidRequest("No model is loaded. Load one with POST /api/inference/load.", param: "model", code: "model_not_loaded")
            }
            return first
        }
        guard let model = models.first(where: { $0.id == name || $0.modelPath == name }) else {
            throw .notFound("The model '\(name)' does not exist or is not loaded.", param: "model", code: "model_not_found")
        }
        return model
    }

    /// Resolves which plugin would serve `path`. An explicit `backend` wins. Otherwise every
    /// plugin is probed; among those that can load the file, the first in
    /// `backendPreference` wins, then the highest probe score, then the name in
    /// alphabetical order (so the choice never depends on the order plugins were found).
    public func resolvePlugin(modelPath path: String, backend: String?) throws(HostError) -> Plugin {
        if let backend, !backend.isEmpty {
            guard let plugin = plugins.plugin(named: backend) else {
                let known = plugins.plugins.map(\.name).joined(separator: ", ")
                throw .invalidRequest("No backend plugin named '\(backend)' is loaded (loaded: \(known.isEmpty ? "none" : known)).",
                                      param: "backend", code: "backend_not_found")
            }
            return plugin
        }
        let answers = plugins.probe(modelPath: path)
        let candidates = answers.filter { $0.score > 0 }
        guard !candidates.isEmpty else {
            let why = answers.map { "\($0.plugin.name): \($0.detail.isEmpty ? "cannot load it" : $0.detail)" }.joined(separator: "; ")
            throw .invalidRequest(
                "No backend plugin can load '\(URL(fileURLWithPath: path).lastPathComponent)' (\(why.isEmpty ? "no plugins are loaded" : why)); name one with 'backend'.",
                param: "model_path", code: "no_backend_for_format")
        }
        func rank(_ name: String) -> Int { backendPreference.firstIndex(of: name) ?? backendPreference.count }
        return candidates.min { a, b in
            if rank(a.plugin.name) != rank(b.plugin.name) { return rank(a.plugin.name) < rank(b.plugin.name) }
            if a.score != b.score { return a.score > b.score }
            return a.plugin.name < b.plugin.name
        }!.plugin
    }

    /// Loads a model; blocks the caller (not a thread) until it is ready, failed or cancelled.
    /// `body` is the whole load request, handed to the plugin as JSON; `request` was validated.
    public func load(_ request: LoadModelRequest, body: JSONValue) async throws(HostError) -> (model: LoadedModel, alreadyLoaded: Bool) {
        let path = request.modelPath
        try Self.checkModelFile(path)
        let plugin = try resolvePlugin(modelPath: path, backend: request.backend)
        let id = request.alias ?? URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
        let tracker = LoadTracker(modelID: id)

        let existing = try state.withLock { state throws(HostError) -> LoadedModel? in
            if state.closed { throw Self.shuttingDown }
            if state.loading[id] != nil { throw .conflict("Model '\(id)' is already loading.", code: "load_in_progress") }
            if let model = state.models.first(where: { $0.id == id }), request.forceReload != true { return model }
            state.loading[id] = tracker
            state.latestLoad = tracker
            return nil
        }
        if let existing {
            guard existing.modelPath == path else {
                throw .conflict("A different model is already loaded as '\(id)' (\(existing.modelPath)); unload it or choose another 'alias'.",
                                code: "model_id_taken")
            }
            return (existing, true)
        }
        defer { state.withLock { _ = $0.loading.removeValue(forKey: id) } }
        if request.forceReload == true, let old = models.first(where: { $0.id == id }) {
            try await unload(old, forceCancelActive: true)
        }

        logger.info("loading model", metadata: ["model": .string(id), "backend": .string(plugin.name), "path": .string(path)])
        let requestJSON = body.jsonString
        let outcome = await onDedicatedThread(name: "patchbay-load") { () -> Result<LoadedModel, HostError> in
            var callbacks = pb_load_callbacks(
                struct_size: UInt32(MemoryLayout<pb_load_callbacks>.size),
                context: Unmanaged.passUnretained(tracker).toOpaque(),
                progress: { context, phase, loaded, total in
                    guard let context else { return 0 }
                    let tracker = Unmanaged<LoadTracker>.fromOpaque(context).takeUnretainedValue()
                    return tracker.report(phase: phase.map { String(cString: $0) }, loaded: loaded, total: total) ? 0 : 1
                })
            var handle: OpaquePointer?
            var error = [CChar](repeating: 0, count: 2048)
            let status = withExtendedLifetime(tracker) {
                plugin.table.load(requestJSON, &callbacks, &handle, &error, error.count)
            }
            guard status == Int32(PB_OK), let handle else {
                let message = cMessage(error) ?? "the backend could not load the model"
                if status == Int32(PB_ERR_CANCELLED) || tracker.isCancelled {
                    return .failure(.conflict("Model load cancelled: \(message)", code: "load_cancelled"))
                }
                return .failure(HostError(pluginStatus: status, message: message))
            }
            return .success(LoadedModel(id: id, modelPath: path, plugin: plugin, handle: handle,
                                         queueCapacity: self.queueCapacity))
        }
        let model = try outcome.get()
        tracker.markReady()
        let added = state.withLock { state in
            guard !state.closed else { return false }
            state.models.removeAll { $0.id == id }
            state.models.append(model)
            return true
        }
        guard added else {
            await model.unload()
            throw Self.shuttingDown
        }
        logger.info("model ready", metadata: ["model": .string(id), "context_length": .stringConvertible(model.contextLength ?? 0)])
        return (model, false)
    }

    /// Unloads a model by id or path. A model still loading has its load cancelled; one
    /// already unloading is waited for.
    /// With live runs: 409, unless `forceCancelActive`, which cancels them and waits for them to end.
    /// Returns the id that was unloaded.
    @discardableResult
    public func unload(named name: String, forceCancelActive: Bool) async throws(HostError) -> String {
        func named(_ model: LoadedModel) -> Bool { model.id == name || model.modelPath == name }
        let (tracker, loaded, leaving) = state.withLock { state in
            (state.loading[name], state.models.first(where: named), state.unloading.first(where: named))
        }
        if let tracker {
            tracker.cancel()
            return tracker.modelID
        }
        if let model = loaded ?? leaving {
            try await unload(model, forceCancelActive: forceCancelActive || loaded == nil)
            return model.id
        }
        throw HostError.notFound("The model '\(name)' is not loaded.", param: "model_path", code: "model_not_found")
    }

    private func unload(_ model: LoadedModel, forceCancelActive: Bool) async throws(HostError) {
        let unfinished = model.unfinishedRunCount
        if !forceCancelActive && unfinished > 0 {
            throw .conflict("Model '\(model.id)' has \(unfinished) active generation(s); cancel them or pass force_cancel_active=true.",
                            code: "active_generations")
        }
        let first = state.withLock { state in
            let wasListed = state.models.contains { $0 === model }
            state.models.removeAll { $0 === model }
            if wasListed { state.unloading.append(model) }
            return wasListed
        }
        await model.unload()
        state.withLock { $0.unloading.removeAll { $0 === model } }
        if first { logger.info("model unloaded", metadata: ["model": .string(model.id)]) }
    }

    /// Unloads everything (shutdown): cancels loads and waits for them to return, then
    /// cancels the runs and releases every model. No model can be added afterwards.
    public func unloadAll() async {
        let loads = state.withLock { state in
            state.closed = true
            return Array(state.loading.values)
        }
        for load in loads { load.cancel() }
        let deadline = ContinuousClock.now + .seconds(30)
        while !state.withLock({ $0.loading.isEmpty }) && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        for model in state.withLock({ $0.models + $0.unloading }) { try? await unload(model, forceCancelActive: true) }
    }

    /// A model is a file (or a folder, for engines whose models are folders): never a
    /// device, pipe or socket, which a plugin would read forever.
    public static func checkModelFile(_ path: String) throws(HostError) {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw .notFound("Model file not found: \(path)", param: "model_path", code: "model_not_found")
        }
        let type = info.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFDIR else {
            throw .invalidRequest("'\(path)' is not a regular file.", param: "model_path", code: "invalid_value")
        }
    }

    public static let shuttingDown = HostError(.unavailable, "The server is shutting down.", code: "server_shutting_down")

    /// Progress of the named load, or of the latest one.
    public func loadProgress(modelID: String? = nil) -> LoadProgress {
        state.withLock { state in
            if let modelID, let tracker = state.loading[modelID] { return tracker.progress }
            if modelID == nil, let tracker = state.latestLoad { return tracker.progress }
            if let modelID, state.models.contains(where: { $0.id == modelID }) {
                return LoadProgress(modelID: modelID, phase: "ready", bytesLoaded: 0, bytesTotal: 0)
            }
            return .idle
        }
    }
}

/// One load in flight: the progress the plugin reports and the host's cancel flag.
final class LoadTracker: Sendable {
    let modelID: String
    private let state: Mutex<ModelRegistry.LoadProgress>
    private let cancelled = Atomic<Bool>(false)

    init(modelID: String) {
        self.modelID = modelID
        state = Mutex(ModelRegistry.LoadProgress(modelID: modelID, phase: "starting"))
    }

    /// Returns false when the load should stop.
    func report(phase: String?, loaded: UInt64, total: UInt64) -> Bool {
        state.withLock { progress in
            if let phase { progress.phase = phase }
            progress.bytesLoaded = loaded
            progress.bytesTotal = total
        }
        return !isCancelled
    }

    func markReady() {
        state.withLock { progress in
            progress.phase = "ready"
            progress.bytesLoaded = max(progress.bytesLoaded, progress.bytesTotal)
        }
    }

    func cancel() { cancelled.store(true, ordering: .relaxed) }
    var isCancelled: Bool { cancelled.load(ordering: .relaxed) }
    var progress: ModelRegistry.LoadProgress { state.withLock { $0 } }
}
