import CPatchbayABI
import Foundation
import PatchbayCore
import Synchronization
import Testing

@testable import PatchbayHost

/// A plugin with one thread per run (no PB_FLAG_BATCHING), so its runs get a blocking event
/// channel: it streams tokens as fast as the channel takes them until it is cancelled.
private enum Chatterbox {
    static let cancelled = Atomic<Bool>(false)
    static let delivered = Atomic<Int>(0)
    static let finished = Atomic<Bool>(false)

    static func plugin() -> Plugin {
        var api = pb_plugin_api()
        api.struct_size = UInt32(MemoryLayout<pb_plugin_api>.size)
        api.abi_major = UInt16(PB_ABI_VERSION_MAJOR)
        api.abi_minor = UInt16(PB_ABI_VERSION_MINOR)
        api.name = UnsafePointer(strdup("chatterbox"))
        api.capabilities = UInt64(PB_CAP_COMPLETION)
        api.model_info = { _, _ in }
        api.run_create = { _, _, run, _, _ in
            run?.pointee = OpaquePointer(bitPattern: 0x1)
            return Int32(PB_OK)
        }
        api.run_execute = { _, sink in
            guard let sink else { return }
            let token = StaticString("x")
            var event = pb_event()
            event.struct_size = UInt32(MemoryLayout<pb_event>.size)
            event.type = Int32(PB_EVENT_CONTENT_DELTA)
            while !Chatterbox.cancelled.load(ordering: .relaxed) {
                token.withUTF8Buffer { text in
                    text.withMemoryRebound(to: CChar.self) { text in
                        event.text = text.baseAddress
                        event.text_len = 1
                        sink.pointee.on_event(sink.pointee.context, &event)
                    }
                }
                Chatterbox.delivered.add(1, ordering: .relaxed)
            }
            var finish = pb_event()
            finish.struct_size = UInt32(MemoryLayout<pb_event>.size)
            finish.type = Int32(PB_EVENT_FINISH)
            finish.finish_reason = Int32(PB_FINISH_CANCELLED)
            sink.pointee.on_event(sink.pointee.context, &finish)
            Chatterbox.finished.store(true, ordering: .relaxed)
        }
        api.run_cancel = { _ in Chatterbox.cancelled.store(true, ordering: .relaxed) }
        api.run_destroy = { _ in }
        return Plugin(path: "/chatterbox.so", table: api)
    }
}

private final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func raise() { value.store(true, ordering: .relaxed) }
    var isRaised: Bool { value.load(ordering: .relaxed) }
}

/// Waits until `condition` holds (true) or `seconds` pass (false).
private func eventually(within seconds: Double, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while !condition() {
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: .milliseconds(5))
    }
    return true
}

@Suite("A run's backpressure")
struct RunBackpressureTests {
    /// Nobody reads the run: its engine is held a channel's capacity ahead. A cancel (here
    /// from a client that went away) must free that engine at once, although nobody reads
    /// still, so the run ends and its handle is destroyed.
    @Test func aCancelFreesAnEngineHeldByAClientThatDoesNotRead() async throws {
        let plugin = Chatterbox.plugin()
        #expect(!plugin.isBatching)
        let model = LoadedModel(id: "chatter", modelPath: "/chatter", plugin: plugin,
                                handle: OpaquePointer(bitPattern: 0x2)!)
        let run = try model.createRun(NormalizedRequest(kind: .completion, maxTokens: 1000, maxWallMilliseconds: 0))
        let ended = Flag()
        run.onEnd { ended.raise() }
        run.start()

        try #require(await eventually(within: 10) { Chatterbox.delivered.load(ordering: .relaxed) >= EventChannel.capacity })
        try await Task.sleep(for: .milliseconds(300))
        // Held: the engine delivered a buffer's worth, and waits in the one after.
        let delivered = Chatterbox.delivered.load(ordering: .relaxed)
        #expect(delivered == EventChannel.capacity)
        #expect(!ended.isRaised)

        run.cancel()
        // (`nextEvents()` below waits without a deadline: only once the engine is done.)
        try #require(await eventually(within: 10) { Chatterbox.finished.load(ordering: .relaxed) },
                     "the cancelled engine is still held by the channel")
        #expect(await eventually(within: 10) { ended.isRaised })
        #expect(model.activeRunCount == 0)
        // What the engine produced is still there for the client, ending with the finish.
        let events = await run.nextEvents()
        #expect(events.count == EventChannel.capacity + 2)
        #expect(events.last == .finish(.cancelled))
    }
}
