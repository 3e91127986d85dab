import CPatchbayABI
import PatchbayCore
import Testing

@testable import PatchbayHost

@Suite("ABI versioning rule")
struct ABIVersioningTests {
    @Test func frozenSizesMatchTheHeaderOfEachVersion() {
        // PB_PLUGIN_API_SIZE_1_0 and PB_EVENT_SIZE_1_0: the sizeof of the 1.0 header (LP64).
        #expect(ABIStructs.pluginTableSize1_0 == 120)
        #expect(ABIStructs.size(through: \pb_event.error_code) == 112)
        #expect(MemoryLayout<pb_plugin_api>.size > ABIStructs.pluginTableSize1_0)
    }

    /// A 1.0 plugin's event is shorter than the host's; whatever lies past its declared
    /// size (here 0xFF bytes) must read as zero, never as the neighbouring memory.
    @Test func anEventIsReadOnlyWithinItsWritersSize() {
        let hostSize = MemoryLayout<pb_event>.size
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: hostSize, alignment: MemoryLayout<pb_event>.alignment)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0xFF, count: hostSize)
        var old = pb_event()
        old.struct_size = UInt32(ABIStructs.size(through: \pb_event.error_code))
        old.type = Int32(PB_EVENT_ERROR)
        old.error_code = Int32(PB_ERR_BUSY)
        buffer.copyMemory(from: &old, byteCount: Int(old.struct_size))

        let read = ABIStructs.read(pb_event.self, at: buffer)
        #expect(read.error_code == Int32(PB_ERR_BUSY))
        #expect(read.retry_after_ms == 0)
        #expect(read.progress_total == 0)
        #expect(read.language_probability == 0)
        guard case .error(let error)? = GenerationEvent(read) else {
            Issue.record("not an error event")
            return
        }
        #expect(error.kind == .busy)
        #expect(APIError(error).status == 429)
        #expect(APIError(error).retryAfterSeconds == 1)
    }

    @Test func unknownEventTypesFromANewerMinorAreSkipped() {
        var event = pb_event()
        event.struct_size = UInt32(MemoryLayout<pb_event>.size)
        event.type = 99
        #expect(GenerationEvent(event) == nil)
        event.type = Int32(PB_EVENT_FINISH)
        event.finish_reason = 99
        #expect(GenerationEvent(event) == .finish(.stop))
    }

    /// The host names the failure; the server's mapping gives the status a client sees.
    @Test func busyOverloadedAndTimedOutCarryRetryAfter() {
        func client(_ status: pb_status, retryAfterMilliseconds: Int = 0) -> APIError {
            APIError(HostError(pluginStatus: status, message: "warming up", retryAfterMilliseconds: retryAfterMilliseconds))
        }
        #expect(client(Int32(PB_ERR_BUSY), retryAfterMilliseconds: 1500).retryAfterSeconds == 2)
        let overloaded = client(Int32(PB_ERR_OVERLOADED))
        #expect(overloaded.status == 503 && overloaded.retryAfterSeconds == 1 && overloaded.anthropicType == "overloaded_error")
        #expect(client(Int32(PB_ERR_TIMED_OUT)).status == 503)
        #expect(client(Int32(PB_ERR_INTERNAL)).retryAfterSeconds == nil)
        #expect(client(Int32(PB_ERR_CANCELLED)).status == 499)
        #expect(client(Int32(PB_ERR_OUT_OF_MEMORY)).status == 507)
        #expect(client(Int32(PB_ERR_ENGINE_UNAVAILABLE)).status == 502)
        #expect(client(Int32(PB_ERR_ENGINE_UNAVAILABLE), retryAfterMilliseconds: 4000).status == 503)
    }
}
