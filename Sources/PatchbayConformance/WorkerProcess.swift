import Foundation

/// One worker process as the checker sees it: spawned with posix_spawn, its messages read
/// from a pipe, its standard error kept (the plugin's log, a sanitizer's report), and killed
/// when a clause runs past its limit.
struct WorkerProcess {
    /// What came back from one worker.
    struct Outcome {
        var messages: [WorkerMessage] = []
        /// The clause that had begun and not finished when the worker ended.
        var unfinished: String?
        /// How the worker ended: "exit 3", "SIGSEGV", "killed after 240 s".
        var ending = ""
        var exitedCleanly = false
        /// What the fault handler said, if the plugin touched a guard page or crashed.
        var fault: String?
        /// Sanitizer reports, by the clause that was running when they were printed.
        var sanitizerReports: [String: String] = [:]
        /// The last lines of standard error while the unfinished clause ran.
        var stderrTail: [String] = []
    }

    let executable: String
    let arguments: [String]
    let environment: [String: String]
    let verbose: Bool
    /// The time a clause may take before the worker is killed.
    let clauseLimit: (String) -> Double

    func run() -> Outcome {
        var outcome = Outcome()
        var out: [Int32] = [0, 0], err: [Int32] = [0, 0]
        guard pipe(&out) == 0, pipe(&err) == 0 else {
            outcome.ending = "could not make pipes"
            return outcome
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, out[1], 1)
        posix_spawn_file_actions_adddup2(&actions, err[1], 2)
        for fd in [out[0], out[1], err[0], err[1]] { posix_spawn_file_actions_addclose(&actions, fd) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attributes)
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        close(out[1])
        close(err[1])
        guard spawned == 0 else {
            close(out[0])
            close(err[0])
            outcome.ending = "posix_spawn failed: \(String(cString: strerror(spawned)))"
            return outcome
        }
        var buffers: [Int32: [UInt8]] = [out[0]: [], err[0]: []]
        var open: Set<Int32> = [out[0], err[0]]
        var current: String?
        var currentSince = nowMilliseconds()
        var report: (clause: String, lines: [String])?
        var stderrTail: [String] = []
        var killed: String?

        /// A finished sanitizer report counts when it is the plugin's (see isPluginReport).
        func keep(_ report: (clause: String, lines: [String])) {
            guard Self.isPluginReport(report.lines) else {
                if verbose { FileHandle.standardError.write(Data("patchbay plugin check: ignored a sanitizer report about the checker's own (uninstrumented) code\n".utf8)) }
                return
            }
            if outcome.sanitizerReports[report.clause] == nil { outcome.sanitizerReports[report.clause] = Self.summarize(report.lines) }
        }

        func handle(line: String, from fd: Int32) {
            if fd == err[0] {
                if verbose { FileHandle.standardError.write(Data("  │ \(line)\n".utf8)) }
                stderrTail.append(line)
                if stderrTail.count > 40 { stderrTail.removeFirst() }
                if Self.startsSanitizerReport(line) {
                    if let open = report { keep(open) }
                    report = (current ?? outcome.messages.last?.clause ?? "(exit)", [line])
                    if line.contains("runtime error:") { keep(report!); report = nil }  // UBSan: one line
                } else if var open = report {
                    open.lines.append(line)
                    report = open
                    if line.hasPrefix("SUMMARY:") || open.lines.count >= 200 {
                        keep(open)
                        report = nil
                    }
                }
                return
            }
            guard let message = try? JSONDecoder().decode(WorkerMessage.self, from: Data(line.utf8)) else { return }
            switch message.t {
            case .begin:
                current = message.clause
                currentSince = nowMilliseconds()
                stderrTail = []
            case .result:
                current = nil
            case .fault:
                outcome.fault = message.detail
            default:
                break
            }
            outcome.messages.append(message)
        }

        while !open.isEmpty {
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            // Standard error first: a sanitizer's report belongs to the clause still running.
            fds.sort { ($0.fd == err[0] ? 0 : 1) < ($1.fd == err[0] ? 0 : 1) }
            _ = poll(&fds, nfds_t(fds.count), 200)
            for entry in fds where entry.revents != 0 {
                var chunk = [UInt8](repeating: 0, count: 65536)
                let count = read(entry.fd, &chunk, chunk.count)
                if count <= 0 {
                    if count < 0 && errno == EINTR { continue }
                    open.remove(entry.fd)
                    close(entry.fd)
                    if let rest = buffers[entry.fd], !rest.isEmpty { handle(line: String(decoding: rest, as: UTF8.self), from: entry.fd) }
                    continue
                }
                buffers[entry.fd]! += chunk[0..<count]
                while let newline = buffers[entry.fd]!.firstIndex(of: 0x0a) {
                    let line = String(decoding: buffers[entry.fd]![..<newline], as: UTF8.self)
                    buffers[entry.fd]!.removeSubrange(...newline)
                    handle(line: line, from: entry.fd)
                }
            }
            if let clause = current, killed == nil, nowMilliseconds() - currentSince > clauseLimit(clause) * 1000 {
                killed = "it ran for more than \(Int(clauseLimit(clause))) s (the worker was killed)"
                kill(-pid, SIGKILL)
            }
        }
        if let open = report { keep(open) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let signal = status & 0x7f
        let code = (status >> 8) & 0xff
        if let killed {
            outcome.ending = killed
        } else if signal != 0 {
            outcome.ending = "the worker died of \(Self.signalName(signal))"
        } else {
            outcome.ending = "the worker exited with status \(code)"
        }
        outcome.exitedCleanly = signal == 0 && code == 0 && outcome.messages.contains { $0.t == .done }
        outcome.unfinished = current
        outcome.stderrTail = stderrTail
        return outcome
    }

    static func startsSanitizerReport(_ line: String) -> Bool {
        line.contains("ERROR: AddressSanitizer") || line.contains("WARNING: ThreadSanitizer") || line.contains("ERROR: ThreadSanitizer")
            || line.contains("ERROR: LeakSanitizer") || line.contains("runtime error:") || line.contains("ERROR: UndefinedBehaviorSanitizer")
    }

    /// Frames of the checker, the Swift runtime, the sanitizer and the C libraries: a report
    /// whose frames are all such is about the checker's own uninstrumented code (the Swift
    /// runtime synchronizes in ways ThreadSanitizer cannot see), not the plugin.
    static let hostFrameMarkers = ["libswift", "libFoundation", "libdispatch", "libBlocksRuntime", "/Sources/PatchbayConformance/",
                                   "$s", "(patchbay+", "libtsan.so", "libasan.so", "libubsan.so", "libsanitizer", "sanitizer_common",
                                   "libc.so", "libstdc++.so", "libgcc_s.so", "libm.so", "ld-linux"]

    static func isPluginReport(_ lines: [String]) -> Bool {
        if lines.count == 1 { return !hostFrameMarkers.contains { lines[0].contains($0) } }
        let frames = lines.filter { $0.range(of: #"^\s*#\d+ "#, options: .regularExpression) != nil }
        guard !frames.isEmpty else { return true }
        return frames.contains { frame in !hostFrameMarkers.contains { frame.contains($0) } }
    }

    /// The report's first line and its first stack frames, without addresses and pids.
    static func summarize(_ lines: [String]) -> String {
        func clean(_ line: String) -> String {
            line.replacingOccurrences(of: #"==\d+=="#, with: "", options: .regularExpression)
                .replacingOccurrences(of: #" (on address|at pc|bp|sp|of size \d+ at) 0x[0-9a-f]+"#, with: "", options: .regularExpression)
                .replacingOccurrences(of: #"#(\d+) 0x[0-9a-f]+ in "#, with: "#$1 ", options: .regularExpression)
                .trimmingCharacters(in: .whitespaces)
        }
        let frames = lines.dropFirst().filter { $0.trimmingCharacters(in: .whitespaces).hasPrefix("#") }.prefix(3).map(clean)
        return ([clean(lines[0])] + frames).joined(separator: " | ")
    }

    static func signalName(_ signal: Int32) -> String {
        let names: [Int32: String] = [4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE", 15: "SIGTERM"]
        return names[signal] ?? "signal \(signal)"
    }
}
