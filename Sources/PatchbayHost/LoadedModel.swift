import CPatchbayABI
import Foundation
import PatchbayCore
import Synchronization

/// A model a plugin holds, and the runs alive on it.
public final class LoadedModel: Sendable {
    /// The name clients use in `model` (an alias, or the file's name without extension).
    public let id: String
    public let modelPath: String
    public let plugin: Plugin
    /// Effective context length in tokens; nil when the plugin does not know.
    public let contextLength: Int?
    public let capabilities: Capabilities
    /// The rest of what the plugin told about the model (ABI 1.1's model info).
    public let details: ModelDetails
    public let loadedAt: Date
    /// Runs at once (the engine's slots) and the line behind them.
    public let admission: AdmissionQueue
    nonisolated(unsafe) let handle: OpaquePointer

    private struct RunState {
        /// When the model last had a run, or was loaded: for the idle unload.
        var lastActive = ContinuousClock.now
        var nextRunID: UInt64 = 0
        var runs: [UInt64: WeakRun] = [:]
        var accepting = true
        var idleWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let runState = Mutex(RunState())
    private let idleLimit = Mutex<Duration?>(nil)

    /// How long the model may sit idle before it is unloaded (`keep_alive`); nil: forever.
    public var keepAlive: Duration? {
        get { idleLimit.withLock { $0 } }
        set { idleLimit.withLock { $0 = newValue } }
    }

    /// Whether the model has been idle (no run, none waiting) for longer than its keep-alive.
    public var idleTooLong: Bool {
        guard let limit = keepAlive, admission.counts.waiting == 0 else { return false }
        return runState.withLock { $0.runs.isEmpty && ContinuousClock.now - $0.lastActive >= limit }
    }
    private let unloading = Mutex<Task<Void, Never>?>(nil)

    init(id: String, modelPath: String, plugin: Plugin, handle: OpaquePointer, queueCapacity: Int? = 64) {
        self.id = id
        self.modelPath = modelPath
        self.plugin = plugin
        self.handle = handle
        // The plugin fills the fields inside the size this host declares; a 1.0 plugin
        // leaves the 1.1 fields as the zeroes they start as.
        var info = pb_model_info()
        info.struct_size = UInt32(MemoryLayout<pb_model_info>.size)
        plugin.table.model_info(handle, &info)
        contextLength = info.context_length > 0 ? Int(info.context_length) : nil
        details = ModelDetails(info)
        // A model can narrow its plugin's capabilities (vision only with a projector), never widen them.
        let modelCapabilities = info.capabilities == 0 ? plugin.capabilities : Capabilities(rawValue: info.capabilities)
        capabilities = modelCapabilities.intersection(plugin.capabilities)
        loadedAt = Date()
        admission = AdmissionQueue(slots: queueCapacity == nil ? nil : details.parallelSlots, capacity: queueCapacity ?? 0)
    }

    /// Creates a run for a normalized request. Cheap; the engine starts in `Run.start()`.
    /// Byte inputs go to plugins that take them; for the others, images stay `data:` URLs.
    public func createRun(_ request: NormalizedRequest) throws(HostError) -> Run {
        var request = request
        var inputs: ByteInputStorage?
        if plugin.acceptsByteInputs {
            do {
                try request.moveImagesToByteInputs()
            } catch {
                throw HostError(.invalidRequest, error.message, param: error.param, code: error.code)
            }
            inputs = ByteInputStorage(request.inputs)
        } else if !request.inputs.isEmpty {
            throw HostError(.invalidRequest, "The backend '\(plugin.name)' of model '\(id)' does not accept audio or file inputs.",
                            param: "model", code: "unsupported_capability")
        }
        let json = request.json.jsonString
        // Recorded before the plugin sees the run, so an unload in between waits for it.
        let runID = try beginCall()
        var handle: OpaquePointer?
        var error = [CChar](repeating: 0, count: 1024)
        let status: pb_status
        if let inputs, let createWithInputs = plugin.table.run_create_with_inputs {
            status = createWithInputs(self.handle, json, inputs.pointers, inputs.count, &handle, &error, error.count)
        } else {
            status = plugin.table.run_create(self.handle, json, &handle, &error, error.count)
        }
        guard status == Int32(PB_OK), let handle else {
            runEnded(runID)
            throw HostError(pluginStatus: status, message: cMessage(error) ?? "the plugin refused the request")
        }
        let run = Run(model: self, id: runID, handle: handle, inputs: inputs)
        let accepting = runState.withLock { state in
            state.runs[runID] = WeakRun(run)
            return state.accepting
        }
        if !accepting { run.cancel() }  // an unload began meanwhile: this run ends at once
        return run
    }

    /// Records a run or plugin call about to start, so the model is not released under it.
    private func beginCall() throws(HostError) -> UInt64 {
        try runState.withLock { state throws(HostError) -> UInt64 in
            guard state.accepting else { throw HostError(.notFound, "Model '\(id)' is being unloaded.", code: "model_not_found") }
            state.nextRunID += 1
            state.runs[state.nextRunID] = WeakRun(nil)
            return state.nextRunID
        }
    }

    func runEnded(_ runID: UInt64) {
        let waiters = runState.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.runs[runID] = nil
            state.lastActive = .now
            guard state.runs.isEmpty else { return [] }
            defer { state.idleWaiters = [] }
            return state.idleWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    public var activeRunCount: Int { runState.withLock { $0.runs.count } }

    /// The runs that have not delivered their result yet, and plugin calls under way. A run
    /// whose terminal event is out (its client may already hold the answer) only waits for
    /// the plugin's call to return, so an unload need not refuse it.
    public var unfinishedRunCount: Int {
        // The strong references are dropped outside the lock: a last one runs the run's
        // deinit, which takes the lock itself.
        let runs = runState.withLock { state in state.runs.values.map(\.run) }
        return runs.count { !($0?.hasEnded ?? false) }
    }

    /// Stops taking new runs. Returns how many are still alive.
    func stopAccepting() -> Int {
        runState.withLock { state in
            state.accepting = false
            return state.runs.count
        }
    }

    /// Cancels every live run of this model.
    func cancelRuns() {
        // Strong references taken under the lock keep each handle alive while it is cancelled.
        let runs = runState.withLock { state in state.runs.values.compactMap(\.run) }
        for run in runs { run.cancel() }
    }

    /// Returns once no run of this model is alive.
    func waitUntilIdle() async {
        await withCheckedContinuation { continuation in
            let idle = runState.withLock { state in
                if state.runs.isEmpty { return true }
                state.idleWaiters.append(continuation)
                return false
            }
            if idle { continuation.resume() }
        }
    }

    /// Stops the model's runs and releases the engine's model, once: a second caller (two
    /// unloads, an unload racing a reload or shutdown) waits for the first one's work.
    func unload() async {
        let task = unloading.withLock { task in
            if let task { return task }
            let started = Task { [self] in
                _ = stopAccepting()
                cancelRuns()
                await waitUntilIdle()
                await onDedicatedThread(name: "patchbay-unload") {
                    self.plugin.table.unload(self.handle)
                    SystemMemory.giveBackFreed()
                }
            }
            task = started
            return started
        }
        await task.value
    }

    /// Counts tokens through the plugin's optional tokenize capability.
    public func countTokens(_ request: NormalizedRequest) async throws(HostError) -> Int {
        guard let countTokens = plugin.table.count_tokens, capabilities.contains(.tokenize) else {
            throw .invalidRequest("The backend '\(plugin.name)' of model '\(id)' cannot count tokens.", code: "unsupported_capability")
        }
        let json = request.json.jsonString
        return try await pluginCall(name: "patchbay-count-tokens") { handle throws(HostError) in
            var count: Int64 = 0
            var error = [CChar](repeating: 0, count: 1024)
            let status = countTokens(handle, json, &count, &error, error.count)
            guard status == Int32(PB_OK) else {
                throw HostError(pluginStatus: status, message: cMessage(error) ?? "token counting failed")
            }
            return Int(count)
        }
    }

    /// Embeds one text through the plugin's optional embeddings capability.
    public func embed(_ text: String) async throws(HostError) -> [Float] {
        guard let embed = plugin.table.embed, capabilities.contains(.embeddings) else {
            throw .invalidRequest("Model '\(id)' (backend '\(plugin.name)') does not support embeddings.",
                                  param: "model", code: "unsupported_capability")
        }
        return try await pluginCall(name: "patchbay-embed") { handle throws(HostError) in
            var vector = [Float](repeating: 0, count: 1024)
            var error = [CChar](repeating: 0, count: 1024)
            var dimensions = 0
            var status = Int32(PB_OK)
            // The plugin says how many dimensions it needs; ask again with room for them.
            for _ in 0..<2 {
                let utf8 = Array(text.utf8)
                status = embed(handle, utf8.map { CChar(bitPattern: $0) }, utf8.count, &vector, vector.count, &dimensions, &error, error.count)
                if status == Int32(PB_OK) || dimensions <= vector.count { break }
                vector = [Float](repeating: 0, count: dimensions)
            }
            guard status == Int32(PB_OK) else {
                throw HostError(pluginStatus: status, message: cMessage(error) ?? "embedding failed")
            }
            return Array(vector.prefix(dimensions))
        }
    }

    /// A blocking plugin call on a thread of its own (a plugin may do I/O), tracked like a
    /// run so that an unload waits for it instead of freeing the model under it.
    private func pluginCall<T: Sendable>(name: String, _ body: @escaping @Sendable (OpaquePointer) throws(HostError) -> T) async throws(HostError) -> T {
        let callID = try beginCall()
        defer { runEnded(callID) }
        let result: Result<T, HostError> = await onDedicatedThread(name: name) { [self] in
            Result { () throws(HostError) in try body(self.handle) }
        }
        return try result.get()
    }
}

/// What a plugin says about a loaded model beyond its context length and capabilities;
/// nil where the plugin does not know (a 1.0 plugin knows none of it).
public struct ModelDetails: Sendable {
    public var parallelSlots: Int?
    public var embeddingDimensions: Int?
    public var trainingContextLength: Int?
    public var parameterCount: Int?
    public var sizeBytes: UInt64?
    public var architecture: String?

    init(_ info: pb_model_info) {
        func known<T: BinaryInteger>(_ value: T) -> Int? { value > 0 ? Int(value) : nil }
        parallelSlots = known(info.parallel_slots)
        embeddingDimensions = known(info.embedding_dimensions)
        trainingContextLength = known(info.training_context_length)
        parameterCount = known(info.parameter_count)
        sizeBytes = info.size_bytes > 0 ? info.size_bytes : nil
        architecture = info.architecture.map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    }
}

/// A live run, or (nil) a plugin call in progress; either keeps the model from being released.
private struct WeakRun {
    weak var run: Run?
    init(_ run: Run?) { self.run = run }
}

/// The NUL-terminated message a plugin wrote into an error buffer; nil when it wrote none.
func cMessage(_ buffer: [CChar]) -> String? {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
}
