import CPatchbayABI
import Foundation
import Synchronization

/// What the clauses of one worker process share: the plugin, the workload, the main model,
/// the line to the checker, and the timing of [non-blocking] calls.
final class WorkerContext: @unchecked Sendable {
    let options: CheckOptions
    let library: PluginLibrary
    let workload: Workload
    /// The ABI minor of the host table this worker handed the plugin.
    let hostMinor: Int
    /// Host structs end at guard pages (struct-bounds, host-1.0) instead of zero padding.
    let guarded: Bool
    let output: WorkerOutput
    /// The clause that runs now (for reports).
    private(set) var clause = ""
    private let calls = Mutex<[String: CallStat]>([:])
    /// Set when a plugin call never returned: its thread still holds plugin state, so this
    /// worker stops after the clause and the checker starts a fresh one for the rest.
    var poisoned: String? { poison.withLock { $0 } }
    private let poison = Mutex<String?>(nil)

    /// The model most clauses share, loaded on first use.
    private var mainModel: CheckModel?
    private var mainModelFailure: String?
    private var runCounter = 0

    init(options: CheckOptions, library: PluginLibrary, workload: Workload, hostMinor: Int, guarded: Bool, output: WorkerOutput) {
        self.options = options
        self.library = library
        self.workload = workload
        self.hostMinor = hostMinor
        self.guarded = guarded
        self.output = output
    }

    var table: pb_plugin_api { library.table }

    // MARK: Limits

    /// A time limit in seconds, scaled by --time-scale.
    func seconds(_ base: Double) -> Double { base * options.timeScale }
    /// A [non-blocking] call slower than this fails non-blocking-calls (run_cancel has its own).
    var nonBlockingLimitMilliseconds: Double { 1000 * options.timeScale }
    /// A cancelled run must end within this long after run_cancel returned.
    var cancelToEndLimitMilliseconds: Double { 3000 * options.timeScale }

    // MARK: Clauses

    func begin(_ clause: String) {
        self.clause = clause
        output.send(.begin(clause))
    }

    /// Sends the clause's result and the timing of its calls.
    func finish(_ result: ClauseResult) {
        let stats = calls.withLock { calls in
            defer { calls = [:] }
            return calls
        }
        if !stats.isEmpty { output.send(WorkerMessage(t: .calls, clause: result.clause, calls: stats)) }
        output.send(.result(result))
    }

    /// Called from any thread that gave up waiting for the plugin.
    func poison(_ why: String) {
        poison.withLock { if $0 == nil { $0 = why } }
    }

    /// Runs a plugin call, recording how long it took under `name`.
    func time<T>(_ name: String, _ body: () -> T) -> T {
        let (value, milliseconds) = timed(body)
        calls.withLock { $0[name, default: CallStat()].add(milliseconds) }
        return value
    }

    func nextRunID() -> Int {
        runCounter += 1
        return runCounter
    }

    /// Sends a run's record for the clauses judged over every run.
    func report(_ recorder: RunRecorder, executed: Bool) {
        output.send(WorkerMessage(t: .run, clause: recorder.clause, run: recorder.report(executed: executed)))
    }

    // MARK: The main model

    /// The main model, loaded on first use; nil with the reason when there is none.
    func model() -> Result<CheckModel, ModelUnavailable> {
        if let mainModel { return .success(mainModel) }
        if let mainModelFailure { return .failure(ModelUnavailable(reason: mainModelFailure)) }
        guard let path = workload.modelPath else {
            mainModelFailure = workload.noModelReason
            return .failure(ModelUnavailable(reason: workload.noModelReason))
        }
        let outcome = load(path: path)
        guard let model = outcome.model else {
            mainModelFailure = "the model did not load (\(outcome.failureDescription))"
            return .failure(ModelUnavailable(reason: mainModelFailure!))
        }
        mainModel = model
        return .success(model)
    }

    /// Loads the main model now (the load clause), keeping it for the clauses after.
    func loadMainModel() -> LoadOutcome? {
        guard mainModel == nil, mainModelFailure == nil, let path = workload.modelPath else { return nil }
        let outcome = load(path: path)
        if let model = outcome.model {
            mainModel = model
        } else {
            mainModelFailure = "the model did not load (\(outcome.failureDescription))"
        }
        return outcome
    }

    /// The main model if it was loaded (nil otherwise, without loading it).
    var loadedMainModel: CheckModel? { mainModel }

    /// Unloads the main model (a later `model()` loads it again). Returns unload's time, or nil
    /// when it did not return in time.
    func unloadMainModel() -> Double? {
        guard let model = mainModel else { return 0 }
        mainModel = nil
        return unload(model)
    }

    /// Loads `path`; `cancelWhen` answers each progress call (true: cancel).
    func load(path: String, cancelWhen: ((LoadProgressRecorder.Call, Int) -> Bool)? = nil) -> LoadOutcome {
        let recorder = LoadProgressRecorder(cancelWhen: cancelWhen)
        let callbacks = recorder.makeCallbacks(guarded: guarded)
        let request = workload.loadRequest(modelPath: path)
        let requestString = GuardedMemory.string(request, guarded: guarded, label: "the load request JSON")
        let errorSize = 2048
        let error = GuardedMemory.allocate(errorSize, guarded: guarded, label: "the error buffer of load", alignment: 1)
            .assumingMemoryBound(to: CChar.self)
        let box = Box<(pb_status, OpaquePointer?, Double)>((-1, nil, 0))
        let table = self.table
        let thread = CheckThread("pbcheck-load") {
            let start = nowMilliseconds()
            var handle: OpaquePointer?
            let status = table.load(requestString, callbacks, &handle, error, errorSize)
            box.value = (status, handle, nowMilliseconds() - start)
            recorder.loadReturned()
        }
        guard thread.wait(seconds: seconds(600)) else {
            poison("load did not return within \(Int(seconds(600))) s")
            return LoadOutcome(status: nil, model: nil, message: "", milliseconds: seconds(600) * 1000, progress: recorder)
        }
        let (status, handle, milliseconds) = box.value
        let message = Self.message(in: error, size: errorSize)
        var model: CheckModel?
        if status == Int32(PB_OK), let handle { model = CheckModel(handle: handle, path: path, context: self) }
        return LoadOutcome(status: status, model: model, message: message, milliseconds: milliseconds, progress: recorder)
    }

    /// Whether a model was unloaded in this worker (the plugin's once-only state exists).
    private(set) var unloadedBefore = false

    /// Unloads a model on a thread of its own; its time, or nil when it did not return in time.
    func unload(_ model: CheckModel) -> Double? {
        unloadedBefore = true
        let table = self.table
        let handle = model.handle
        let box = Box<Double>(0)
        let thread = CheckThread("pbcheck-unload") {
            let start = nowMilliseconds()
            table.unload(handle)
            box.value = nowMilliseconds() - start
        }
        guard thread.wait(seconds: seconds(60)) else {
            poison("unload did not return within \(Int(seconds(60))) s")
            return nil
        }
        return box.value
    }

    /// The message in an error buffer: up to its first NUL, never past `size`.
    static func message(in buffer: UnsafePointer<CChar>, size: Int) -> String {
        let bytes = UnsafeRawBufferPointer(start: buffer, count: size)
        let end = bytes.firstIndex(of: 0) ?? size
        return String(decoding: bytes[0..<end], as: UTF8.self)
    }

    struct ModelUnavailable: Error {
        var reason: String
    }

}

/// A loaded model and what model_info said about it.
final class CheckModel: @unchecked Sendable {
    let handle: OpaquePointer
    let path: String
    let info: pb_model_info

    init(handle: OpaquePointer, path: String, context: WorkerContext) {
        self.handle = handle
        self.path = path
        var info = pb_model_info()
        info.struct_size = UInt32(MemoryLayout<pb_model_info>.size)
        if !context.guarded { context.table.model_info(handle, &info) }
        self.info = info
    }

    var contextLength: Int { Int(max(0, info.context_length)) }
    var parallelSlots: Int { Int(max(0, info.parallel_slots)) }
}

/// What a load did.
struct LoadOutcome {
    /// nil: it never returned.
    var status: pb_status?
    var model: CheckModel?
    var message: String
    var milliseconds: Double
    var progress: LoadProgressRecorder

    var failureDescription: String {
        guard let status else { return "load never returned" }
        return "status \(status)\(message.isEmpty ? "" : ": \(message)")"
    }
}

/// The load callbacks' side: every progress call, and the answer it got.
final class LoadProgressRecorder: @unchecked Sendable {
    struct Call {
        var phase: String
        var loaded: UInt64
        var total: UInt64
        var at: Double
    }

    let started = nowMilliseconds()
    private let cancelWhen: ((Call, Int) -> Bool)?
    private let state = Mutex<(calls: [Call], cancelledAt: Double?, returned: Double?, late: Int)>(([], nil, nil, 0))

    init(cancelWhen: ((Call, Int) -> Bool)?) {
        self.cancelWhen = cancelWhen
        Self.keepAlive.withLock { $0.append(self) }
    }

    private static let keepAlive = Mutex<[LoadProgressRecorder]>([])

    func makeCallbacks(guarded: Bool) -> UnsafeMutablePointer<pb_load_callbacks> {
        let size = MemoryLayout<pb_load_callbacks>.size
        let memory = GuardedMemory.allocate(size, guarded: guarded, label: "pb_load_callbacks (struct_size \(size))")
        let callbacks = memory.bindMemory(to: pb_load_callbacks.self, capacity: 1)
        callbacks.initialize(to: pb_load_callbacks(
            struct_size: UInt32(size), context: Unmanaged.passUnretained(self).toOpaque(),
            progress: { context, phase, loaded, total in
                guard let context else { return 0 }
                return Unmanaged<LoadProgressRecorder>.fromOpaque(context).takeUnretainedValue().progress(phase, loaded, total)
            }))
        return callbacks
    }

    private func progress(_ phase: UnsafePointer<CChar>?, _ loaded: UInt64, _ total: UInt64) -> Int32 {
        let call = Call(phase: phase.map { String(cString: $0) } ?? "(NULL)", loaded: loaded, total: total, at: nowMilliseconds())
        return state.withLock { state -> Int32 in
            if state.returned != nil { state.late += 1 }
            state.calls.append(call)
            if state.cancelledAt != nil { return 1 }
            if let cancelWhen, cancelWhen(call, state.calls.count - 1) {
                state.cancelledAt = call.at
                return 1
            }
            return 0
        }
    }

    func loadReturned() { state.withLock { $0.returned = nowMilliseconds() } }

    var calls: [Call] { state.withLock { $0.calls } }
    var cancelledAt: Double? { state.withLock { $0.cancelledAt } }
    var returnedAt: Double? { state.withLock { $0.returned } }
    /// Progress calls after load returned (the callbacks were no longer valid).
    var lateCalls: Int { state.withLock { $0.late } }
}
