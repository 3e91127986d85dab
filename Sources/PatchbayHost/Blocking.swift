import Foundation

/// Runs blocking plugin work (model load, unload) on a thread of its own, so it never
/// occupies one of the few threads Swift concurrency and the event loops share.
func onDedicatedThread<T: Sendable>(name: String, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.name = name
        thread.start()
    }
}
