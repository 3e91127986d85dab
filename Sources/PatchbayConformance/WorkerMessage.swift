import Foundation

/// One line a worker process writes to the checker (JSON, one object per line). The plugin
/// runs in the worker, so a crash or a hang costs the worker, never the checker's verdicts.
struct WorkerMessage: Codable, Sendable {
    enum Kind: String, Codable, Sendable {
        /// The worker opened the plugin: what it is and which clauses follow.
        case plan
        /// A clause starts; a crash from now on is this clause's.
        case begin
        /// A clause's verdict.
        case result
        /// One run's record, for the clauses judged over every run.
        case run
        /// How long the [non-blocking] calls of a clause took.
        case calls
        /// The plugin touched a guard page (written by the fault handler).
        case fault
        /// The worker cannot go on (a call that never returned); the checker starts another.
        case poisoned
        /// Every clause of the plan ran.
        case done
    }

    var t: Kind
    var clause: String?
    var result: ClauseResult?
    var plan: Plan?
    var run: RunReport?
    var calls: [String: CallStat]?
    var detail: String?
    var signal: Int32?

    struct Plan: Codable, Sendable {
        var name: String
        var version: String
        var abi: String
        var kinds: [RequestKind]
        var batching: Bool
        var clauses: [String]
    }

    static func begin(_ clause: String) -> WorkerMessage { WorkerMessage(t: .begin, clause: clause) }
    static func result(_ result: ClauseResult) -> WorkerMessage { WorkerMessage(t: .result, clause: result.clause, result: result) }
}

/// What happened in one run, as far as the rules judged over every run go.
struct RunReport: Codable, Sendable {
    /// The clause and scenario that made it, e.g. "cancel-concurrent[chat]" and "after the end".
    var clause: String
    var scenario: String
    var kind: RequestKind
    var executed: Bool
    var terminals: Int
    /// "finish stop", "error 7: message", or nil.
    var terminal: String?
    var events: Int
    var textEvents: Int
    var nonASCIICharacters: Int
    /// Category ("terminal", "utf8", "events", "host-1.0") → what broke it, the first few.
    var violations: [String: [String]]
}

/// How often a [non-blocking] call was made and how long the slowest took.
struct CallStat: Codable, Sendable {
    var count = 0
    var maxMilliseconds = 0.0
    var totalMilliseconds = 0.0

    mutating func add(_ milliseconds: Double) {
        count += 1
        totalMilliseconds += milliseconds
        maxMilliseconds = max(maxMilliseconds, milliseconds)
    }

    mutating func merge(_ other: CallStat) {
        count += other.count
        totalMilliseconds += other.totalMilliseconds
        maxMilliseconds = max(maxMilliseconds, other.maxMilliseconds)
    }
}
