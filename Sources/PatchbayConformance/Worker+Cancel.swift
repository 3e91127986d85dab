import CPatchbayABI
import Foundation

/// The cancel clauses, one set per request kind: before run_execute, right after the first
/// event, during prompt processing, after the end, and many at once.
extension Worker {
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
        return .judged(clause, problems: problems, detail: detail)
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
        inside.start()
        inside.recorder.wait(seconds: runLimitSeconds) { !$0.isEmpty }
        guard inside.wait(seconds: context.cancelToEndLimitMilliseconds / 1000 + 30) else {
            return .fail(clause, "run_execute did not return after run_cancel was called inside on_event (a deadlock: does the plugin hold a lock over on_event that run_cancel takes?)")
        }
        inside.recorder.onEvent(nil)
        retire(inside)
        if let problem = cancelProblem(inside, "inside on_event") { problems.append(problem) }
        details.append("inside on_event: \(cancelOutcome(inside))")
        return .judged(clause, problems: problems, detail: details.joined(separator: "; "))
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
        return .judged(clause, problems: problems, detail: details.joined(separator: "; "))
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
        return .judged(clause, problems: problems, detail: details.joined(separator: "; "))
    }
}
