import CPatchbayABI
import Foundation
import Synchronization

/// One run driven the way the host drives it: run_create (or run_create_with_inputs when the
/// table has it), run_execute on a thread of its own, run_cancel from anywhere, run_destroy
/// once. Cancel and destroy exclude each other, so no cancel ever reaches a destroyed run.
final class CheckRun: @unchecked Sendable {
    let context: WorkerContext
    let model: CheckModel
    let recorder: RunRecorder
    let sink: UnsafeMutablePointer<pb_event_sink>
    private let sinkSize: Int
    private let guarded: Bool
    /// The plugin's run, from run_create on. Behind a pthread lock (NSLock), so that a thread
    /// that cancels sees the run its creator made, also to ThreadSanitizer (Swift's own Mutex
    /// and atomics are invisible to it).
    private let handleBox = Box<OpaquePointer?>(nil)
    var handle: OpaquePointer? { handleBox.value }
    /// Cancels in flight, and whether destroy began: cancels really run concurrently (no lock
    /// around run_cancel), and destroy waits for those in flight.
    private let cancelsInFlight = Atomic<Int>(0)
    private let destroyed = Atomic<Bool>(false)
    private var thread: CheckThread?
    private let times = Mutex<(executeStart: Double?, executeEnd: Double?, lastCancelReturned: Double?)>((nil, nil, nil))

    init(_ context: WorkerContext, model: CheckModel, clause: String, scenario: String, kind: RequestKind,
         sinkSize: Int = MemoryLayout<pb_event_sink>.size, backlogLimit: Int = 256) {
        self.context = context
        self.model = model
        guarded = context.guarded
        self.sinkSize = sinkSize
        recorder = RunRecorder(clause: clause, scenario: scenario, kind: kind, hostMinor: context.hostMinor)
        sink = recorder.makeSink(size: sinkSize, guarded: guarded, backlogLimit: backlogLimit)
    }

    /// run_create(_with_inputs). Returns the status and the error message (empty on success).
    @discardableResult
    func create(_ request: RunRequest, useInputs: Bool = true) -> (status: pb_status, message: String) {
        let table = context.table
        let json = GuardedMemory.string(request.json, guarded: guarded, label: "the \(recorder.kind.rawValue) request JSON")
        let errorSize = 1024
        let error = GuardedMemory.allocate(errorSize, guarded: guarded, label: "the error buffer of run_create", alignment: 1)
            .assumingMemoryBound(to: CChar.self)
        var handle: OpaquePointer?
        let status: pb_status
        if useInputs, let withInputs = table.run_create_with_inputs {
            let inputs = Self.byteInputs(request.inputs, guarded: guarded)
            status = context.time("run_create") { withInputs(model.handle, json, inputs, request.inputs.count, &handle, error, errorSize) }
        } else {
            status = context.time("run_create") { table.run_create(model.handle, json, &handle, error, errorSize) }
        }
        if status == Int32(PB_OK) {
            if handle == nil { recorder.note("events", "run_create returned PB_OK without a run") }
            handleBox.value = handle
            return (status, "")
        }
        return (status, WorkerContext.message(in: error, size: errorSize))
    }

    /// Starts run_execute on a thread of its own.
    func start() {
        guard let handle else { return }
        let table = context.table
        let sink = self.sink
        recorder.executeStarted()
        times.withLock { $0.executeStart = nowMilliseconds() }
        thread = CheckThread("pbcheck-run") { [self] in
            table.run_execute(handle, sink)
            times.withLock { $0.executeEnd = nowMilliseconds() }
            recorder.executeReturned()
            if guarded {
                GuardedMemory.retire(UnsafeMutableRawPointer(sink), size: sinkSize,
                                     label: "the pb_event_sink of a run whose run_execute had returned")
            }
        }
    }

    /// Waits for run_execute to return; false (and the worker poisoned) when it did not in time.
    @discardableResult
    func wait(seconds: Double) -> Bool {
        guard let thread else { return true }
        if thread.wait(seconds: seconds) { return true }
        context.poison("run_execute of a \(recorder.kind.rawValue) run (\(recorder.scenario)) did not return within \(Int(seconds)) s")
        return false
    }

    /// run_execute, waiting up to `seconds` for it to return.
    @discardableResult
    func execute(seconds: Double) -> Bool {
        start()
        return wait(seconds: seconds)
    }

    /// run_cancel, timed; a no-op once the run is destroyed.
    func cancel() {
        guard let handle else { return }
        let table = context.table
        cancelsInFlight.add(1, ordering: .sequentiallyConsistent)
        defer { cancelsInFlight.subtract(1, ordering: .sequentiallyConsistent) }
        guard !destroyed.load(ordering: .sequentiallyConsistent) else { return }
        context.time("run_cancel") { table.run_cancel(handle) }
        times.withLock { $0.lastCancelReturned = nowMilliseconds() }
    }

    /// run_destroy, once.
    func destroy() {
        guard let handle else { return }
        let table = context.table
        guard !destroyed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        while cancelsInFlight.load(ordering: .sequentiallyConsistent) > 0 { sleepMilliseconds(1) }
        context.time("run_destroy") { table.run_destroy(handle) }
    }

    var executeMilliseconds: Double? {
        times.withLock { times in times.executeStart.flatMap { start in times.executeEnd.map { $0 - start } } }
    }
    var executeEnded: Double? { times.withLock { $0.executeEnd } }
    var cancelReturned: Double? { times.withLock { $0.lastCancelReturned } }
    var isExecuting: Bool { thread.map { !$0.isDone } ?? false }

    /// How long after the last cancel returned the run ended (its terminal event, or run_execute's return).
    var endAfterCancelMilliseconds: Double? {
        guard let cancelled = cancelReturned else { return nil }
        let end = recorder.terminal?.at ?? executeEnded
        return end.map { max(0, $0 - cancelled) }
    }

    /// The record of this run for the checker (after destroy).
    func report() { context.report(recorder, executed: times.withLock { $0.executeStart != nil }) }

    /// The byte inputs as pb_byte_input structs and a pointer array, each ending at a guard page
    /// (or padded); never freed, as the host keeps them until run_destroy.
    private static func byteInputs(_ inputs: [ByteInput], guarded: Bool) -> UnsafeMutablePointer<UnsafePointer<pb_byte_input>?> {
        let arraySize = max(1, inputs.count) * MemoryLayout<UnsafePointer<pb_byte_input>?>.stride
        let array = GuardedMemory.allocate(arraySize, guarded: guarded, label: "the byte input pointer array")
            .bindMemory(to: UnsafePointer<pb_byte_input>?.self, capacity: max(1, inputs.count))
        array.initialize(repeating: nil, count: max(1, inputs.count))
        for (index, input) in inputs.enumerated() {
            let size = MemoryLayout<pb_byte_input>.size
            let memory = GuardedMemory.allocate(size, guarded: guarded, label: "pb_byte_input '\(input.name)' (struct_size \(size))")
            let name = GuardedMemory.string(input.name, guarded: guarded, label: "the byte input's name")
            let mediaType = GuardedMemory.string(input.mediaType, guarded: guarded, label: "the byte input's media_type")
            let data = GuardedMemory.bytes(input.bytes, guarded: guarded, label: "the \(input.bytes.count) bytes of byte input '\(input.name)'")
            let structure = memory.bindMemory(to: pb_byte_input.self, capacity: 1)
            structure.initialize(to: pb_byte_input(struct_size: UInt32(size), name: name, media_type: mediaType, data: data,
                                                   size: input.bytes.count))
            array[index] = UnsafePointer(structure)
        }
        return array
    }
}
