import Foundation
import PatchbayCore
import Synchronization
import Testing

@testable import PatchbayHost

/// A plugin thread that pushes events into a channel, counting the pushes that returned.
private final class Producer: Sendable {
    let pushed = Atomic<Int>(0)
    private let total: Int

    init(_ channel: EventChannel, events: [GenerationEvent]) {
        total = events.count
        let thread = Thread { [self] in
            for event in events {
                _ = channel.push(event)
                pushed.add(1, ordering: .relaxed)
            }
        }
        thread.start()
    }

    /// Waits until `count` pushes returned (true), or `seconds` passed (false).
    func reaches(_ count: Int, within seconds: Double) async -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while pushed.load(ordering: .relaxed) < count {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
    }

    /// Whether every push returned within `seconds`.
    func finished(within seconds: Double) async -> Bool {
        await reaches(total, within: seconds)
    }
}

/// What the channel holds, taken by its consumer. `next()` waits without a deadline for an
/// event, so this requires one to be there: a broken channel then fails the test, never hangs it.
private func takeBuffered(_ channel: EventChannel) async throws -> [GenerationEvent] {
    try #require(channel.backlog > 0, "nothing is buffered")
    return await channel.next()
}

private func tokens(_ count: Int) -> [GenerationEvent] {
    (0..<count).map { .content("t\($0)") }
}

@Suite("Event channel")
struct EventChannelTests {
    /// A batching engine's channel never blocks the engine, and tells it the backlog.
    @Test func nonBlockingChannelNeverWaitsAndReportsItsBacklog() async throws {
        let channel = EventChannel(blocking: false)
        for _ in 0..<(EventChannel.capacity * 4) { #expect(channel.push(.content("x")) == .accepted) }
        #expect(channel.backlog == EventChannel.capacity * 4)
        #expect(try await takeBuffered(channel).count == EventChannel.capacity * 4)
        #expect(channel.backlog == 0)
    }

    /// Past its byte limit a non-blocking channel drops output, asks once for the run to be
    /// cancelled, and ends the response with an error instead of a normal finish.
    @Test func nonBlockingChannelIsBoundedInBytes() async throws {
        let channel = EventChannel(blocking: false)
        let big = String(repeating: "y", count: 1 << 20)
        var results: [EventChannel.PushResult] = []
        for _ in 0..<20 { results.append(channel.push(.content(big))) }
        #expect(results.filter { $0 == .overflowed }.count == 1)
        _ = channel.push(.finish(.cancelled))
        let events = try await takeBuffered(channel)
        #expect(events.count < 20)
        guard case .error(let error)? = events.last else {
            Issue.record("the response did not end with an error")
            return
        }
        #expect(error.code == "client_too_slow")
    }

    @Test func wakeReturnsAnEmptyBatchToAWaitingConsumer() async {
        let channel = EventChannel(blocking: true)
        async let batch = channel.next()
        try? await Task.sleep(for: .milliseconds(50))
        channel.wake()
        // Were wake() to do nothing, this event would end the wait (failing the test) instead of a hang.
        let rescue = Task {
            try? await Task.sleep(for: .seconds(5))
            _ = channel.push(.finish(.stop))
        }
        #expect(await batch.isEmpty)
        rescue.cancel()
    }

    /// A blocking channel (a plugin with one thread per run) holds the engine once it is
    /// `capacity` events ahead of its client, and lets it go on as the client reads.
    @Test func blockingChannelHoldsAProducerThatIsAFullBufferAhead() async throws {
        let channel = EventChannel(blocking: true)
        let producer = Producer(channel, events: tokens(EventChannel.capacity + 1))
        try #require(await producer.reaches(EventChannel.capacity, within: 10))
        #expect(await !producer.finished(within: 0.3), "the producer ran past a full buffer")
        #expect(producer.pushed.load(ordering: .relaxed) == EventChannel.capacity)
        #expect(channel.backlog == EventChannel.capacity)
        // The client reads: the producer is released and delivers the rest.
        #expect(try await takeBuffered(channel).count == EventChannel.capacity)
        try #require(await producer.finished(within: 10))
        #expect(try await takeBuffered(channel) == [.content("t\(EventChannel.capacity)")])
    }

    /// The terminal event never waits, however full the buffer: a run can always end.
    @Test func aTerminalEventIsNeverHeldBack() async throws {
        let channel = EventChannel(blocking: true)
        let producer = Producer(channel, events: tokens(EventChannel.capacity) + [.finish(.cancelled)])
        try #require(await producer.finished(within: 10))
        let events = try await takeBuffered(channel)
        #expect(events.count == EventChannel.capacity + 1)
        #expect(events.last == .finish(.cancelled))
    }

    /// A cancel releases a producer that waits on a client that no longer reads, and lifts
    /// the bound for good, so the run ends at once instead of waiting for a reader.
    @Test func releaseFreesAWaitingProducerAndLiftsTheBound() async throws {
        let channel = EventChannel(blocking: true)
        let producer = Producer(channel, events: tokens(EventChannel.capacity + 1000) + [.finish(.cancelled)])
        try #require(await producer.reaches(EventChannel.capacity, within: 10))
        #expect(await !producer.finished(within: 0.3), "the producer ran past a full buffer")
        channel.release()
        try #require(await producer.finished(within: 10), "release() left the producer waiting")
        #expect(channel.backlog == EventChannel.capacity + 1001)
        #expect(try await takeBuffered(channel).last == .finish(.cancelled))
    }

    /// A release with nobody waiting is remembered: the next producer is not held either.
    @Test func releaseBeforeTheBufferFillsAlsoHolds() async {
        let channel = EventChannel(blocking: true)
        channel.release()
        let producer = Producer(channel, events: tokens(EventChannel.capacity * 3))
        #expect(await producer.finished(within: 10))
        #expect(channel.backlog == EventChannel.capacity * 3)
    }
}
