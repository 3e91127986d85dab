import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A plain thread for calling into the plugin, which blocks at will. Waiting for it takes a
/// limit: a plugin call that never returns leaves its thread behind and the worker poisoned,
/// never the checker hung. (No Dispatch queues: their pooled threads would blur the thread
/// counts of load-unload-cycles.)
final class CheckThread: Sendable {
    private let finished = DispatchSemaphore(value: 0)
    private let state = Mutex<(done: Bool, joined: Bool)>((false, false))
    nonisolated(unsafe) private var thread = pthread_t()

    private final class Start {
        let body: () -> Void
        let name: String
        init(_ body: @escaping () -> Void, _ name: String) {
            self.body = body
            self.name = name
        }
    }

    /// Starts `body` on a new thread named `name` (at most 15 characters are kept). `body`
    /// works with raw pointers into the plugin, which Swift cannot check for sharing.
    init(_ name: String, _ body: @escaping () -> Void) {
        let start = Start({ [self] in
            body()
            state.withLock { $0.done = true }
            finished.signal()
        }, name)
        let result = pthread_create(&thread, nil, { argument in
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            Thread.current.name = String(start.name.prefix(15))
            start.body()
            return nil
        }, Unmanaged.passRetained(start).toOpaque())
        precondition(result == 0, "pthread_create failed: \(result)")
    }

    /// Waits up to `seconds` for the thread to end; true (and joined) if it did.
    @discardableResult
    func wait(seconds: Double) -> Bool {
        if state.withLock({ $0.joined }) { return true }
        if seconds.isInfinite {
            finished.wait()
        } else {
            guard finished.wait(timeout: .now() + seconds) == .success else { return false }
        }
        finished.signal()  // a later wait returns at once
        let join = state.withLock { state -> Bool in
            defer { state.joined = true }
            return !state.joined
        }
        if join { pthread_join(thread, nil) }
        return true
    }

    var isDone: Bool { state.withLock { $0.done } }
}

/// Milliseconds on the monotonic clock.
func nowMilliseconds() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Double(time.tv_sec) * 1000 + Double(time.tv_nsec) / 1_000_000
}

func sleepMilliseconds(_ milliseconds: Double) {
    guard milliseconds > 0 else { return }
    usleep(useconds_t(milliseconds * 1000))
}

/// Runs `body` and returns how long it took, in milliseconds.
func timed<T>(_ body: () throws -> T) rethrows -> (T, Double) {
    let start = nowMilliseconds()
    let value = try body()
    return (value, nowMilliseconds() - start)
}

/// "12 ms", "1.4 s".
func formatMilliseconds(_ milliseconds: Double) -> String {
    if milliseconds < 1 { return String(format: "%.2f ms", milliseconds) }
    if milliseconds < 1000 { return "\(Int(milliseconds.rounded())) ms" }
    return String(format: "%.1f s", milliseconds / 1000)
}
