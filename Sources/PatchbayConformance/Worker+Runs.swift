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
        return problems.isEmpty ? .pass(clause, details.joined(separator: "; ")) : .fail(clause, problems.joined(separator: "; "))
    }

    // MARK: cancel-before-execute[K]

    func cancelBeforeExecute(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        let run = newRun(clause, "cancelled before run_execute", kind, on: model)
        let (status, message) = run.create(context.workload.request(kind, .long, id: context.nextRunID()))
        guard status == Int32(PB_OK) else { return .fail(clause, "run_create refused the request (status \(status): \(message))") }
        run.cancel()
        run.cancel()
        let returned = run.execute(seconds: context.cancelToEndLimitMilliseconds / 1000 + 30)
        defer { if returned { retire(run) } }
        guard returned else { return .fail(clause, "run_execute of a run cancelled before it did not return within \(Int(context.cancelToEndLimitMilliseconds / 1000 + 30)) s") }
        var problems: [String] = []
        let took = run.executeMilliseconds ?? 0
        if took > context.cancelToEndLimitMilliseconds { problems.append("run_execute took \(formatMilliseconds(took)); it should end at once") }
        let outputs = run.recorder.events.filter(\.isOutput).count
        if outputs > 0 { problems.append("it produced \(outputs) outputs though cancelled before run_execute") }
        if let terminal = run.recorder.terminal, !(terminal.type == Int32(PB_EVENT_FINISH) && terminal.finishReason == Int32(PB_FINISH_CANCELLED)) {
            problems.append("it ended with \(terminal.summary), not FINISH/CANCELLED")
        }
        let detail = "run_execute returned in \(formatMilliseconds(took)) with \(run.recorder.terminal?.summary ?? "no terminal event (see terminal-event)")"
        return problems.isEmpty ? .pass(clause, detail) : .fail(clause, problems.joined(separator: "; "))
    }

    // MARK: cancel-after-first-event[K]

    func cancelAfterFirstEvent(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        var problems: [String] = []
        var details: [String] = []
        // From another thread, right after the first event.
        let run = newRun(clause, "cancelled after the first event", kind, on: model)
        guard run.create(context.workload.request(kind, .long, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "run_create refused the request")
        }
        run.start()
        if !run.recorder.wait(seconds: runLimitSeconds, until: { !$0.isEmpty }) {
            run.cancel()
            run.wait(seconds: context.cancelToEndLimitMilliseconds / 1000 + 10)
            return .fail(clause, "no event within \(Int(runLimitSeconds)) s")
        }
        let endedBefore = run.recorder.terminal != nil
        run.cancel()
        guard run.wait(seconds: context.cancelToEndLimitMilliseconds / 1000 + 30) else {
            return .fail(clause, "run_execute did not return within \(Int(context.cancelToEndLimitMilliseconds / 1000 + 30)) s of the cancel")
        }
        retire(run)
        if endedBefore {
            details.append("from another thread: the run had ended before the cancel (\(run.recorder.terminal?.summary ?? ""))")
        } else {
            if let problem = cancelProblem(run, "from another thread") { problems.append(problem) }
            details.append("from another thread: \(cancelOutcome(run))")
        }

        // From inside on_event, as the host does when a client falls too far behind: a plugin
        // must not hold a lock over on_event that run_cancel needs.
        let inside = newRun(clause, "cancelled inside on_event", kind, on: model)
        guard inside.create(context.workload.request(kind, .long, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "run_create refused the request")
        }
        inside.recorder.onEvent { [unowned inside] _, index in
            if index == 0 { inside.cancel() }
        }
        guard inside.execute(seconds: context.cancelToEndLimitMilliseconds / 1000 + runLimitSeconds) else {
            return .fail(clause, "run_execute did not return after run_cancel was called inside on_event (a deadlock?)")
        }
        inside.recorder.onEvent(nil)
        retire(inside)
        if let problem = cancelProblem(inside, "inside on_event") { problems.append(problem) }
        details.append("inside on_event: \(cancelOutcome(inside))")
        return problems.isEmpty ? .pass(clause, details.joined(separator: "; ")) : .fail(clause, problems.joined(separator: "; "))
    }

    // MARK: cancel-during-prefill[K]

    func cancelDuringPrefill(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        guard let path = context.workload.prefillModelPath else { return .na(clause, context.workload.noModelReason) }
        let model: CheckModel
        var separate: CheckModel?
        if context.workload.scripted {
            let outcome = context.load(path: path)
            guard let loaded = outcome.model else { return .fail(clause, "the model with prefill_ms did not load (\(outcome.failureDescription))") }
            model = loaded
            separate = loaded
        } else {
            switch requireModel(clause) {
            case .success(let loaded): model = loaded
            case .failure(let result): return result
            }
        }
        defer { if let separate { _ = context.unload(separate) } }
        var problems: [String] = []
        var details: [String] = []

        // Cancel 200 ms in, or at the first event, whichever comes first.
        let run = newRun(clause, "cancelled during prompt processing", kind, on: model)
        let (status, message) = run.create(context.workload.request(kind, .longPrompt, id: context.nextRunID()))
        guard status == Int32(PB_OK) else { return .fail(clause, "run_create refused a long prompt (status \(status): \(message))") }
        run.start()
        run.recorder.wait(seconds: 0.2) { events in events.contains { $0.isOutput || $0.isTerminal } }
        let outputBefore = run.recorder.events.first { $0.isOutput || $0.isTerminal }
        run.cancel()
        guard run.wait(seconds: context.cancelToEndLimitMilliseconds / 1000 + 30) else {
            return .fail(clause, "run_execute did not return within \(Int(context.cancelToEndLimitMilliseconds / 1000 + 30)) s of a cancel during prompt processing")
        }
        retire(run)
        if let outputBefore {
            let at = formatMilliseconds(outputBefore.at - run.recorder.created)
            return .na(clause, "prompt processing ended within \(at) (\(RunRecorder.typeName(outputBefore.type)) before the cancel): too short to cancel in")
        }
        if let problem = cancelProblem(run, "cancelled 200 ms into prompt processing") { problems.append(problem) }
        details.append("cancelled 200 ms into prompt processing: \(cancelOutcome(run))")

        // 1.1: while the prompt is processed, progress at least every second (watched once per
        // plugin, with its first request kind).
        if context.hostMinor >= 1 && library!.abiMinor >= 1 && kind == library!.kinds.first {
            let watched = newRun(clause, "prompt processing watched", kind, on: model)
            if watched.create(context.workload.request(kind, .longPrompt, id: context.nextRunID())).status == Int32(PB_OK) {
                let window = context.seconds(3)
                watched.start()
                let started = nowMilliseconds()
                watched.recorder.wait(seconds: window) { events in events.contains { $0.isOutput || $0.isTerminal } }
                let until = watched.recorder.events.first { $0.isOutput || $0.isTerminal }?.at ?? nowMilliseconds()
                watched.cancel()
                guard watched.wait(seconds: context.cancelToEndLimitMilliseconds / 1000 + 30) else {
                    return .fail(clause, "run_execute did not return within \(Int(context.cancelToEndLimitMilliseconds / 1000 + 30)) s of a cancel")
                }
                retire(watched)
                let times = [started] + watched.recorder.events.map(\.at).filter { $0 < until } + [until]
                let silence = zip(times, times.dropFirst()).map { $1 - $0 }.max() ?? 0
                // A prompt chunk is the finest grain an engine can report at: some slack.
                if silence > 2500 * context.options.timeScale {
                    problems.append("\(formatMilliseconds(silence)) without an event during prompt processing (1.1: PB_EVENT_PROGRESS at least every second)")
                }
                let progress = watched.recorder.events.filter { $0.type == Int32(PB_EVENT_PROGRESS) }.count
                details.append("\(formatMilliseconds(until - started)) of prompt processing watched: \(progress) progress events, longest silence \(formatMilliseconds(silence))")
            } else {
                retire(watched)
            }
        }
        return problems.isEmpty ? .pass(clause, details.joined(separator: "; ")) : .fail(clause, problems.joined(separator: "; "))
    }

    // MARK: cancel-after-end[K]

    func cancelAfterEnd(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        let run = newRun(clause, "cancelled after its end", kind, on: model)
        guard run.create(context.workload.request(kind, .normal, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "run_create refused the request")
        }
        guard run.execute(seconds: runLimitSeconds) else { return .fail(clause, "run_execute did not return within \(Int(runLimitSeconds)) s") }
        let count = run.recorder.events.count
        for _ in 0..<2 { run.cancel() }
        sleepMilliseconds(200)
        let after = run.recorder.events.count - count
        retire(run)
        guard after == 0 else { return .fail(clause, "\(after) events arrived after run_execute had returned and run_cancel was called") }
        return .pass(clause, "2 cancels after \(run.recorder.terminal?.summary ?? "the end"): no effect")
    }

    // MARK: cancel-concurrent[K]

    func cancelConcurrent(_ clause: String, _ kind: RequestKind) -> ClauseResult {
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        var problems: [String] = []
        var details: [String] = []
        let joinLimit = context.cancelToEndLimitMilliseconds / 1000 + 30

        /// Several threads calling run_cancel at once for `milliseconds` (or 100 calls each).
        func storm(_ run: CheckRun, threads: Int = 4, milliseconds: Double = 150, startTogether gate: Gate? = nil) -> [CheckThread] {
            (0..<threads).map { _ in
                CheckThread("pbcheck-cancel") {
                    gate?.wait()
                    let end = nowMilliseconds() + milliseconds
                    var calls = 0
                    while calls < 100 && nowMilliseconds() < end {
                        run.cancel()
                        calls += 1
                    }
                }
            }
        }
        func join(_ threads: [CheckThread]) -> Bool {
            for thread in threads where !thread.wait(seconds: joinLimit) {
                context.poison("run_cancel did not return")
                return false
            }
            return true
        }

        // During the run, after its first event, and again once it ended.
        let run = newRun(clause, "cancelled from 4 threads at once", kind, on: model)
        guard run.create(context.workload.request(kind, .long, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "run_create refused the request")
        }
        run.start()
        run.recorder.wait(seconds: runLimitSeconds) { !$0.isEmpty }
        guard join(storm(run)) else { return .fail(clause, "run_cancel from 4 threads at once did not return within \(Int(joinLimit)) s") }
        guard run.wait(seconds: joinLimit) else { return .fail(clause, "run_execute did not return within \(Int(joinLimit)) s of the cancels") }
        if let problem = cancelProblem(run, "cancelled from 4 threads at once") { problems.append(problem) }
        details.append("4 threads during the run: \(cancelOutcome(run))")
        let count = run.recorder.events.count
        guard join(storm(run, milliseconds: 50)) else { return .fail(clause, "run_cancel after the end did not return") }
        if run.recorder.events.count != count { problems.append("events arrived after the end, during cancels") }
        retire(run)

        // Cancels racing run_execute's start.
        let race = newRun(clause, "cancels racing run_execute", kind, on: model)
        guard race.create(context.workload.request(kind, .long, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "run_create refused the request")
        }
        let gate = Gate()
        let stormers = storm(race, milliseconds: 20, startTogether: gate)
        gate.open()
        race.start()
        guard join(stormers) else { return .fail(clause, "run_cancel racing run_execute did not return within \(Int(joinLimit)) s") }
        guard race.wait(seconds: joinLimit) else { return .fail(clause, "run_execute did not return within \(Int(joinLimit)) s of cancels racing its start") }
        retire(race)
        if let problem = cancelProblem(race, "cancels racing run_execute") { problems.append(problem) }
        details.append("cancels racing run_execute: \(cancelOutcome(race))")
        return problems.isEmpty ? .pass(clause, details.joined(separator: "; ")) : .fail(clause, problems.joined(separator: "; "))
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
