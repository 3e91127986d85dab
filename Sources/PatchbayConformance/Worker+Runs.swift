import CPatchbayABI
import Foundation
import Synchronization

/// The clauses about runs, one set per request kind the plugin claims.
extension Worker {
    /// A run of `kind` on `model` for this clause.
    func newRun(_ clause: String, _ scenario: String, _ kind: RequestKind, on model: CheckModel) -> CheckRun {
        CheckRun(context, model: model, clause: clause, scenario: scenario, kind: kind)
    }

    /// How long a run that nobody cancels may take.
    var runLimitSeconds: Double { context.seconds(120) }

    /// Ends a run's part in a clause: destroy, then report it for the clauses judged over every run.
    func retire(_ run: CheckRun) {
        run.destroy()
        run.report()
    }

    /// What is wrong with how a cancelled run ended, or nil. `scenario` names it in the message.
    func cancelProblem(_ run: CheckRun, _ scenario: String) -> String? {
        guard !run.isExecuting else { return "\(scenario): run_execute did not return after the cancel" }
        if let end = run.endAfterCancelMilliseconds, end > context.cancelToEndLimitMilliseconds {
            return "\(scenario): the run ended \(formatMilliseconds(end)) after run_cancel returned"
        }
        guard let terminal = run.recorder.terminal else { return nil }  // terminal-event says so
        if terminal.type == Int32(PB_EVENT_ERROR) {
            return "\(scenario): ended with \(terminal.summary) after a cancel, not FINISH/CANCELLED"
        }
        if terminal.finishReason != Int32(PB_FINISH_CANCELLED) {
            let cancelled = run.cancelReturned ?? 0
            let after = run.recorder.events.filter { $0.isOutput && $0.at > cancelled }.count
            if after > 3 { return "\(scenario): went on for \(after) more outputs after the cancel and ended with \(terminal.summary)" }
        }
        return nil
    }

    /// How a cancelled run ended, for a detail.
    func cancelOutcome(_ run: CheckRun) -> String {
        if let terminal = run.recorder.terminal, let cancelled = run.cancelReturned, terminal.at < cancelled {
            return "\(terminal.summary) while run_cancel was still running"
        }
        let end = run.endAfterCancelMilliseconds.map { " \(formatMilliseconds($0)) after the cancel" } ?? ""
        return "\(run.recorder.terminal?.summary ?? "no terminal event")\(end)"
    }

    // MARK: run[K]

    func normalRun(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        var problems: [String] = []
        var details: [String] = []
        let request = context.workload.request(kind, .normal, id: context.nextRunID())
        let run = newRun(clause, "normal", kind, on: model)
        let (status, message) = run.create(request)
        guard status == Int32(PB_OK) else { return .fail(clause, "run_create refused the request (status \(status): \(message)): \(request.json.prefix(200))") }
        guard run.execute(seconds: runLimitSeconds) else { return .fail(clause, "run_execute did not return within \(Int(runLimitSeconds)) s") }
        retire(run)
        let events = run.recorder.events
        let outputs = events.filter(\.isOutput)
        if let terminal = run.recorder.terminal {
            if terminal.type == Int32(PB_EVENT_ERROR) {
                problems.append("the run failed: \(terminal.summary)")
            } else if [PB_FINISH_CANCELLED, PB_FINISH_TIME_LIMIT].map(Int32.init).contains(terminal.finishReason) {
                problems.append("nobody cancelled it, yet it ended with \(terminal.summary)")
            }
        } else {
            problems.append("the run ended without a terminal event")
        }
        if kind != .transcription && outputs.isEmpty && run.recorder.terminal?.type == Int32(PB_EVENT_FINISH) {
            problems.append("it finished without any content, reasoning or tool-call event")
        }
        if kind == .transcription {
            let languages = events.indices.filter { events[$0].type == Int32(PB_EVENT_LANGUAGE) }
            let segments = events.filter { $0.type == Int32(PB_EVENT_SEGMENT) }
            if languages.count > 1 { problems.append("\(languages.count) language events (one is expected)") }
            if let first = languages.first, let segment = events.firstIndex(where: { $0.type == Int32(PB_EVENT_SEGMENT) }), segment < first {
                problems.append("a segment came before the language event")
            }
            if zip(segments, segments.dropFirst()).contains(where: { $1.segmentStart < $0.segmentStart }) { problems.append("segments out of order") }
            let audioMilliseconds = Int64(request.inputs.first.map { max(0, $0.bytes.count - 44) / 32 } ?? 0)
            if let late = segments.first(where: { $0.segmentEnd > audioMilliseconds + 1000 }) {
                problems.append("a segment ends at \(late.segmentEnd) ms of \(audioMilliseconds) ms of audio")
            }
            details.append("\(run.recorder.terminal?.summary ?? "no end") in \(formatMilliseconds(run.executeMilliseconds ?? 0)): language \(languages.isEmpty ? "none" : events[languages[0]].textString), \(segments.count) segments")
        } else {
            details.append("\(run.recorder.terminal?.summary ?? "no end") in \(formatMilliseconds(run.executeMilliseconds ?? 0)): \(outputs.count) outputs '\(String(outputs.map(\.textString).joined().prefix(40)))'")
        }

        // Multi-byte text (judged by utf8-text).
        let utf8 = newRun(clause, "multi-byte text", kind, on: model)
        if utf8.create(context.workload.request(kind, .utf8, id: context.nextRunID())).status == Int32(PB_OK) {
            if !utf8.execute(seconds: runLimitSeconds) { return .fail(clause, "run_execute of a request for multi-byte text did not return") }
        }
        retire(utf8)

        // max_wall_ms: "a run that reaches it ends with PB_FINISH_TIME_LIMIT".
        let limited = newRun(clause, "max_wall_ms 300", kind, on: model)
        let (limitedStatus, limitedMessage) = limited.create(context.workload.request(kind, .timeLimit, id: context.nextRunID()))
        if limitedStatus == Int32(PB_OK) {
            guard limited.execute(seconds: runLimitSeconds) else { return .fail(clause, "run_execute with max_wall_ms 300 did not return") }
            retire(limited)
            let took = limited.executeMilliseconds ?? 0
            let terminal = limited.recorder.terminal
            if took > 300 + context.cancelToEndLimitMilliseconds {
                problems.append("a run with max_wall_ms 300 took \(formatMilliseconds(took))")
            } else if let terminal, terminal.type == Int32(PB_EVENT_FINISH), terminal.finishReason != Int32(PB_FINISH_TIME_LIMIT), took >= 300 {
                problems.append("a run with max_wall_ms 300 that ran \(formatMilliseconds(took)) ended with \(terminal.summary), not time_limit")
            }
            details.append("max_wall_ms 300: \(terminal?.summary ?? "no end") after \(formatMilliseconds(took))")
        } else {
            problems.append("run_create refused a request with max_wall_ms (status \(limitedStatus): \(limitedMessage))")
            retire(limited)
        }

        // A prompt longer than the context window: refused, or a run that ends with one terminal event.
        if kind != .transcription && model.contextLength > 0 {
            let over = newRun(clause, "prompt over the context", kind, on: model)
            let (overStatus, overMessage) = over.create(context.workload.request(kind, .overContext, contextLength: model.contextLength, id: context.nextRunID()))
            if overStatus == Int32(PB_OK) {
                guard over.execute(seconds: runLimitSeconds) else { return .fail(clause, "run_execute of a prompt over the context did not return") }
                details.append("prompt over the context: \(over.recorder.terminal?.summary.prefix(80) ?? "no end")")
            } else {
                details.append("prompt over the context: refused by run_create (\(overStatus): \(overMessage.prefix(100)))")
            }
            retire(over)
        }
        return .judged(clause, problems: problems, detail: details.joined(separator: "; "))
    }

    // MARK: destroy-without-execute[K]

    func destroyWithoutExecute(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        var runs: [CheckRun] = []
        for index in 0..<12 {
            let run = newRun(clause, "destroyed without run_execute", kind, on: model)
            guard run.create(context.workload.request(kind, index % 2 == 0 ? .normal : .long, id: context.nextRunID())).status == Int32(PB_OK) else {
                return .fail(clause, "run_create refused the request")
            }
            if index % 6 == 1 { run.cancel() }
            runs.append(run)
        }
        // Half destroyed here, half from other threads at once.
        for run in runs.prefix(6) { retire(run) }
        let destroyers = runs.suffix(6).map { run in CheckThread("pbcheck-destroy") { [self] in retire(run) } }
        for thread in destroyers where !thread.wait(seconds: context.seconds(30)) {
            context.poison("run_destroy did not return")
            return .fail(clause, "run_destroy of a run never executed did not return within \(Int(context.seconds(30))) s")
        }
        let delivered = runs.map { $0.recorder.events.count }.reduce(0, +)
        if delivered > 0 { return .fail(clause, "\(delivered) events were delivered to runs that were never executed") }
        // The model still serves.
        let after = newRun(clause, "normal, after runs destroyed unexecuted", kind, on: model)
        guard after.create(context.workload.request(kind, .normal, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "after 12 runs destroyed without run_execute, run_create refused a request")
        }
        guard after.execute(seconds: runLimitSeconds) else { return .fail(clause, "after 12 runs destroyed without run_execute, a run did not return") }
        retire(after)
        guard let terminal = after.recorder.terminal, terminal.type == Int32(PB_EVENT_FINISH) else {
            return .fail(clause, "after 12 runs destroyed without run_execute, a run ended with \(after.recorder.terminal?.summary ?? "nothing")")
        }
        return .pass(clause, "12 runs created (2 of them cancelled) and destroyed unexecuted, 6 from other threads; the next run: \(terminal.summary)")
    }

    // MARK: concurrent-runs[K]

    func concurrentRuns(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        let count = kind == .transcription ? 4 : (context.workload.scripted ? 16 : 8)
        let gate = Gate()
        let runs = (0..<count).map { index in
            newRun(clause, index % 3 == 2 ? "one of \(count) at once, cancelled" : "one of \(count) at once", kind, on: model)
        }
        let requests = runs.indices.map { context.workload.request(kind, $0 % 3 == 2 ? .long : .normal, id: context.nextRunID()) }
        let refused = SharedList<String>()
        // Each run is created and executed on a thread of its own, all at once.
        let threads = runs.indices.map { index in
            CheckThread("pbcheck-many") { [self] in
                gate.wait()
                let run = runs[index]
                let (status, message) = run.create(requests[index])
                guard status == Int32(PB_OK) else {
                    refused.append("status \(status): \(message)")
                    return
                }
                run.start()
                _ = run.wait(seconds: runLimitSeconds * 2)
            }
        }
        // Every third is cancelled from yet another thread, 10 to 300 ms in.
        let cancellers = runs.indices.filter { $0 % 3 == 2 }.map { index in
            CheckThread("pbcheck-cancel") {
                gate.wait()
                sleepMilliseconds(Double(10 + (index * 37) % 290))
                runs[index].cancel()
            }
        }
        gate.open()
        for thread in cancellers + threads where !thread.wait(seconds: runLimitSeconds * 2 + 10) {
            context.poison("a run of several at once did not end")
            return .fail(clause, "of \(count) runs at once, one did not end within \(Int(runLimitSeconds * 2 + 10)) s")
        }
        for run in runs { retire(run) }
        var problems: [String] = refused.all.map { "run_create refused one of \(count) runs at once (\($0))" }
        var finished = 0, cancelled = 0, busy = 0
        for (index, run) in runs.enumerated() where run.handle != nil {
            if index % 3 == 2 {
                if let problem = cancelProblem(run, "run \(index + 1)") { problems.append(problem) }
                cancelled += 1
            } else if let terminal = run.recorder.terminal {
                if terminal.type == Int32(PB_EVENT_ERROR) && [PB_ERR_BUSY, PB_ERR_OVERLOADED].map(Int32.init).contains(terminal.errorCode) {
                    busy += 1
                } else if terminal.type == Int32(PB_EVENT_ERROR) || terminal.finishReason == Int32(PB_FINISH_CANCELLED) {
                    problems.append("run \(index + 1) of \(count) at once ended with \(terminal.summary)")
                } else {
                    finished += 1
                }
            }
        }
        let detail = "\(count) runs at once from \(count) threads: \(finished) finished, \(cancelled) cancelled"
            + (busy > 0 ? ", \(busy) refused as busy" : "")
        return problems.isEmpty ? .pass(clause, detail) : .fail(clause, problems.prefix(4).joined(separator: "; "))
    }
}

/// Holds threads until it opens, so that they start (nearly) together.
final class Gate: Sendable {
    private let opened = Atomic<Bool>(false)
    func open() { opened.store(true, ordering: .releasing) }
    func wait() { while !opened.load(ordering: .acquiring) { usleep(50) } }
}
