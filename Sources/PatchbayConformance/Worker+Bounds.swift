import CPatchbayABI
import Foundation

/// struct-bounds and host-1.0: the versioning rule from the plugin's side. Each runs in a
/// worker of its own whose every host struct ends at a PROT_NONE page, so a plugin that reads
/// or writes past a struct_size dies there, and the fault names the struct.
extension Worker {
    static let sinkSize10 = MemoryLayout<pb_event_sink>.offset(of: \pb_event_sink.on_event)! + MemoryLayout<UnsafeRawPointer>.size
    static let modelInfoSize10 = MemoryLayout<pb_model_info>.offset(of: \pb_model_info.capabilities)! + MemoryLayout<UInt64>.size

    func structBounds() -> ClauseResult {
        let clause = Clauses.structBounds
        var covered = ["pb_host_api (pb_plugin_entry)"]
        guard let path = context.workload.modelPath else {
            return .pass(clause, "\(covered[0]) stayed inside its size; \(context.workload.noModelReason) for the rest")
        }
        let outcome = context.load(path: path)
        guard let model = outcome.model else { return .na(clause, "the model did not load here (\(outcome.failureDescription))") }
        covered += ["pb_load_callbacks", "the load request", "load's error buffer"]
        let infoSize = MemoryLayout<pb_model_info>.size
        let info = GuardedMemory.allocateGuarded(infoSize, label: "pb_model_info (struct_size \(infoSize))")
            .bindMemory(to: pb_model_info.self, capacity: 1)
        info.pointee.struct_size = UInt32(infoSize)
        context.time("model_info") { context.table.model_info(model.handle, info) }
        let info10 = GuardedMemory.allocateGuarded(Self.modelInfoSize10, label: "a 1.0-sized pb_model_info (struct_size \(Self.modelInfoSize10))")
            .bindMemory(to: pb_model_info.self, capacity: 1)
        UnsafeMutableRawPointer(info10).storeBytes(of: UInt32(Self.modelInfoSize10), as: UInt32.self)  // not through the 72-byte type
        context.time("model_info") { context.table.model_info(model.handle, info10) }
        covered.append("pb_model_info of \(infoSize) and \(Self.modelInfoSize10) bytes")
        for kind in library!.kinds {
            for (sinkSize, shape, cancel) in [(MemoryLayout<pb_event_sink>.size, Workload.Shape.normal, false), (Self.sinkSize10, .normal, false),
                                              (Self.sinkSize10, .long, true)] {
                let run = CheckRun(context, model: model, clause: clause, scenario: "sink of \(sinkSize) bytes\(cancel ? ", cancelled" : "")",
                                   kind: kind, sinkSize: sinkSize)
                guard run.create(context.workload.request(kind, shape, id: context.nextRunID())).status == Int32(PB_OK) else {
                    return .fail(clause, "run_create refused a \(kind.rawValue) request")
                }
                run.start()
                if cancel {
                    run.recorder.wait(seconds: runLimitSeconds) { !$0.isEmpty }
                    run.cancel()
                }
                guard run.wait(seconds: runLimitSeconds) else { return .fail(clause, "run_execute did not return") }
                retire(run)
            }
            covered.append("\(kind.rawValue) runs with sinks of \(MemoryLayout<pb_event_sink>.size) and \(Self.sinkSize10) bytes"
                           + (kind == .transcription ? " and their byte inputs" : ""))
        }
        let table = context.table
        if let countTokens = table.count_tokens, table.capabilities & UInt64(PB_CAP_TOKENIZE) != 0, let kind = library!.kinds.first(where: { $0 != .transcription }) {
            let request = GuardedMemory.string(context.workload.request(kind, .normal).json, guarded: true, label: "the count_tokens request JSON")
            let error = GuardedMemory.allocateGuarded(256, label: "the error buffer of count_tokens", alignment: 1).assumingMemoryBound(to: CChar.self)
            var count: Int64 = 0
            _ = countTokens(model.handle, request, &count, error, 256)
            covered.append("count_tokens' request")
        }
        if let embed = table.embed, table.capabilities & UInt64(PB_CAP_EMBEDDINGS) != 0 {
            // text_len bytes, no NUL after them.
            let text = GuardedMemory.bytes(Array("a text to embed".utf8), guarded: true, label: "embed's text (text_len bytes, no NUL)")
            let capacity = 8192
            let out = GuardedMemory.allocateGuarded(capacity * MemoryLayout<Float>.size, label: "embed's output (\(capacity) floats)")
                .assumingMemoryBound(to: Float.self)
            let error = GuardedMemory.allocateGuarded(256, label: "the error buffer of embed", alignment: 1).assumingMemoryBound(to: CChar.self)
            var dimensions = 0
            text.withMemoryRebound(to: CChar.self, capacity: 15) { text in
                _ = embed(model.handle, text, 15, out, capacity, &dimensions, error, 256)
            }
            covered.append("embed's text and output")
        }
        guard context.unload(model) != nil else { return .fail(clause, "unload did not return") }
        return .pass(clause, "nothing read or written past: " + covered.joined(separator: ", "))
    }

    /// host-1.0 when pb_plugin_entry declined the 1.0 host: allowed, ideally with a log line.
    func finishHost10Declined() -> Never {
        let lines = PluginLog.shared.all
        let said = lines.isEmpty ? "without a log line saying why (it should log one)" : "logging: \(lines.last!.prefix(160))"
        output.send(.result(.pass(Clauses.host10, "declines a host of ABI 1.0, \(said)")))
        output.send(WorkerMessage(t: .done))
        _exit(0)
    }

    func host10() -> ClauseResult {
        let clause = Clauses.host10
        let accepted = "accepts a host of ABI 1.0"
        guard let path = context.workload.modelPath else { return .pass(clause, "\(accepted); \(context.workload.noModelReason) for the rest") }
        let outcome = context.load(path: path)
        guard let model = outcome.model else { return .fail(clause, "\(accepted), but its model did not load (\(outcome.failureDescription))") }
        let info = GuardedMemory.allocate(Self.modelInfoSize10, guarded: context.guarded, label: "a 1.0 pb_model_info (struct_size \(Self.modelInfoSize10))")
            .bindMemory(to: pb_model_info.self, capacity: 1)
        UnsafeMutableRawPointer(info).storeBytes(of: UInt32(Self.modelInfoSize10), as: UInt32.self)
        context.time("model_info") { context.table.model_info(model.handle, info) }
        var runs: [CheckRun] = []
        for kind in library!.kinds where kind != .transcription {
            for (shape, cancelAfter) in [(Workload.Shape.normal, nil), (.long, 0.0), (.longPrompt, 1.0)] as [(Workload.Shape, Double?)] {
                let run = CheckRun(context, model: model, clause: clause, scenario: "1.0 host, \(shape.rawValue)", kind: kind, sinkSize: Self.sinkSize10)
                guard run.create(context.workload.request(kind, shape, id: context.nextRunID()), useInputs: false).status == Int32(PB_OK) else {
                    return .fail(clause, "\(accepted), but run_create refused a \(kind.rawValue) request")
                }
                run.start()
                if let cancelAfter {
                    run.recorder.wait(seconds: cancelAfter == 0 ? runLimitSeconds : cancelAfter) { events in
                        cancelAfter == 0 ? !events.isEmpty : events.contains { $0.isOutput }
                    }
                    run.cancel()
                }
                guard run.wait(seconds: runLimitSeconds) else { return .fail(clause, "run_execute did not return") }
                retire(run)
                runs.append(run)
            }
        }
        guard context.unload(model) != nil else { return .fail(clause, "unload did not return") }
        let violations = runs.flatMap { run in (run.recorder.violations["host-1.0"] ?? []).map { "\(run.recorder.kind.rawValue) (\(run.recorder.scenario)): \($0)" } }
        if !violations.isEmpty { return .fail(clause, violations.prefix(4).joined(separator: "; ")) }
        let kinds = Set(runs.map(\.recorder.kind.rawValue)).sorted().joined(separator: ", ")
        return .pass(clause, "\(accepted): load, a 1.0-sized model_info and \(runs.count) runs (\(kinds.isEmpty ? "no 1.0 request kind" : kinds)) "
                     + "through 1.0-sized sinks, with only 1.0 events, finish reasons and codes")
    }
}
