import CPatchbayABI
import Foundation

/// A worker process: it hosts the plugin and runs a list of clauses, reporting each to the
/// checker (`Checker`) as JSON lines. The checker outlives whatever the plugin does here.
public final class Worker {
    /// Which clauses a worker runs, and how it hosts the plugin.
    public enum Group: String, Sendable {
        /// Everything but the two below: a 1.1 host whose structs are padded with zeroes.
        case main
        /// struct-bounds: a 1.1 host whose every struct ends at a guard page.
        case bounds
        /// host-1.0: a 1.0 host whose structs are 1.0-sized (padded: reading past them is
        /// struct-bounds' business, this worker judges what a 1.0 host is sent).
        case host10 = "host-1.0"

        var hostMinor: UInt16 { self == .host10 ? 0 : UInt16(PB_ABI_VERSION_MINOR) }
        var guarded: Bool { self == .bounds }
    }

    let options: CheckOptions
    let group: Group
    let skip: Set<String>
    let output: WorkerOutput
    let directory: String
    /// The process before the plugin was opened: what shutdown must come back to.
    let censusBeforeOpen: ProcessCensus
    var library: PluginLibrary?
    var entryMilliseconds = 0.0
    var context: WorkerContext!

    private init(options: CheckOptions, group: Group, skip: Set<String>, directory: String, output: WorkerOutput) {
        self.options = options
        self.group = group
        self.skip = skip
        self.directory = directory
        self.output = output
        censusBeforeOpen = ProcessCensus.take()
    }

    /// The worker's main: never returns. Exit status 0 when every clause of its plan ran, 3
    /// when it stopped early (poisoned: a call never returned).
    public static func run(options: CheckOptions, group: Group, skip: [String], directory: String) -> Never {
        // The checker reads messages from our standard output; anything the plugin prints there
        // goes to standard error instead.
        let descriptor = dup(1)
        dup2(2, 1)
        FaultHandler.install(output: descriptor)
        let output = WorkerOutput(descriptor: descriptor)
        let worker = Worker(options: options, group: group, skip: Set(skip), directory: directory, output: output)
        worker.main()
    }

    private func main() -> Never {
        let restarted = !skip.isEmpty
        // A crash while opening is the first clause's: load-library or entry in the main worker,
        // the worker's own clause otherwise.
        let firstClause = group == .main ? (restarted ? "(restart)" : "load-library") : (group == .bounds ? Clauses.structBounds : Clauses.host10)
        output.send(.begin(firstClause))
        let library: PluginLibrary
        do {
            library = try PluginLibrary(path: options.pluginPath)
        } catch {
            if group == .main && !restarted { output.send(.result(.fail("load-library", "\(error)"))) }
            exit(4)
        }
        self.library = library
        if group == .main && !restarted {
            output.send(.result(.pass("load-library", "dlopen(RTLD_NOW | RTLD_LOCAL) resolved every symbol; pb_plugin_entry found")))
            output.send(.begin("entry"))
        }
        let (accepted, milliseconds) = library.callEntry(minor: group.hostMinor, guarded: group.guarded)
        entryMilliseconds = milliseconds
        if group == .host10 {
            guard accepted else { finishHost10Declined() }
        } else if !accepted {
            if group == .main && !restarted {
                output.send(.result(.fail("entry", "pb_plugin_entry returned NULL for a host of ABI \(PB_ABI_VERSION_MAJOR).\(PB_ABI_VERSION_MINOR)\(logTail())")))
            }
            exit(4)
        }
        let formats = (library.table.model_formats.map { String(cString: $0) } ?? "").split(separator: ",")
            .map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        let workload: Workload
        do {
            workload = try Workload(options: options, modelFormats: formats, directory: directory)
        } catch {
            FileHandle.standardError.write(Data("patchbay plugin check: \(error)\n".utf8))
            exit(2)
        }
        context = WorkerContext(options: options, library: library, workload: workload, hostMinor: Int(group.hostMinor),
                                guarded: group.guarded, output: output)
        let plan: [String]
        switch group {
        case .main: plan = Clauses.mainPlan(kinds: library.kinds).filter { options.wants($0) }
        case .bounds: plan = [Clauses.structBounds]
        case .host10: plan = [Clauses.host10]
        }
        if group == .main {
            output.send(WorkerMessage(t: .plan, plan: .init(
                name: library.name, version: library.table.version.map { String(cString: $0) } ?? "",
                abi: "\(library.abiMajor).\(library.abiMinor)", kinds: library.kinds, batching: library.isBatching, clauses: plan)))
        }
        if group == .main && !restarted {
            output.send(.result(entryResult()))
        }
        for clause in plan where !skip.contains(clause) && clause != "load-library" && clause != "entry" {
            context.begin(clause)
            // Each clause on a thread of its own, as the host makes its blocking calls: state a
            // plugin ties to the calling thread (an OpenMP pool, thread-locals) ends with it.
            let result = Box<ClauseResult?>(nil)
            let thread = CheckThread("pbcheck-clause") { [self] in result.value = run(clause) }
            thread.wait(seconds: .infinity)
            context.finish(result.value ?? .fail(clause, "the clause did not finish"))
            if let why = context.poisoned {
                output.send(WorkerMessage(t: .poisoned, clause: clause, detail: why))
                _exit(3)
            }
        }
        output.send(WorkerMessage(t: .done))
        // The plugin may still hold threads (a plugin without shutdown, or one that failed it):
        // leave without running anyone's destructors.
        _exit(0)
    }

    private func run(_ clause: String) -> ClauseResult {
        let base = String(clause.prefix { $0 != "[" })
        let kind = clause.firstIndex(of: "[").flatMap { start in
            RequestKind(rawValue: String(clause[clause.index(after: start)...].dropLast()))
        }
        if let kind {
            switch base {
            case "run": return normalRun(clause, kind)
            case "cancel-before-execute": return cancelBeforeExecute(clause, kind)
            case "cancel-after-first-event": return cancelAfterFirstEvent(clause, kind)
            case "cancel-during-prefill": return cancelDuringPrefill(clause, kind)
            case "cancel-after-end": return cancelAfterEnd(clause, kind)
            case "cancel-concurrent": return cancelConcurrent(clause, kind)
            case "destroy-without-execute": return destroyWithoutExecute(clause, kind)
            case "concurrent-runs": return concurrentRuns(clause, kind)
            default: break
            }
        }
        switch clause {
        case "table": return tableClause()
        case "self-description": return selfDescription()
        case "probe": return probe()
        case "load": return loadClause()
        case "load-cancel": return loadCancel()
        case "model-info": return modelInfo()
        case "error-buffers": return errorBuffers()
        case "batching-sink": return batchingSink()
        case "blocking-sink": return blockingSink()
        case "unload-after-runs": return unloadAfterRuns()
        case "load-unload-cycles": return loadUnloadCycles()
        case "shutdown": return shutdown()
        case Clauses.structBounds: return structBounds()
        case Clauses.host10: return host10()
        default: return .na(clause, "this checker does not know the clause")
        }
    }

    /// The plugin's last log lines, for a message.
    func logTail() -> String {
        let lines = PluginLog.shared.all.suffix(2)
        return lines.isEmpty ? "" : " (its log: \(lines.joined(separator: " | ")))"
    }

    /// The main model, or the N/A result that says why there is none.
    func requireModel(_ clause: String) -> Result<CheckModel, ClauseResult> {
        switch context.model() {
        case .success(let model): .success(model)
        case .failure(let unavailable): .failure(.na(clause, unavailable.reason))
        }
    }
}
