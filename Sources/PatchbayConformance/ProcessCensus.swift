import Foundation

/// The threads, file descriptors and child processes of this process, from /proc: what a
/// plugin may leave behind after an unload or a shutdown.
struct ProcessCensus: Equatable {
    /// Thread id → name (/proc/self/task/*/comm).
    var threads: [Int: String]
    /// Descriptor → what it refers to (/proc/self/fd/* links).
    var descriptors: [Int: String]
    /// Child pid → "name (state)"; zombies included: a child not reaped is still a child.
    var children: [Int: String]

    static func take() -> ProcessCensus {
        let manager = FileManager.default
        var threads: [Int: String] = [:]
        for entry in (try? manager.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
            guard let tid = Int(entry) else { continue }
            let name = (try? String(contentsOfFile: "/proc/self/task/\(entry)/comm", encoding: .utf8)) ?? "?"
            threads[tid] = name.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        // The listing's own descriptor shows up in it, pointing at the directory being listed.
        var descriptors: [Int: String] = [:]
        for entry in (try? manager.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            guard let fd = Int(entry) else { continue }
            guard let target = try? manager.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(entry)") else { continue }
            if target.hasSuffix("/fd") && target.hasPrefix("/proc/") { continue }
            descriptors[fd] = target
        }
        var children: [Int: String] = [:]
        let me = getpid()
        for entry in (try? manager.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int(entry), let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8) else { continue }
            // "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last ')'.
            guard let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")") else { continue }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count >= 2, Int32(fields[1]) == me else { continue }
            children[pid] = "\(stat[stat.index(after: open)..<close]) (\(fields[0]))"
        }
        return ProcessCensus(threads: threads, descriptors: descriptors, children: children)
    }

    /// What `later` has that this census had not, as words ("2 threads (llama-worker, …)"), or
    /// nil when nothing was added.
    func additions(in later: ProcessCensus) -> [String] {
        var added: [String] = []
        // Threads by id: a thread of the checker that ended must not hide one the plugin left.
        let newThreads = later.threads.filter { threads[$0.key] == nil }
        if !newThreads.isEmpty {
            let names = newThreads.sorted { $0.key < $1.key }.map { "\($0.key) '\($0.value)'" }
            added.append("\(newThreads.count) thread\(newThreads.count == 1 ? "" : "s") (\(Self.list(names)); a thread is named after the one that created it)")
        }
        let newDescriptors = later.descriptors.filter { descriptors[$0.key] == nil }.map { "\($0.key) → \($0.value)" }.sorted()
        if later.descriptors.count > descriptors.count {
            added.append("\(later.descriptors.count - descriptors.count) more file descriptors (new: \(Self.list(newDescriptors)))")
        }
        let newChildren = later.children.filter { children[$0.key] == nil }.map { "\($0.key) \($0.value)" }.sorted()
        if !newChildren.isEmpty { added.append("\(newChildren.count) child processes left (\(Self.list(newChildren)))") }
        return added
    }

    /// Waits up to `seconds` for the process to come back to at most this census (threads end
    /// and children are reaped asynchronously); returns what is still left.
    func leftovers(after seconds: Double) -> [String] {
        let deadline = nowMilliseconds() + seconds * 1000
        while true {
            let left = additions(in: ProcessCensus.take())
            if left.isEmpty || nowMilliseconds() >= deadline { return left }
            sleepMilliseconds(50)
        }
    }

    /// The id of the calling thread (/proc/thread-self → "PID/task/TID").
    static var currentThread: Int? {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self")).flatMap { Int($0.split(separator: "/").last ?? "") }
    }

    /// This census with the calling thread added: a clause's own thread is never a leftover.
    func includingCurrentThread() -> ProcessCensus {
        var census = self
        if let tid = Self.currentThread { census.threads[tid] = "(the checker's clause thread)" }
        return census
    }

    static func list(_ items: [String]) -> String {
        items.isEmpty ? "none" : items.prefix(6).joined(separator: ", ") + (items.count > 6 ? ", …" : "")
    }
}
