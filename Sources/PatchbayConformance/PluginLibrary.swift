import CPatchbayABI
import Foundation
import Synchronization

/// The plugin library as this checker hosts it: opened with dlopen(RTLD_NOW | RTLD_LOCAL),
/// given a host table of its own (whose log lines it keeps), and its function table read
/// within the struct_size the plugin declared, every field past it zero.
final class PluginLibrary: @unchecked Sendable {
    let path: String
    let handle: UnsafeMutableRawPointer
    let entry: pb_plugin_entry_fn
    /// The host table handed to pb_plugin_entry; valid for the rest of the process.
    private(set) var host: UnsafeMutablePointer<pb_host_api>?
    /// Where the plugin's table lives, and its bytes within struct_size as first returned.
    private(set) var tablePointer: UnsafeRawPointer?
    private(set) var tableBytes: [UInt8] = []
    /// The table as this host reads it (zero past the declared size).
    private(set) var table = pb_plugin_api()

    enum OpenError: Error, CustomStringConvertible {
        case cannotOpen(String), noEntry
        var description: String {
            switch self {
            case .cannotOpen(let why): "dlopen failed: \(why)"
            case .noEntry: "the library does not export '\(PB_PLUGIN_ENTRY_SYMBOL)'"
            }
        }
    }

    init(path: String) throws {
        self.path = path
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw OpenError.cannotOpen(dlerror().map { String(cString: $0) } ?? "unknown error")
        }
        guard let symbol = dlsym(handle, PB_PLUGIN_ENTRY_SYMBOL) else { throw OpenError.noEntry }
        self.handle = handle
        entry = unsafeBitCast(symbol, to: pb_plugin_entry_fn.self)
    }

    /// Calls pb_plugin_entry once with a host table of ABI 1.`minor`. Guarded: the table ends
    /// at a PROT_NONE page. Returns the time the call took; `table` is set when it accepted.
    func callEntry(minor: UInt16, guarded: Bool) -> (accepted: Bool, milliseconds: Double) {
        let size = MemoryLayout<pb_host_api>.size
        let memory = GuardedMemory.allocate(size, guarded: guarded, label: "pb_host_api (struct_size \(size))")
        let host = memory.bindMemory(to: pb_host_api.self, capacity: 1)
        host.initialize(to: pb_host_api(
            struct_size: UInt32(size), abi_major: UInt16(PB_ABI_VERSION_MAJOR), abi_minor: minor, context: nil,
            log: { _, level, message in PluginLog.shared.append(level: level, message: message) }))
        self.host = host
        let (returned, milliseconds) = timed { entry(host) }
        guard let returned else { return (false, milliseconds) }
        let pointer = UnsafeRawPointer(returned)
        tablePointer = pointer
        tableBytes = Self.declaredBytes(at: pointer)
        table = Self.read(pb_plugin_api.self, at: pointer)
        return (true, milliseconds)
    }

    /// The declared size of the plugin's table (its first field).
    var declaredSize: Int { tableBytes.count }
    var abiMajor: Int { tablePointer.map { Int($0.load(fromByteOffset: 4, as: UInt16.self)) } ?? 0 }
    var abiMinor: Int { tablePointer.map { Int($0.load(fromByteOffset: 6, as: UInt16.self)) } ?? 0 }
    var isBatching: Bool { table.flags & UInt64(PB_FLAG_BATCHING) != 0 }
    var name: String { table.name.map { String(cString: $0) } ?? "" }

    /// Whether the table still holds the bytes it held when pb_plugin_entry returned it.
    var tableUnchanged: Bool { tablePointer.map { Self.declaredBytes(at: $0) == tableBytes } ?? true }

    /// The request kinds the plugin claims (and has the functions for).
    var kinds: [RequestKind] {
        var kinds: [RequestKind] = []
        if table.capabilities & UInt64(PB_CAP_CHAT) != 0 { kinds.append(.chat) }
        if table.capabilities & UInt64(PB_CAP_COMPLETION) != 0 { kinds.append(.completion) }
        if table.capabilities & UInt64(PB_CAP_TRANSCRIPTION) != 0 && table.run_create_with_inputs != nil { kinds.append(.transcription) }
        return kinds
    }

    private static func declaredBytes(at pointer: UnsafeRawPointer) -> [UInt8] {
        let size = min(Int(pointer.load(as: UInt32.self)), 1 << 16)
        return Array(UnsafeRawBufferPointer(start: pointer, count: size))
    }

    /// Copies the struct at `pointer`, whose first field is its writer's struct_size, reading
    /// no byte past that size; the rest of the copy is zero.
    static func read<T>(_ type: T.Type, at pointer: UnsafeRawPointer) -> T {
        let declared = Int(pointer.load(as: UInt32.self))
        return withUnsafeTemporaryAllocation(byteCount: MemoryLayout<T>.size, alignment: MemoryLayout<T>.alignment) { storage in
            let base = storage.baseAddress!
            base.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
            base.copyMemory(from: pointer, byteCount: min(declared, MemoryLayout<T>.size))
            return base.load(as: T.self)
        }
    }
}

/// The plugin's log lines (host->log), written to standard error as they come.
final class PluginLog: Sendable {
    static let shared = PluginLog()
    private let lines = Mutex<[String]>([])

    func append(level: pb_log_level, message: UnsafePointer<CChar>?) {
        let text = message.map { String(cString: $0) } ?? "(NULL)"
        let name = ["debug", "info", "warning", "error"][Int(max(0, min(3, level)))]
        lines.withLock { $0.append(text) }
        FileHandle.standardError.write(Data("[plugin \(name)] \(text)\n".utf8))
    }

    var all: [String] { lines.withLock { $0 } }
}
