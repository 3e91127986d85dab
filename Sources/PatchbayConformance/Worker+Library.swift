import CPatchbayABI
import Foundation
import Synchronization

/// The clauses about the library and its table: entry, table, self-description, probe.
extension Worker {
    /// The sizes patchbay.h freezes (PB_PLUGIN_API_SIZE_1_0, _1_1), which Swift cannot import.
    static let pluginTableSize10 = MemoryLayout<pb_plugin_api>.offset(of: \pb_plugin_api.embed)! + MemoryLayout<UnsafeRawPointer>.size
    static let pluginTableSize11 = MemoryLayout<pb_plugin_api>.offset(of: \pb_plugin_api.shutdown)! + MemoryLayout<UnsafeRawPointer>.size

    func entryResult() -> ClauseResult {
        let library = self.library!
        let detail = "returned a \(library.declaredSize)-byte ABI \(library.abiMajor).\(library.abiMinor) table in \(formatMilliseconds(entryMilliseconds))"
        if entryMilliseconds > context.nonBlockingLimitMilliseconds {
            return .fail("entry", "\(detail): pb_plugin_entry is [non-blocking]")
        }
        return .pass("entry", detail)
    }

    func tableClause() -> ClauseResult {
        let library = self.library!
        let table = library.table
        let size = library.declaredSize, major = library.abiMajor, minor = library.abiMinor
        var problems: [String] = []
        if major != Int(PB_ABI_VERSION_MAJOR) {
            problems.append("abi_major \(major): the host refuses any major but \(PB_ABI_VERSION_MAJOR)")
        }
        if size < Self.pluginTableSize10 {
            problems.append("struct_size \(size) is smaller than ABI 1.0's table (\(Self.pluginTableSize10))")
        } else if minor == 0 && size != Self.pluginTableSize10 {
            problems.append("struct_size \(size) with abi_minor 0: a 1.0 table is \(Self.pluginTableSize10) bytes")
        } else if minor == 1 && size != Self.pluginTableSize11 {
            problems.append("struct_size \(size) with abi_minor 1: a 1.1 table is \(Self.pluginTableSize11) bytes")
        } else if minor > 1 && size < Self.pluginTableSize11 {
            problems.append("struct_size \(size) with abi_minor \(minor) is smaller than a 1.1 table (\(Self.pluginTableSize11))")
        }
        if size % MemoryLayout<pb_plugin_api>.alignment != 0 { problems.append("struct_size \(size) is not a multiple of the table's alignment") }
        if let pointer = library.tablePointer, Int(bitPattern: pointer) % MemoryLayout<pb_plugin_api>.alignment != 0 {
            problems.append("the table is not aligned")
        }
        let required: [(String, Bool)] = [
            ("name", table.name != nil), ("load", table.load != nil), ("model_info", table.model_info != nil), ("unload", table.unload != nil),
            ("run_create", table.run_create != nil), ("run_execute", table.run_execute != nil),
            ("run_cancel", table.run_cancel != nil), ("run_destroy", table.run_destroy != nil),
        ]
        let missing = required.filter { !$0.1 }.map(\.0)
        if !missing.isEmpty { problems.append("required \(missing.count == 1 ? "entry" : "entries") missing: \(missing.joined(separator: ", "))") }
        let optional = [("count_tokens", table.count_tokens != nil), ("embed", table.embed != nil), ("probe", table.probe != nil),
                        ("run_create_with_inputs", table.run_create_with_inputs != nil), ("shutdown", table.shutdown != nil)]
            .filter(\.1).map(\.0)
        let detail = "struct_size \(size), ABI \(major).\(minor); optional: \(optional.isEmpty ? "none" : optional.joined(separator: ", "))"
        return problems.isEmpty ? .pass("table", detail) : .fail("table", problems.joined(separator: "; "))
    }

    func selfDescription() -> ClauseResult {
        let table = library!.table
        var problems: [String] = []
        func string(_ pointer: UnsafePointer<CChar>?, _ field: String) -> String? {
            guard let pointer else {
                problems.append("\(field) is NULL")
                return nil
            }
            let bytes = Array(UnsafeRawBufferPointer(start: pointer, count: strnlen(pointer, 4096)))
            if UTF8Check(bytes).problem != nil { problems.append("\(field) is not valid UTF-8") }
            return String(decoding: bytes, as: UTF8.self)
        }
        let name = string(table.name, "name") ?? ""
        let allowed = CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if table.name != nil && (name.isEmpty || name.count > 64 || name.unicodeScalars.contains { !allowed.contains($0) }) {
            problems.append("name '\(name)' is not a short word of letters, digits, '.', '_' or '-' (what 'backend' selects)")
        }
        let version = string(table.version, "version") ?? ""
        if table.version != nil && version.isEmpty { problems.append("version is empty") }
        let description = string(table.description, "description") ?? ""
        if table.description != nil && (description.isEmpty || description.contains(where: { $0.isNewline })) {
            problems.append("description is not one line for humans")
        }
        let formats = string(table.model_formats, "model_formats") ?? ""
        let tokens = formats.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        if formats.isEmpty && table.probe == nil {
            problems.append("no model_formats and no probe: the host cannot tell which files it loads")
        } else if !formats.isEmpty, let bad = tokens.first(where: { $0.isEmpty || $0.contains(".") || $0.contains("/") || $0.contains(" ") }) {
            problems.append("model_formats '\(formats)': '\(bad)' is not a file extension without its dot")
        }
        let capabilities = table.capabilities
        let known: UInt64 = (1 << 9) - 1
        if capabilities & ~known != 0 && library!.abiMinor <= Int(PB_ABI_VERSION_MINOR) {
            problems.append(String(format: "capabilities 0x%llx has bits ABI 1.%d does not define", capabilities, library!.abiMinor))
        }
        if capabilities & UInt64(PB_CAP_TOKENIZE) != 0 && table.count_tokens == nil { problems.append("PB_CAP_TOKENIZE without count_tokens") }
        if capabilities & UInt64(PB_CAP_EMBEDDINGS) != 0 && table.embed == nil { problems.append("PB_CAP_EMBEDDINGS without embed") }
        if capabilities & UInt64(PB_CAP_TRANSCRIPTION) != 0 && table.run_create_with_inputs == nil {
            problems.append("PB_CAP_TRANSCRIPTION without run_create_with_inputs")
        }
        let serves = UInt64(PB_CAP_CHAT) | UInt64(PB_CAP_COMPLETION) | UInt64(PB_CAP_TRANSCRIPTION) | UInt64(PB_CAP_EMBEDDINGS)
        if capabilities & serves == 0 { problems.append("claims no request kind (chat, completion, transcription) and no embeddings") }
        if table.flags & ~UInt64(PB_FLAG_BATCHING) != 0 && library!.abiMinor <= Int(PB_ABI_VERSION_MINOR) {
            problems.append(String(format: "flags 0x%llx has bits ABI 1.%d does not define", table.flags, library!.abiMinor))
        }
        var notes: [String] = []
        if table.count_tokens != nil && capabilities & UInt64(PB_CAP_TOKENIZE) == 0 { notes.append("count_tokens without PB_CAP_TOKENIZE is never called") }
        if table.embed != nil && capabilities & UInt64(PB_CAP_EMBEDDINGS) == 0 { notes.append("embed without PB_CAP_EMBEDDINGS is never called") }
        let names = [(PB_CAP_CHAT, "chat"), (PB_CAP_COMPLETION, "completion"), (PB_CAP_VISION_INPUT, "vision_input"),
                     (PB_CAP_AUDIO_INPUT, "audio_input"), (PB_CAP_EMBEDDINGS, "embeddings"), (PB_CAP_TOKENIZE, "tokenize"),
                     (PB_CAP_TOOLS, "tools"), (PB_CAP_REASONING, "reasoning"), (PB_CAP_TRANSCRIPTION, "transcription")]
            .filter { capabilities & UInt64($0.0) != 0 }.map(\.1)
        let detail = "'\(name)' \(version), formats '\(formats)', capabilities \(names.joined(separator: ","))"
            + (library!.isBatching ? ", batching" : "") + (notes.isEmpty ? "" : "; note: \(notes.joined(separator: "; "))")
        return problems.isEmpty ? .pass("self-description", detail) : .fail("self-description", problems.joined(separator: "; "))
    }

    func probe() -> ClauseResult {
        let clause = "probe"
        guard let probe = context.table.probe else {
            return .na(clause, "no probe (1.0 table, or NULL): the host matches model_formats against the file extension")
        }
        var problems: [String] = []
        var answers: [String] = []
        /// One probe into a sentinel-guarded detail buffer of `size`; (score, detail).
        func ask(_ path: String, size: Int = 256) -> (Int32, String) {
            let buffer = SentinelBuffer(size: size)
            let score = context.time("probe") { probe(path, buffer.pointer, size) }
            if let problem = buffer.problem(required: false) { problems.append("detail for \(URL(fileURLWithPath: path).lastPathComponent): \(problem)") }
            if score < 0 || score > 100 { problems.append("score \(score) for \(path) is outside 0...100") }
            return (score, buffer.text)
        }
        let formats = (context.table.model_formats.map { String(cString: $0) } ?? "").split(separator: ",")
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let format = formats.first ?? "bin"
        let missing = "/nonexistent-patchbay-check/model.\(format)"
        let (missingScore, _) = ask(missing)
        if missingScore != 0 { problems.append("a file that does not exist scores \(missingScore), not 0") }
        let junk = directory + "/junk-\(group.rawValue).\(format)"
        FileManager.default.createFile(atPath: junk, contents: Data("this is not a model file\n".utf8))
        let (junkScore, junkDetail) = ask(junk)
        answers.append("junk .\(format): \(junkScore)\(junkDetail.isEmpty ? "" : " (\(junkDetail))")")
        _ = ask(junk, size: 4)
        if let model = context.workload.modelPath {
            let (score, detail) = ask(model)
            answers.insert("model: \(score)\(detail.isEmpty ? "" : " (\(detail))")", at: 0)
            if score == 0 { problems.append("scores its own model 0: the host would not pick it for the file") }
            // [any-thread]: the same answer from several threads at once.
            let scores = SharedList<Int32>()
            let threads = (0..<4).map { _ in
                CheckThread("pbcheck-probe") { [context] in
                    for _ in 0..<5 {
                        var detail = [CChar](repeating: 0, count: 256)
                        let score = context!.time("probe") { probe(model, &detail, detail.count) }
                        scores.append(score)
                    }
                }
            }
            for thread in threads where !thread.wait(seconds: context.seconds(30)) {
                context.poison("probe did not return within \(Int(context.seconds(30))) s")
                return .fail(clause, "probe from several threads at once did not return within \(Int(context.seconds(30))) s")
            }
            if Set(scores.all + [score]).count > 1 { problems.append("scores differ when asked from several threads at once: \(Set(scores.all).sorted())") }
        }
        try? FileManager.default.removeItem(atPath: junk)
        let detail = answers.joined(separator: "; ") + "; missing file: \(missingScore)"
        return .judged(clause, problems: problems, detail: detail)
    }
}

/// A buffer handed to a plugin as `error`/`detail` with its size, filled with 'X' and followed by
/// sentinel bytes, so that what the plugin wrote can be judged without a crash: NUL-terminated
/// within the size, nothing written past it.
final class SentinelBuffer {
    let size: Int
    private let memory: UnsafeMutablePointer<CChar>
    private static let slack = 64

    init(size: Int) {
        self.size = size
        memory = .allocate(capacity: size + Self.slack)
        memory.initialize(repeating: 0x58, count: size)  // 'X'
        (memory + size).initialize(repeating: CChar(bitPattern: 0xA5), count: Self.slack)
    }

    deinit { memory.deallocate() }

    var pointer: UnsafeMutablePointer<CChar> { memory }

    /// What is wrong with what the plugin wrote; `required`: it had to write a message.
    func problem(required: Bool) -> String? {
        if (0..<Self.slack).contains(where: { memory[size + $0] != CChar(bitPattern: 0xA5) }) {
            return "written past its size (\(size) bytes)"
        }
        let touched = (0..<size).contains { memory[$0] != 0x58 }
        if !touched { return required ? "left untouched: no message" : nil }
        guard let end = (0..<size).first(where: { memory[$0] == 0 }) else { return "not NUL-terminated within its \(size) bytes" }
        if required && end == 0 && size > 1 { return "an empty message" }
        return nil
    }

    /// The text up to the first NUL (or the whole buffer).
    var text: String {
        let bytes = UnsafeRawBufferPointer(start: memory, count: size)
        let end = bytes.firstIndex(of: 0) ?? size
        if !(0..<size).contains(where: { memory[$0] != 0x58 }) { return "" }
        return String(decoding: bytes[0..<end], as: UTF8.self)
    }
}

/// A list several threads append to.
final class SharedList<T: Sendable>: Sendable {
    private let items = Mutex<[T]>([])
    func append(_ item: T) { items.withLock { $0.append(item) } }
    var all: [T] { items.withLock { $0 } }
}

/// A value handed between threads under a lock (plugin handles are not Sendable to Swift).
final class Box<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}
