import Foundation

/// What every worker reported about its runs and calls, and the clauses judged from it.
struct Collected {
    var runs: [RunReport] = []
    /// Call name → clause → stat.
    var calls: [String: [String: CallStat]] = [:]

    mutating func add(_ outcome: WorkerProcess.Outcome) {
        for message in outcome.messages {
            if let run = message.run { runs.append(run) }
            if let stats = message.calls, let clause = message.clause {
                for (name, stat) in stats { calls[name, default: [:]][clause, default: CallStat()].merge(stat) }
            }
        }
    }

    func aggregates(kinds: [RequestKind], timeScale: Double) -> [ClauseResult] {
        var results: [ClauseResult] = []
        for kind in kinds {
            let clause = Clauses.named("terminal-event", kind)
            let executed = runs.filter { $0.kind == kind && $0.executed }
            let broken = violations("terminal", in: runs.filter { $0.kind == kind })
            if executed.isEmpty && broken.isEmpty {
                results.append(.na(clause, "no \(kind.rawValue) run was executed"))
            } else if !broken.isEmpty {
                results.append(.fail(clause, broken))
            } else {
                let cancelled = executed.filter { $0.terminal == "finish cancelled" }.count
                let errors = executed.filter { $0.terminal?.hasPrefix("error") ?? false }.count
                let scenarios = Set(executed.map(\.scenario)).count
                results.append(.pass(clause, "\(executed.count) runs in \(scenarios) scenarios (\(executed.count - cancelled - errors) finished, \(cancelled) cancelled, "
                                     + "\(errors) errors): each ended with exactly one terminal event, nothing after it"))
            }
        }
        let textEvents = runs.map(\.textEvents).reduce(0, +)
        let multiByte = runs.map(\.nonASCIICharacters).reduce(0, +)
        let utf8 = violations("utf8", in: runs)
        if runs.isEmpty {
            results.append(.na("utf8-text", "no run was executed"))
        } else if !utf8.isEmpty {
            results.append(.fail("utf8-text", utf8))
        } else {
            results.append(.pass("utf8-text", "\(textEvents) text events, \(multiByte) multi-byte characters, none split or invalid"
                                 + (multiByte == 0 ? " (no multi-byte character came up, so splitting was not exercised)" : "")))
        }
        let events = violations("events", in: runs)
        let eventCount = runs.map(\.events).reduce(0, +)
        if runs.isEmpty {
            results.append(.na("events", "no run was executed"))
        } else if !events.isEmpty {
            results.append(.fail("events", events))
        } else {
            results.append(.pass("events", "\(eventCount) events of \(runs.count) runs: sizes, types, reasons, codes and fields valid; on_event never concurrent for a run nor outside run_execute"))
        }
        results.append(timing("cancel-returns-promptly", ["run_cancel"], limit: 250 * timeScale))
        results.append(timing("non-blocking-calls", ["run_create", "run_destroy", "model_info", "probe"], limit: 1000 * timeScale))
        return results
    }

    /// The first few violations of `category` in `runs`, naming their clause and scenario.
    private func violations(_ category: String, in runs: [RunReport]) -> String {
        let all = runs.flatMap { run in (run.violations[category] ?? []).map { "\(run.clause) (\(run.scenario)): \($0)" } }
        guard !all.isEmpty else { return "" }
        let affected = runs.filter { !($0.violations[category] ?? []).isEmpty }.count
        return "\(affected) of \(runs.count) runs: " + all.prefix(4).joined(separator: "; ") + (all.count > 4 ? "; …" : "")
    }

    private func timing(_ clause: String, _ names: [String], limit: Double) -> ClauseResult {
        var slow: [String] = []
        var summary: [String] = []
        for name in names {
            guard let byClause = calls[name] else { continue }
            let count = byClause.values.map(\.count).reduce(0, +)
            let worst = byClause.max { $0.value.maxMilliseconds < $1.value.maxMilliseconds }!
            summary.append("\(name) ×\(count) ≤ \(formatMilliseconds(worst.value.maxMilliseconds))")
            if worst.value.maxMilliseconds > limit {
                slow.append("\(name) took \(formatMilliseconds(worst.value.maxMilliseconds)) (in \(worst.key)); it is [non-blocking], the limit here is \(formatMilliseconds(limit))")
            }
        }
        if summary.isEmpty { return .na(clause, "no such call was made") }
        return slow.isEmpty ? .pass(clause, summary.joined(separator: ", ")) : .fail(clause, slow.joined(separator: "; "))
    }
}
