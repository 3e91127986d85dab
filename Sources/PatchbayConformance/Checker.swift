import Foundation

/// `patchbay plugin check`: runs a plugin library through the whole contract of patchbay.h and
/// gives a verdict per clause.
///
/// The plugin never runs in this process. Worker processes (this executable again, with the
/// hidden `--worker-group`) host it and report clause by clause; a crash, a guard-page fault,
/// a sanitizer report or a hang fails the clause that was running, and a fresh worker goes on
/// with the rest. Three kinds of worker: the main one (a 1.1 host, structs padded with zeroes),
/// struct-bounds (every struct at a guard page) and host-1.0 (a 1.0 host). The clauses judged
/// over every run (terminal-event, utf8-text, events, cancel-returns-promptly,
/// non-blocking-calls) are judged here from what all workers reported.
public struct Checker {
    public let options: CheckOptions
    /// The path of this executable, to start workers with.
    let executable: String

    public init(options: CheckOptions) {
        self.options = options
        executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// Every clause and what it checks ("run[K]": one per request kind the plugin claims).
    public static var clauseDescriptions: [(clause: String, checks: String)] { Clauses.descriptions.map { ($0.0, $0.1) } }

    /// Everything the check found.
    public struct Report: Sendable {
        public var pluginPath: String
        public var plugin: String?
        public var results: [ClauseResult]
        public var seconds: Double
        public var preloaded: [String]

        public var failed: Int { results.filter { $0.verdict == .fail }.count }
        public var passed: Int { results.filter { $0.verdict == .pass }.count }
        public var notApplicable: Int { results.filter { $0.verdict == .notApplicable }.count }
    }

    public func run() throws -> Report {
        let started = nowMilliseconds()
        guard FileManager.default.fileExists(atPath: options.pluginPath) else { throw CheckError("no such file: \(options.pluginPath)") }
        if let model = options.modelPath, !FileManager.default.fileExists(atPath: model) { throw CheckError("no such model file: \(model)") }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("patchbay-check-\(getpid())").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        var results: [String: ClauseResult] = [:]
        let elf = try? ELFFile(path: options.pluginPath)
        results[Clauses.exports] = exportsClause()
        let preload = options.preload.isEmpty ? (elf?.sanitizerRuntime.map { [$0] } ?? []) : options.preload
        var collected = Collected()

        // The main worker, restarted after a clause that crashed, hung or poisoned it.
        var done: Set<String> = []
        var plan: WorkerMessage.Plan?
        var stoppedBecause: String?
        for _ in 0..<64 {
            let outcome = worker(.main, skip: done.sorted(), directory: directory, preload: preload)
            collected.add(outcome)
            plan = plan ?? outcome.messages.compactMap(\.plan).first
            for result in outcome.messages.compactMap(\.result) {
                results[result.clause] = withSanitizerReport(result, outcome)
                done.insert(result.clause)
            }
            if outcome.exitedCleanly { break }
            if let clause = outcome.unfinished {
                if clause == "(restart)" {
                    stoppedBecause = "the plugin could not be opened again after a failure (\(outcome.ending))"
                    break
                }
                results[clause] = withSanitizerReport(.fail(clause, describeDeath(outcome)), outcome)
                done.insert(clause)
                if plan == nil { stoppedBecause = "it did not get past \(clause)"; break }
            } else if !outcome.messages.contains(where: { $0.t == .poisoned }) {
                if plan == nil, let failed = ["load-library", "entry"].first(where: { results[$0]?.verdict == .fail }) {
                    stoppedBecause = "the plugin did not get past \(failed)"
                } else {
                    stoppedBecause = plan == nil ? "the checker could not start the plugin (\(outcome.ending))" : "the worker ended early (\(outcome.ending))"
                }
                break
            }
        }

        let kinds = plan?.kinds ?? []
        if plan != nil {
            for (group, clause) in [(Worker.Group.bounds, Clauses.structBounds), (.host10, Clauses.host10)] where options.wants(clause) {
                let outcome = worker(group, skip: [], directory: directory, preload: preload)
                collected.add(outcome)
                if let result = outcome.messages.compactMap(\.result).first(where: { $0.clause == clause }) {
                    results[clause] = withSanitizerReport(result, outcome)
                } else {
                    results[clause] = withSanitizerReport(.fail(clause, describeDeath(outcome)), outcome)
                }
            }
            for result in collected.aggregates(kinds: kinds, timeScale: options.timeScale) where options.wants(result.clause) {
                results[result.clause] = result
            }
        }
        let why = stoppedBecause.map { "not run: \($0)" } ?? "not run"
        let ordered = Clauses.printOrder(kinds: kinds).filter { options.wants($0) || $0 == Clauses.exports }.map { clause in
            results[clause] ?? .na(clause, why)
        }
        let name = plan.map { "'\($0.name)' \($0.version), ABI \($0.abi); kinds: \($0.kinds.map(\.rawValue).joined(separator: ", "))\($0.batching ? "; batching" : "")" }
        return Report(pluginPath: options.pluginPath, plugin: name, results: ordered, seconds: (nowMilliseconds() - started) / 1000,
                      preloaded: preload)
    }

    /// Runs one worker process to its end.
    private func worker(_ group: Worker.Group, skip: [String], directory: String, preload: [String]) -> WorkerProcess.Outcome {
        var environment = ProcessInfo.processInfo.environment
        if !preload.isEmpty {
            environment["LD_PRELOAD"] = (preload + [environment["LD_PRELOAD"]].compactMap { $0 }.filter { !$0.isEmpty }).joined(separator: ":")
            // The checker itself is not instrumented: ASan must not insist on coming first in
            // the link order, and leaks are not judged (the worker leaves with _exit).
            environment["ASAN_OPTIONS"] = environment["ASAN_OPTIONS"] ?? "verify_asan_link_order=0:detect_leaks=0:allow_user_segv_handler=1:abort_on_error=0"
            environment["TSAN_OPTIONS"] = environment["TSAN_OPTIONS"] ?? "report_signal_unsafe=0"
        }
        let limits: [String: Double] = ["load": 900, "load-cancel": 900, "load-unload-cycles": 900, Clauses.structBounds: 900,
                                        Clauses.host10: 900, "(restart)": 300, "load-library": 120, "entry": 120]
        let process = WorkerProcess(
            executable: executable, arguments: Self.workerArguments(options, group: group, skip: skip, directory: directory),
            environment: environment, verbose: options.verbose,
            clauseLimit: { clause in (limits[clause] ?? 300) * options.timeScale })
        if options.verbose { FileHandle.standardError.write(Data("patchbay plugin check: starting a \(group.rawValue) worker\n".utf8)) }
        return process.run()
    }

    /// The command line of a worker: `plugin check PATH` with the hidden worker options.
    static func workerArguments(_ options: CheckOptions, group: Worker.Group, skip: [String], directory: String) -> [String] {
        var arguments = ["plugin", "check", options.pluginPath, "--worker-group", group.rawValue, "--worker-dir", directory,
                         "--time-scale", String(options.timeScale)]
        if !skip.isEmpty { arguments += ["--worker-skip", skip.joined(separator: ",")] }
        if let model = options.modelPath { arguments += ["--model", model] }
        if let fields = options.loadFields { arguments += ["--load-fields", fields] }
        if let request = options.request { arguments += ["--request", request] }
        if let audio = options.audioPath { arguments += ["--audio", audio] }
        if !options.only.isEmpty { arguments += ["--only", options.only.joined(separator: ",")] }
        return arguments
    }

    /// Why a clause failed when its worker died or hung under it.
    private func describeDeath(_ outcome: WorkerProcess.Outcome) -> String {
        var parts: [String] = []
        if let fault = outcome.fault { parts.append("the plugin touched \(fault)") }
        if let poisoned = outcome.messages.first(where: { $0.t == .poisoned })?.detail { parts.append(poisoned) }
        parts.append(outcome.ending)
        let tail = outcome.stderrTail.filter { !$0.isEmpty }.suffix(3)
        if outcome.fault == nil && outcome.sanitizerReports.isEmpty && !tail.isEmpty { parts.append("last output: \(tail.joined(separator: " | "))") }
        return parts.joined(separator: "; ")
    }

    /// A clause during which a sanitizer reported fails with the report.
    private func withSanitizerReport(_ result: ClauseResult, _ outcome: WorkerProcess.Outcome) -> ClauseResult {
        guard let report = outcome.sanitizerReports[result.clause] else { return result }
        return .fail(result.clause, "sanitizer: \(report)" + (result.verdict == .fail ? "; \(result.detail)" : ""))
    }

    private func exportsClause() -> ClauseResult {
        let clause = Clauses.exports
        let elf: ELFFile
        do {
            elf = try ELFFile(path: options.pluginPath)
        } catch {
            return .na(clause, "cannot read the dynamic symbol table: \(error)")
        }
        let symbols = elf.exported.filter { !ELFFile.linkerSymbols.contains($0.name) }
        let others = symbols.filter { $0.name != "pb_plugin_entry" }
        guard symbols.contains(where: { $0.name == "pb_plugin_entry" }) else {
            return .fail(clause, "pb_plugin_entry is not in the dynamic symbol table")
        }
        guard others.isEmpty else {
            let shown = others.prefix(8).map { "\($0.name) (\($0.type))" }.joined(separator: ", ")
            return .fail(clause, "exports \(others.count) symbol\(others.count == 1 ? "" : "s") besides pb_plugin_entry: \(shown)\(others.count > 8 ? ", …" : "") "
                         + "(build with -fvisibility=hidden, and keep static engines out with a version script or -Wl,--exclude-libs,ALL)")
        }
        let ignored = elf.exported.filter { ELFFile.linkerSymbols.contains($0.name) }.map(\.name)
        return .pass(clause, "only pb_plugin_entry" + (ignored.isEmpty ? "" : " (and the linker's \(ignored.joined(separator: ", ")))"))
    }
}
