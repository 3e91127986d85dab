/// What the checker concluded about one clause of the contract.
public enum Verdict: String, Codable, Sendable {
    case pass, fail, notApplicable = "na"

    /// The word printed at the start of a clause's line.
    public var label: String {
        switch self {
        case .pass: "PASS"
        case .fail: "FAIL"
        case .notApplicable: "N/A"
        }
    }
}

/// One clause's verdict and why.
public struct ClauseResult: Codable, Sendable {
    public var clause: String
    public var verdict: Verdict
    public var detail: String

    public init(clause: String, verdict: Verdict, detail: String) {
        self.clause = clause
        self.verdict = verdict
        self.detail = detail
    }

    static func pass(_ clause: String, _ detail: String) -> ClauseResult { .init(clause: clause, verdict: .pass, detail: detail) }
    static func fail(_ clause: String, _ detail: String) -> ClauseResult { .init(clause: clause, verdict: .fail, detail: detail) }
    static func na(_ clause: String, _ detail: String) -> ClauseResult { .init(clause: clause, verdict: .notApplicable, detail: detail) }

    /// A pass with `detail` when nothing went wrong, else a fail that lists the problems.
    static func judged(_ clause: String, problems: [String], detail: String) -> ClauseResult {
        problems.isEmpty ? .pass(clause, detail) : .fail(clause, problems.joined(separator: "; "))
    }
}

/// A clause's verdict can end a clause early (`Result<_, ClauseResult>`).
extension ClauseResult: Error {}

/// The request kinds of patchbay.h that a plugin claims through its capability bits.
enum RequestKind: String, CaseIterable, Codable, Sendable {
    case chat, completion, transcription
}

/// The clauses, in the order they are printed. A clause with a request kind is named
/// `name[kind]`, one per kind the plugin claims.
enum Clauses {
    /// Clauses the main worker runs, in order, before the per-kind ones.
    static let opening = ["load-library", "entry", "table", "self-description", "probe", "load", "load-cancel", "model-info",
                          "error-buffers"]
    /// Per request kind, in order.
    static let perKind = ["run", "cancel-before-execute", "cancel-after-first-event", "cancel-during-prefill", "cancel-after-end",
                          "cancel-concurrent", "destroy-without-execute", "concurrent-runs"]
    /// The main worker's last clauses.
    static let closing = ["batching-sink", "blocking-sink", "unload-after-runs", "load-unload-cycles", "shutdown"]
    /// Each runs in a process of its own (see Worker.Group).
    static let structBounds = "struct-bounds"
    static let host10 = "host-1.0"
    /// Judged by the checker from what every run of every worker reported.
    static let aggregatePerKind = ["terminal-event"]
    static let aggregate = ["utf8-text", "events", "cancel-returns-promptly", "non-blocking-calls"]
    /// Judged by the checker itself from the file, without running it.
    static let exports = "exports"

    static func named(_ base: String, _ kind: RequestKind) -> String { "\(base)[\(kind.rawValue)]" }

    /// What the main worker runs, in order.
    static func mainPlan(kinds: [RequestKind]) -> [String] {
        opening + kinds.flatMap { kind in perKind.map { named($0, kind) } } + closing
    }

    /// Every clause in print order.
    static func printOrder(kinds: [RequestKind]) -> [String] {
        var order = ["load-library", exports, "entry", "table", "self-description", "probe", "load", "load-cancel", "model-info",
                     structBounds, host10, "error-buffers"]
        for kind in kinds { order += perKind.map { named($0, kind) } + aggregatePerKind.map { named($0, kind) } }
        order += aggregate + closing
        return order
    }

    /// One line per clause for `--help` and the README: what it checks.
    static let descriptions: [(String, String)] = [
        ("load-library", "dlopen(RTLD_NOW|RTLD_LOCAL) succeeds and pb_plugin_entry is found"),
        ("exports", "pb_plugin_entry is the only symbol in the ELF dynamic symbol table"),
        ("entry", "pb_plugin_entry accepts a 1.1 host and returns a table, promptly"),
        ("table", "table size, ABI major/minor and required functions within the rules; the table never changes"),
        ("self-description", "name, version, description, formats, capabilities and flags present and sane"),
        ("probe", "probe scores 0..100, claims the model, refuses what is not one, fast, from any thread"),
        ("load", "the model loads, reporting progress (phase, bytes) often enough to be cancelled"),
        ("load-cancel", "a load cancelled through its progress callback returns PB_ERR_CANCELLED promptly, leaving nothing behind"),
        ("model-info", "model_info writes only inside the struct_size the host declares; sane values; any thread"),
        ("struct-bounds", "every host struct ends at a PROT_NONE page: nothing is read or written past its struct_size"),
        ("host-1.0", "on a 1.0 host: declines, or keeps to 1.0 structs, events, finish reasons and codes"),
        ("error-buffers", "every error message is NUL-terminated, inside error_size, and says something"),
        ("run[K]", "a run of kind K ends normally, with the events K calls for"),
        ("cancel-before-execute[K]", "a run cancelled before run_execute ends at once with FINISH/CANCELLED"),
        ("cancel-after-first-event[K]", "cancel right after the first event, from another thread and from inside on_event"),
        ("cancel-during-prefill[K]", "cancel during prompt processing of a long prompt (long audio) ends the run promptly; 1.1: progress at least every second meanwhile"),
        ("cancel-after-end[K]", "cancel after the run ended has no effect"),
        ("cancel-concurrent[K]", "many cancels at once from several threads, during and after the run"),
        ("destroy-without-execute[K]", "run_destroy without run_execute, with and without a cancel"),
        ("concurrent-runs[K]", "many runs at once, created, executed and cancelled from several threads"),
        ("terminal-event[K]", "every run of every clause ended with exactly one terminal event, nothing after it"),
        ("utf8-text", "every text is valid UTF-8 and no event splits a character"),
        ("events", "event structs: size, type, finish reason, status code and fields valid for the host; on_event never concurrent for one run nor outside run_execute"),
        ("cancel-returns-promptly", "every run_cancel call returned promptly ([non-blocking])"),
        ("non-blocking-calls", "run_create, run_destroy, model_info and probe returned promptly ([non-blocking])"),
        ("batching-sink", "PB_FLAG_BATCHING: a run whose client is behind (backlog) is paused, the others go on, cancel still ends it"),
        ("blocking-sink", "no PB_FLAG_BATCHING: while on_event blocks (a client behind), run_cancel from another thread returns, and the run then ends"),
        ("unload-after-runs", "unload after finished, cancelled and never-executed runs returns and leaves no process of the model"),
        ("load-unload-cycles", "load/run/unload cycles leak no threads, file descriptors or child processes"),
        ("shutdown", "shutdown returns and stops the plugin's threads"),
    ]
}
