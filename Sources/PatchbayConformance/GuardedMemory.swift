#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Memory the checker hands a plugin: host structs, request strings, byte inputs, error
/// buffers.
///
/// Guarded: the bytes end exactly where a PROT_NONE page begins, so a plugin that reads or
/// writes one byte past the size it was given faults at once, and the fault handler
/// (FaultHandler) names what it touched. This is how Tests/compat catches a host that reads
/// past a 1.0 struct, turned around. Padded: the bytes are followed by a page of zeroes, so a
/// plugin that reads past a struct's size reads zero, as the versioning rule says it should,
/// and the run goes on (the main worker uses these; the struct-bounds clause the guarded kind).
///
/// Neither kind is ever freed: a plugin that keeps a pointer past its lifetime must hit a
/// guard (`retire`) or stale zeroes, never memory reused for something else.
enum GuardedMemory {
    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// `size` zeroed bytes; guarded or padded. `label` names the memory in a fault report
    /// ("pb_event_sink (struct_size 40)").
    static func allocate(_ size: Int, guarded: Bool, label: String, alignment: Int = 8) -> UnsafeMutableRawPointer {
        guarded ? allocateGuarded(size, label: label, alignment: alignment) : allocatePadded(size)
    }

    static func allocatePadded(_ size: Int) -> UnsafeMutableRawPointer {
        calloc(1, size + pageSize)!
    }

    /// The bytes end at a PROT_NONE page. A size that is not a multiple of `alignment` leaves
    /// a gap of up to alignment - 1 bytes before the guard: structs here are multiples of 8.
    static func allocateGuarded(_ size: Int, label: String, alignment: Int = 8) -> UnsafeMutableRawPointer {
        let span = max(1, (size + pageSize - 1) / pageSize) * pageSize
        guard let base = mmap(nil, span + pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              base != MAP_FAILED else { fatalError("mmap: out of memory") }
        let guardPage = base + span
        guard mprotect(guardPage, pageSize, PROT_NONE) == 0 else { fatalError("mprotect failed") }
        var start = span - size
        start -= start % alignment
        let end = start + size
        FaultHandler.register(from: guardPage, to: guardPage + pageSize, end: base + end, label: label)
        return base + start
    }

    /// Makes guarded memory whose lifetime ended (a sink after run_execute returned)
    /// unreadable, so that a plugin that still uses it faults with `label`.
    static func retire(_ pointer: UnsafeMutableRawPointer, size: Int, label: String) {
        let address = Int(bitPattern: pointer)
        let first = address - address % pageSize
        let last = (address + size + pageSize - 1) / pageSize * pageSize
        guard mprotect(UnsafeMutableRawPointer(bitPattern: first), last - first, PROT_NONE) == 0 else { return }
        FaultHandler.register(from: UnsafeMutableRawPointer(bitPattern: first)!, to: UnsafeMutableRawPointer(bitPattern: last)!,
                              label: label)
    }

    /// A C string (with its NUL) ending at a guard page, or padded.
    static func string(_ text: String, guarded: Bool, label: String) -> UnsafeMutablePointer<CChar> {
        let utf8 = Array(text.utf8) + [0]
        let memory = allocate(utf8.count, guarded: guarded, label: label, alignment: 1)
        memory.copyMemory(from: utf8, byteCount: utf8.count)
        return memory.assumingMemoryBound(to: CChar.self)
    }

    /// Bytes (no NUL) ending at a guard page, or padded.
    static func bytes(_ data: [UInt8], guarded: Bool, label: String) -> UnsafeMutablePointer<UInt8> {
        let memory = allocate(max(1, data.count), guarded: guarded, label: label, alignment: 1)
        memory.copyMemory(from: data, byteCount: data.count)
        return memory.assumingMemoryBound(to: UInt8.self)
    }
}
