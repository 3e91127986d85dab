#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// Names the memory a plugin faulted on, then lets the worker die of the signal.
///
/// A SIGSEGV or SIGBUS in a worker is the plugin's (the checker's own code touches no guard
/// page). The handler looks the address up among the guard pages GuardedMemory registered,
/// writes one `fault` line for the checker ("pb_event_sink (struct_size 32): read 8 bytes past
/// its end"), restores the default action and returns, so the access faults again and the
/// worker ends with the signal, which the checker reports as the clause's failure.
///
/// Everything the handler touches is allocated before it is installed: no allocation, no
/// lock, only write(2).
enum FaultHandler {
    private struct Entry {
        var from: UInt
        var to: UInt
        /// Where the guarded bytes ended (0 for retired memory).
        var end: UInt
        var label: UnsafeMutablePointer<CChar>
        var labelLength: Int
    }

    private static let capacity = 1 << 16
    nonisolated(unsafe) private static var entries: UnsafeMutablePointer<Entry>?
    nonisolated(unsafe) private static var line: UnsafeMutablePointer<UInt8>?
    nonisolated(unsafe) private static var output: Int32 = 2
    private static let count = Atomic<Int>(0)
    private static let registering = Mutex(())

    /// Installs the handler for SIGSEGV and SIGBUS; fault lines go to `fd`.
    static func install(output fd: Int32) {
        entries = .allocate(capacity: capacity)
        line = .allocate(capacity: 4096)
        output = fd
        _ = count.load(ordering: .relaxed)
        var action = sigaction()
        action.__sigaction_handler.sa_sigaction = { signal, info, context in FaultHandler.handle(signal, info, context) }
        action.sa_flags = SA_SIGINFO
        sigemptyset(&action.sa_mask)
        sigaction(SIGSEGV, &action, nil)
        sigaction(SIGBUS, &action, nil)
    }

    /// Remembers that an access in [from, to) is a touch of `label`'s memory.
    static func register(from: UnsafeMutableRawPointer, to: UnsafeMutableRawPointer, end: UnsafeMutableRawPointer? = nil, label: String) {
        guard let entries else { return }
        let clean = label.map { $0 == "\"" || $0 == "\\" || $0.asciiValue == nil || $0 < " " ? "?" : $0 }
        let text = strdup(String(clean))!
        registering.withLock { _ in
            let index = count.load(ordering: .relaxed)
            guard index < capacity else { return }
            entries[index] = Entry(from: UInt(bitPattern: from), to: UInt(bitPattern: to), end: end.map { UInt(bitPattern: $0) } ?? 0,
                                   label: text, labelLength: strlen(text))
            count.store(index + 1, ordering: .releasing)
        }
    }

    private static func handle(_ signal: Int32, _ info: UnsafeMutablePointer<siginfo_t>?, _ context: UnsafeMutableRawPointer?) {
        let address = UInt(bitPattern: info?.pointee._sifields._sigfault.si_addr)
        var writer = LineWriter(buffer: line!)
        writer.append("{\"t\":\"fault\",\"signal\":")
        writer.append(UInt(signal))
        writer.append(",\"detail\":\"")
        var found = false
        if let entries {
            var index = count.load(ordering: .acquiring) - 1
            while index >= 0 {
                let entry = entries[index]
                if address >= entry.from && address < entry.to {
                    writer.append(UnsafeRawBufferPointer(start: entry.label, count: entry.labelLength))
                    if entry.end != 0 {
                        writer.append(": ")
                        writer.append(isWrite(context) ? "wrote" : "read")
                        writer.append(" byte ")
                        writer.append(address - entry.end)
                        writer.append(" after its end")
                    }
                    found = true
                    break
                }
                index -= 1
            }
        }
        if !found { writer.append("a fault outside the checker's guard pages") }
        writer.append(" (address 0x")
        writer.append(address, radix: 16)
        writer.append(")\"}\n")
        _ = write(output, line!, writer.length)
        // Fault again with the default action: the worker dies of the signal.
        Glibc.signal(signal, SIG_DFL)
    }

    /// Whether the faulting access was a write (x86-64: bit 1 of the page-fault error code).
    private static func isWrite(_ context: UnsafeMutableRawPointer?) -> Bool {
        #if arch(x86_64) && canImport(Glibc)
        guard let context else { return false }
        let ucontext = context.assumingMemoryBound(to: ucontext_t.self)
        return withUnsafeBytes(of: &ucontext.pointee.uc_mcontext.gregs) { registers in
            registers.load(fromByteOffset: 19 * MemoryLayout<Int64>.size, as: Int64.self) & 2 != 0  // REG_ERR
        }
        #else
        return false
        #endif
    }

    /// Appends to a preallocated buffer: safe in a signal handler.
    private struct LineWriter {
        let buffer: UnsafeMutablePointer<UInt8>
        var length = 0
        let limit = 4000

        mutating func append(_ text: StaticString) {
            append(UnsafeRawBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
        }

        mutating func append(_ bytes: UnsafeRawBufferPointer) {
            for byte in bytes where length < limit {
                buffer[length] = byte
                length += 1
            }
        }

        mutating func append(_ value: UInt, radix: UInt = 10) {
            var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes of room, on the stack
            var count = 0
            var rest = value
            withUnsafeMutableBytes(of: &digits) { room in
                repeat {
                    let digit = UInt8(rest % radix)
                    room[count] = digit < 10 ? 48 + digit : 87 + digit
                    count += 1
                    rest /= radix
                } while rest > 0 && count < 24
                while count > 0 && length < limit {
                    count -= 1
                    buffer[length] = room[count]
                    length += 1
                }
            }
        }
    }
}
