import Synchronization
import Testing

@testable import PatchbayHost

/// Counts how often a run was told to stop.
final class CancelCounter: Sendable {
    private let count = Atomic<Int>(0)
    var value: Int { count.load(ordering: .relaxed) }
    @Sendable func cancel() { count.add(1, ordering: .relaxed) }
}

@Suite("Cancel registry")
struct CancelRegistryTests {
    @Test func cancelIDIsMatchedExclusively() {
        let registry = CancelRegistry()
        let old = CancelCounter(), new = CancelCounter()
        let oldRun = registry.register([.cancelID("run-1"), .session("thread")], cancel: old.cancel)
        registry.unregister(oldRun)
        _ = registry.register([.cancelID("run-2"), .session("thread")], cancel: new.cancel)
        // A stale stop for run-1 also carries the live session: it must not touch run-2.
        #expect(registry.cancel(.init(cancelID: "run-1", sessionID: "thread")) == 0)
        #expect(new.value == 0)
        #expect(registry.cancel(.init(cancelID: "run-2")) == 1)
        #expect(new.value == 1)
    }

    @Test func earlyCancelIDIsRememberedAndFiresOnRegister() {
        let registry = CancelRegistry()
        #expect(registry.cancel(.init(cancelID: "early")) == 0)
        #expect(registry.pendingCount == 1)
        let counter = CancelCounter()
        _ = registry.register([.cancelID("early")], cancel: counter.cancel)
        #expect(counter.value == 1)
        #expect(registry.pendingCount == 0)
        // Consumed: a second run with the same id is not cancelled again.
        let second = CancelCounter()
        _ = registry.register([.cancelID("early")], cancel: second.cancel)
        #expect(second.value == 0)
    }

    @Test func cancelForARunThatJustFinishedIsANoOp() {
        let registry = CancelRegistry()
        let first = registry.register([.cancelID("stop-me")], cancel: {})
        registry.unregister(first)
        // The Stop raced the natural finish: nothing is stashed for the id's next run.
        #expect(registry.cancel(.init(cancelID: "stop-me")) == 0)
        #expect(registry.pendingCount == 0)
        let next = CancelCounter()
        _ = registry.register([.cancelID("stop-me")], cancel: next.cancel)
        #expect(next.value == 0)
    }

    @Test func finishedIDsAreForgottenAfterTheirLifetime() async throws {
        let registry = CancelRegistry(pendingLifetime: .milliseconds(50))
        registry.unregister(registry.register([.cancelID("old")], cancel: {}))
        try await Task.sleep(for: .milliseconds(120))
        #expect(registry.finishedCount == 0)
        _ = registry.cancel(.init(cancelID: "old"))
        #expect(registry.pendingCount == 1)
    }

    @Test func bothMemoriesAreBoundedAndForgetTheOldestFirst() {
        let registry = CancelRegistry(memoryLimit: 100)
        for index in 0..<10_000 { _ = registry.cancel(.init(cancelID: "early-\(index)")) }
        #expect(registry.pendingCount == 100)
        // The newest are kept.
        let newest = CancelCounter(), oldest = CancelCounter()
        _ = registry.register([.cancelID("early-9999")], cancel: newest.cancel)
        _ = registry.register([.cancelID("early-0")], cancel: oldest.cancel)
        #expect(newest.value == 1 && oldest.value == 0)
        for index in 0..<10_000 { registry.unregister(registry.register([.cancelID("done-\(index)")], cancel: {})) }
        #expect(registry.finishedCount == 100)
    }

    @Test func pendingCancelExpires() async throws {
        let registry = CancelRegistry(pendingLifetime: .milliseconds(50))
        _ = registry.cancel(.init(cancelID: "late"))
        try await Task.sleep(for: .milliseconds(120))
        let counter = CancelCounter()
        _ = registry.register([.cancelID("late")], cancel: counter.cancel)
        #expect(counter.value == 0)
    }

    @Test func sharedKeysAreNeverRemembered() {
        let registry = CancelRegistry()
        #expect(registry.cancel(.init(sessionID: "thread", completionID: "c", messageID: "m")) == 0)
        let counter = CancelCounter()
        _ = registry.register([.session("thread"), .completion("c"), .message("m")], cancel: counter.cancel)
        #expect(counter.value == 0)
        #expect(registry.pendingCount == 0)
    }

    @Test func sessionFansOutAndCountsDistinctRuns() {
        let registry = CancelRegistry()
        let a = CancelCounter(), b = CancelCounter(), other = CancelCounter()
        _ = registry.register([.session("s"), .completion("ca")], cancel: a.cancel)
        _ = registry.register([.session("s"), .completion("cb")], cancel: b.cancel)
        _ = registry.register([.session("t")], cancel: other.cancel)
        // Both keys match run a: it still counts once.
        #expect(registry.cancel(.init(sessionID: "s", completionID: "ca")) == 2)
        #expect(a.value == 1 && b.value == 1 && other.value == 0)
        #expect(registry.cancel(.init(messageID: "nope")) == 0)
    }

    @Test func aTargetWithNoUsableKeyCancelsNothing() {
        let registry = CancelRegistry()
        let counter = CancelCounter()
        _ = registry.register([.session("s")], cancel: counter.cancel)
        #expect(registry.cancel(.init()) == 0)
        #expect(registry.cancel(.init(cancelID: "", sessionID: "")) == 0)
        #expect(counter.value == 0)
        #expect(registry.pendingCount == 0)
    }

    @Test func unregisterIsIdempotentAndLeavesNothingBehind() {
        let registry = CancelRegistry()
        let id = registry.register([.cancelID("x"), .session("s")], cancel: {})
        registry.unregister(id)
        registry.unregister(id)
        #expect(registry.liveRunCount == 0)
        #expect(registry.cancel(.init(sessionID: "s")) == 0)
    }

    /// Thousands of interleaved register / cancel / unregister operations from many
    /// threads: every cancel aimed at a run (before or after it registered) reaches it.
    @Test(.timeLimit(.minutes(1)))
    func parallelStressLosesNoCancel() async {
        let registry = CancelRegistry()
        let runs = 4000
        let counters = (0..<runs).map { _ in CancelCounter() }
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<runs {
                // Half the cancels race ahead of their run's registration.
                group.addTask { _ = registry.cancel(.init(cancelID: "run-\(index)")) }
                group.addTask {
                    let id = registry.register([.cancelID("run-\(index)"), .session("s\(index % 7)")], cancel: counters[index].cancel)
                    // Keep the run live until its cancel has landed, as a real stream would.
                    while counters[index].value == 0 { await Task.yield() }
                    registry.unregister(id)
                }
                group.addTask { _ = registry.cancel(.init(sessionID: "unrelated-\(index)")) }
            }
        }
        #expect(counters.allSatisfy { $0.value == 1 })
        #expect(registry.liveRunCount == 0)
        #expect(registry.pendingCount == 0)
    }
}
