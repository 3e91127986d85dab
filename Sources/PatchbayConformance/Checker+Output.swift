import Foundation

extension Checker.Report {
    /// One line per clause (`PASS  clause  detail`), then a summary.
    public var text: String {
        var lines = ["patchbay plugin check \(pluginPath)"]
        if let plugin { lines.append("plugin \(plugin)") }
        if !preloaded.isEmpty { lines.append("preloaded into the workers: \(preloaded.joined(separator: ", "))") }
        let width = min(30, results.map(\.clause.count).max() ?? 0)
        for result in results {
            let label = result.verdict.label.padding(toLength: 4, withPad: " ", startingAt: 0)
            let clause = result.clause.padding(toLength: max(width, result.clause.count), withPad: " ", startingAt: 0)
            // One line per clause: a model's newline in a quoted output must not start another.
            let detail = result.detail.unicodeScalars.map { $0 == "\n" ? "\\n" : $0.properties.generalCategory == .control ? " " : String($0) }.joined()
            lines.append("\(label)  \(clause)  \(detail)")
        }
        lines.append(String(format: "%d passed, %d failed, %d not applicable (%.1f s)", passed, failed, notApplicable, seconds))
        return lines.joined(separator: "\n") + "\n"
    }

    /// The same as JSON, for machines.
    public var json: String {
        struct Output: Encodable {
            var plugin_path: String
            var plugin: String?
            var preloaded: [String]
            var clauses: [ClauseResult]
            var passed: Int
            var failed: Int
            var not_applicable: Int
            var seconds: Double
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .withoutEscapingSlashes, .sortedKeys]
        let output = Output(plugin_path: pluginPath, plugin: plugin, preloaded: preloaded, clauses: results, passed: passed,
                            failed: failed, not_applicable: notApplicable, seconds: (seconds * 10).rounded() / 10)
        return String(decoding: (try? encoder.encode(output)) ?? Data(), as: UTF8.self) + "\n"
    }
}
