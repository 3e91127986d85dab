import CPatchbayABI
import Dispatch
import Foundation
import Synchronization

/// The clauses about the sink of a batching engine and about the plugin's lifetime: unload,
/// load/unload cycles, shutdown.
extension Worker {
    func batchingSink() -> ClauseResult {
        let clause = "batching-sink"
        guard library!.isBatching else {
            return .na(clause, "no PB_FLAG_BATCHING: each run has a thread of its own and on_event may block, which is the host's to handle")
        }
        guard let kind = library!.kinds.first else { return .na(clause, "the plugin claims no request kind") }
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        let limit = 4
        let slow = CheckRun(context, model: model, clause: clause, scenario: "client behind (backlog)", kind: kind, backlogLimit: limit)
        let fast = CheckRun(context, model: model, clause: clause, scenario: "client keeping up", kind: kind, backlogLimit: limit)
        slow.recorder.stall(true)
        for run in [slow, fast] {
            guard run.create(context.workload.request(kind, .long, id: context.nextRunID())).status == Int32(PB_OK) else {
                return .fail(clause, "run_create refused the request")
            }
        }
        slow.start()
        fast.start()
        let endLimit = context.cancelToEndLimitMilliseconds / 1000 + 30
        defer {
            slow.cancel()
            fast.cancel()
            if slow.wait(seconds: endLimit) && fast.wait(seconds: endLimit) {
                retire(slow)
                retire(fast)
            }
        }
        func outputs(_ run: CheckRun) -> Int { run.recorder.events.filter(\.isOutput).count }
        let window = context.seconds(10)
        fast.recorder.wait(seconds: window) { events in events.filter(\.isOutput).count >= 20 || events.contains(where: \.isTerminal) }
        sleepMilliseconds(100)
        var problems: [String] = []
        let pastLimit = slow.recorder.outputWhileFull
        if slow.recorder.backlogCalls == 0 && slow.recorder.terminal == nil {
            problems.append("backlog() of the sink was never called")
        }
        if pastLimit > 2 {
            problems.append("\(pastLimit) outputs went to a run whose client was \(limit) events behind (backlog_limit \(limit)): it must sit out decode steps")
        }
        let fastOutputs = outputs(fast)
        if fastOutputs < 5 && fast.recorder.terminal == nil {
            problems.append("a run whose client kept up got only \(fastOutputs) outputs in \(Int(window)) s while another client was behind")
        }
        // The client catches up: the run goes on.
        let before = outputs(slow)
        slow.recorder.stall(false)
        let resumed = slow.recorder.wait(seconds: context.seconds(10)) { events in
            events.filter(\.isOutput).count >= before + 2 || events.contains(where: \.isTerminal)
        }
        if !resumed { problems.append("a paused run did not go on within \(Int(context.seconds(10))) s once its client caught up") }
        // Behind again, then cancelled while paused: it ends at once.
        slow.recorder.stall(true)
        sleepMilliseconds(100)
        let endedBefore = slow.recorder.terminal != nil
        slow.cancel()
        guard slow.wait(seconds: endLimit) else { return .fail(clause, "a run paused for its backlog did not end within \(Int(endLimit)) s of a cancel") }
        if !endedBefore, let problem = cancelProblem(slow, "cancelled while paused for its backlog") { problems.append(problem) }
        let detail = "backlog_limit \(limit): the run behind got \(before) outputs (\(pastLimit) past the limit, backlog asked \(slow.recorder.backlogCalls) times) "
            + "while the other got \(fastOutputs); it resumed when read, and a cancel while paused ended it (\(cancelOutcome(slow)))"
        return .judged(clause, problems: problems, detail: detail)
    }

    /// Without PB_FLAG_BATCHING on_event may block while the run's client is behind, and the
    /// host releases it only after run_cancel returns (Run.cancel, EventChannel.release): a
    /// plugin whose run_cancel waits for a lock held over on_event would hang the host.
    func blockingSink() -> ClauseResult {
        let clause = "blocking-sink"
        guard !library!.isBatching else {
            return .na(clause, "PB_FLAG_BATCHING: on_event never blocks for this plugin (batching-sink checks what it does instead)")
        }
        guard let kind = library!.kinds.first else { return .na(clause, "the plugin claims no request kind") }
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        let run = newRun(clause, "on_event held, then cancelled", kind, on: model)
        guard run.create(context.workload.request(kind, .long, id: context.nextRunID())).status == Int32(PB_OK) else {
            return .fail(clause, "run_create refused the request")
        }
        let held = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let holding = Atomic<Bool>(false)
        run.recorder.onEvent { event, _ in
            guard event.isOutput, !holding.exchange(true, ordering: .relaxed) else { return }
            held.signal()
            _ = release.wait(timeout: .now() + 60)
        }
        run.start()
        let endLimit = context.cancelToEndLimitMilliseconds / 1000 + 60
        run.recorder.wait(seconds: runLimitSeconds) { events in events.contains { $0.isOutput || $0.isTerminal } }
        guard held.wait(timeout: .now() + 1) == .success else {
            run.cancel()
            guard run.wait(seconds: endLimit) else { return .fail(clause, "run_execute did not return") }
            retire(run)
            return .na(clause, "the run ended (\(run.recorder.terminal?.summary ?? "no end")) without an output whose on_event could be held")
        }
        // on_event is held on the plugin's thread. Cancel from here; on_event is let go when the
        // cancel returns, or after a while if it does not.
        let patience = 4000 * context.options.timeScale
        let cancelled = DispatchSemaphore(value: 0)
        let releasedAt = Box<Double>(0)
        let releaser = CheckThread("pbcheck-release") {
            _ = cancelled.wait(timeout: .now() + patience / 1000)
            releasedAt.value = nowMilliseconds()
            release.signal()
        }
        let started = nowMilliseconds()
        run.cancel()
        let returned = nowMilliseconds()
        cancelled.signal()
        releaser.wait(seconds: .infinity)
        guard run.wait(seconds: endLimit) else { return .fail(clause, "run_execute did not return after on_event was let go and the run cancelled") }
        run.recorder.onEvent(nil)
        retire(run)
        if returned >= releasedAt.value {
            return .fail(clause, "run_cancel returned only after the held on_event was let go (\(formatMilliseconds(returned - started))): "
                         + "it waits for something on_event holds, and the host lets on_event go only after run_cancel returns")
        }
        if let problem = cancelProblem(run, "cancelled while on_event was held") { return .fail(clause, problem) }
        return .pass(clause, "run_cancel returned in \(formatMilliseconds(returned - started)) while on_event was held; once let go: \(cancelOutcome(run))")
    }

    func unloadAfterRuns() -> ClauseResult {
        let clause = "unload-after-runs"
        guard let kind = library!.kinds.first else { return .na(clause, "the plugin claims no request kind") }
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        // A finished run, one cancelled while it ran, one cancelled before run_execute, one never executed.
        let finished = newRun(clause, "finished before unload", kind, on: model)
        let cancelled = newRun(clause, "cancelled before unload", kind, on: model)
        let early = newRun(clause, "cancelled before run_execute, before unload", kind, on: model)
        let idle = newRun(clause, "never executed, before unload", kind, on: model)
        for (run, shape) in [(finished, Workload.Shape.normal), (cancelled, .long), (early, .long), (idle, .normal)] {
            guard run.create(context.workload.request(kind, shape, id: context.nextRunID())).status == Int32(PB_OK) else {
                return .fail(clause, "run_create refused the request")
            }
        }
        let endLimit = context.cancelToEndLimitMilliseconds / 1000 + runLimitSeconds
        guard finished.execute(seconds: runLimitSeconds) else { return .fail(clause, "a run did not return") }
        cancelled.start()
        cancelled.recorder.wait(seconds: runLimitSeconds) { !$0.isEmpty }
        cancelled.cancel()
        early.cancel()
        guard cancelled.wait(seconds: endLimit), early.execute(seconds: endLimit) else { return .fail(clause, "a cancelled run did not return") }
        for run in [finished, cancelled, early, idle] { retire(run) }
        guard let milliseconds = context.unloadMainModel() else {
            return .fail(clause, "unload did not return within \(Int(context.seconds(60))) s")
        }
        _ = model
        let children = censusBeforeOpen.includingCurrentThread().leftovers(after: 0.5).filter { $0.contains("child process") }
        if !children.isEmpty { return .fail(clause, "after unload returned: " + children.joined(separator: "; ")) }
        return .pass(clause, "unload returned in \(formatMilliseconds(milliseconds)) after a finished, a cancelled, a cancelled-before-execute and a never-executed run; no child process left")
    }

    func loadUnloadCycles() -> ClauseResult {
        let clause = "load-unload-cycles"
        guard let path = context.workload.modelPath else { return .na(clause, context.workload.noModelReason) }
        if let model = context.loadedMainModel { _ = context.unloadMainModel(); _ = model }
        let kind = library!.kinds.first
        let cycles = context.workload.scripted ? 5 : 2
        var unloadTimes: [Double] = []
        /// One load, a run (and a cancelled one), an unload; an error message, or nil.
        func cycle() -> String? {
            let outcome = context.load(path: path)
            guard let model = outcome.model else { return "load failed (\(outcome.failureDescription))" }
            if let kind {
                for (shape, cancel) in [(Workload.Shape.normal, false), (.long, true)] {
                    let run = newRun(clause, cancel ? "cancelled, between load and unload" : "between load and unload", kind, on: model)
                    if run.create(context.workload.request(kind, shape, id: context.nextRunID())).status == Int32(PB_OK) {
                        run.start()
                        if cancel {
                            run.recorder.wait(seconds: runLimitSeconds) { !$0.isEmpty }
                            run.cancel()
                        }
                        guard run.wait(seconds: runLimitSeconds) else { return "a run did not return" }
                    }
                    retire(run)
                }
            }
            guard let milliseconds = context.unload(model) else { return "unload did not return" }
            unloadTimes.append(milliseconds)
            return nil
        }
        // A first cycle makes what the plugin makes once, unless a model was loaded and
        // unloaded already (unload-after-runs).
        if !context.unloadedBefore, let failure = cycle() { return .fail(clause, "the first cycle: \(failure)") }
        let before = ProcessCensus.take()
        for index in 0..<cycles {
            if let failure = cycle() { return .fail(clause, "cycle \(index + 2): \(failure)") }
        }
        let left = before.leftovers(after: context.seconds(3))
        let detail = "\(cycles) cycles of load, a run, a cancelled run, unload (unload \(formatMilliseconds(unloadTimes.max() ?? 0)) at most)"
        guard left.isEmpty else { return .fail(clause, "after \(cycles) cycles: " + left.joined(separator: "; ")) }
        let census = ProcessCensus.take()
        return .pass(clause, "\(detail): \(census.threads.count) threads, \(census.descriptors.count) descriptors, \(census.children.count) children before and after")
    }

    func shutdown() -> ClauseResult {
        let clause = "shutdown"
        if context.loadedMainModel != nil { _ = context.unloadMainModel() }
        var problems: [String] = []
        if !library!.tableUnchanged { problems.append("the function table changed after pb_plugin_entry returned it (it must stay valid and unchanged)") }
        guard let shutdown = context.table.shutdown else {
            return problems.isEmpty ? .na(clause, "no shutdown (optional; 1.1): the plugin keeps its global state until the process ends")
                                    : .fail(clause, problems.joined(separator: "; "))
        }
        let thread = CheckThread("pbcheck-shutdown") { shutdown() }
        let started = nowMilliseconds()
        guard thread.wait(seconds: context.seconds(60)) else {
            context.poison("shutdown did not return")
            return .fail(clause, "shutdown did not return within \(Int(context.seconds(60))) s")
        }
        let took = nowMilliseconds() - started
        let left = censusBeforeOpen.includingCurrentThread().leftovers(after: context.seconds(3))
        if !left.isEmpty { problems.append("compared with before the library was opened, shutdown left " + left.joined(separator: "; ")) }
        return problems.isEmpty ? .pass(clause, "returned in \(formatMilliseconds(took)); no thread, descriptor or child process of the plugin left; the table never changed")
                                : .fail(clause, problems.joined(separator: "; "))
    }
}
