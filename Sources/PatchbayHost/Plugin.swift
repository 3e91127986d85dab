import CPatchbayABI
import Foundation
import Logging
import Synchronization

/// A backend plugin that was opened and accepted: its function table and self-description.
///
/// Plugins are never `dlclose`d: a library that contains Swift code cannot be unloaded
/// safely, and "unload" in Patchbay means a plugin releases its models, not its code.
public final class Plugin: Sendable {
    public let path: String
    public let name: String
    public let version: String
    public let summary: String
    public let abiVersion: String
    /// File extensions (without the dot) this plugin claims, e.g. `["gguf"]`.
    public let modelFormats: [String]
    public let capabilities: Capabilities
    /// Runs share engine threads (`PB_FLAG_BATCHING`): delivering an event must never block.
    public let isBatching: Bool
    /// The plugin's table as this host reads it: the plugin's declared prefix, the rest zero.
    nonisolated(unsafe) let table: pb_plugin_api
    private let shutDown = Atomic<Bool>(false)

    init(path: String, table: pb_plugin_api) {
        self.path = path
        self.table = table
        name = String(cString: table.name)
        version = table.version.map { String(cString: $0) } ?? "unknown"
        summary = table.description.map { String(cString: $0) } ?? ""
        abiVersion = "\(table.abi_major).\(table.abi_minor)"
        isBatching = table.flags & UInt64(PB_FLAG_BATCHING) != 0
        modelFormats = (table.model_formats.map { String(cString: $0) } ?? "")
            .split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }.filter { !$0.isEmpty }
        var capabilities = Capabilities(rawValue: table.capabilities)
        // An optional capability counts only when its function is really there.
        if table.count_tokens == nil { capabilities.remove(.tokenize) }
        if table.embed == nil { capabilities.remove(.embeddings) }
        if table.run_create_with_inputs == nil { capabilities.remove(.transcription) }
        self.capabilities = capabilities
    }

    /// Whether runs may carry byte inputs (`run_create_with_inputs`).
    public var acceptsByteInputs: Bool { table.run_create_with_inputs != nil }

    /// How well this plugin can load `modelPath`: 0 (cannot) to 100, with the plugin's
    /// one-line explanation. A plugin without `probe` claims its formats by file
    /// extension (50), as in ABI 1.0.
    public func probe(modelPath: String) -> (score: Int, detail: String) {
        guard let probe = table.probe else {
            let claimed = modelFormats.contains(URL(fileURLWithPath: modelPath).pathExtension.lowercased())
            return claimed ? (50, "claims the file extension") : (0, "does not claim the file extension")
        }
        var detail = [CChar](repeating: 0, count: 256)
        let score = probe(modelPath, &detail, detail.count)
        detail[detail.count - 1] = 0  // a plugin that filled the buffer without a NUL still gets cut
        return (Int(max(0, min(100, score))), cMessage(detail) ?? "")
    }

    /// The plugin's `shutdown`, once, after every model is unloaded.
    func shutdown() {
        guard !shutDown.exchange(true, ordering: .relaxed), let shutdown = table.shutdown else { return }
        shutdown()
    }
}

/// The PB_CAP_* bits.
public struct Capabilities: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let chat = Capabilities(rawValue: UInt64(PB_CAP_CHAT))
    public static let completion = Capabilities(rawValue: UInt64(PB_CAP_COMPLETION))
    public static let visionInput = Capabilities(rawValue: UInt64(PB_CAP_VISION_INPUT))
    public static let audioInput = Capabilities(rawValue: UInt64(PB_CAP_AUDIO_INPUT))
    public static let embeddings = Capabilities(rawValue: UInt64(PB_CAP_EMBEDDINGS))
    public static let tokenize = Capabilities(rawValue: UInt64(PB_CAP_TOKENIZE))
    public static let tools = Capabilities(rawValue: UInt64(PB_CAP_TOOLS))
    public static let reasoning = Capabilities(rawValue: UInt64(PB_CAP_REASONING))
    public static let transcription = Capabilities(rawValue: UInt64(PB_CAP_TRANSCRIPTION))

    static let named: [(String, Capabilities)] = [
        ("chat", .chat), ("completion", .completion), ("vision_input", .visionInput), ("audio_input", .audioInput),
        ("embeddings", .embeddings), ("tokenize", .tokenize), ("tools", .tools), ("reasoning", .reasoning),
        ("transcription", .transcription),
    ]

    /// The capability names, e.g. `["chat", "tools"]`.
    public var names: [String] { Self.named.filter { contains($0.1) }.map(\.0) }
}

/// Why a library was refused as a plugin. The message names the file and, where
/// it applies, both ABI versions.
public struct PluginLoadError: Error, Sendable, CustomStringConvertible {
    public var path: String
    public var reason: String
    public var description: String { "\(path): \(reason)" }
}

enum PluginLoader {
    /// The smallest table a 1.x plugin can have: every function of ABI 1.0.
    static let minimumTableSize = ABIStructs.pluginTableSize1_0

    /// Opens `path` and negotiates the ABI. Never crashes on a bad library.
    static func open(path: String, logger: Logger) throws(PluginLoadError) -> Plugin {
        guard FileManager.default.fileExists(atPath: path) else {
            throw PluginLoadError(path: path, reason: "no such file")
        }
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let message = dlerror().map { String(cString: $0) } ?? "unknown error"
            throw PluginLoadError(path: path, reason: "cannot open the library: \(message)")
        }
        guard let symbol = dlsym(handle, PB_PLUGIN_ENTRY_SYMBOL) else {
            throw PluginLoadError(path: path, reason: "not a Patchbay plugin: it does not export '\(PB_PLUGIN_ENTRY_SYMBOL)'")
        }
        let entry = unsafeBitCast(symbol, to: pb_plugin_entry_fn.self)
        let host = makeHostTable(logger: logger, path: path)
        guard let api = entry(host) else {
            throw PluginLoadError(
                path: path,
                reason: "the plugin declined this host (host ABI \(PB_ABI_VERSION_MAJOR).\(PB_ABI_VERSION_MINOR)); see its log lines")
        }
        // struct_size, abi_major and abi_minor never move, so they are safe to read first.
        let header = UnsafeRawPointer(api)
        let size = header.load(as: UInt32.self)
        let major = header.load(fromByteOffset: 4, as: UInt16.self)
        let minor = header.load(fromByteOffset: 6, as: UInt16.self)
        guard major == PB_ABI_VERSION_MAJOR else {
            throw PluginLoadError(
                path: path,
                reason: "built for plugin ABI \(major).\(minor), but this host speaks ABI \(PB_ABI_VERSION_MAJOR).\(PB_ABI_VERSION_MINOR) (majors must match)")
        }
        guard Int(size) >= minimumTableSize else {
            throw PluginLoadError(
                path: path, reason: "its function table is \(size) bytes, smaller than ABI \(major).0 requires (\(minimumTableSize))")
        }
        let table = ABIStructs.read(pb_plugin_api.self, at: api)
        guard table.name != nil, table.load != nil, table.model_info != nil, table.unload != nil,
              table.run_create != nil, table.run_execute != nil, table.run_cancel != nil, table.run_destroy != nil
        else {
            throw PluginLoadError(path: path, reason: "its function table lacks a name or a required function")
        }
        return Plugin(path: path, table: table)
    }

    /// One host table per plugin, alive for the rest of the process, so that log lines carry the plugin's file.
    private static func makeHostTable(logger: Logger, path: String) -> UnsafePointer<pb_host_api> {
        var pluginLogger = logger
        pluginLogger[metadataKey: "plugin"] = .string(URL(fileURLWithPath: path).lastPathComponent)
        let context = Unmanaged.passRetained(LoggerBox(pluginLogger)).toOpaque()
        let table = UnsafeMutablePointer<pb_host_api>.allocate(capacity: 1)
        table.initialize(to: pb_host_api(
            struct_size: UInt32(MemoryLayout<pb_host_api>.size),
            abi_major: UInt16(PB_ABI_VERSION_MAJOR),
            abi_minor: UInt16(PB_ABI_VERSION_MINOR),
            context: context,
            log: { context, level, message in
                guard let context, let message else { return }
                let logger = Unmanaged<LoggerBox>.fromOpaque(context).takeUnretainedValue().logger
                let text = Logger.Message(stringLiteral: String(cString: message))
                switch level {
                case Int32(PB_LOG_DEBUG): logger.debug(text)
                case Int32(PB_LOG_INFO): logger.info(text)
                case Int32(PB_LOG_WARNING): logger.warning(text)
                default: logger.error(text)
                }
            }))
        return UnsafePointer(table)
    }
}

private final class LoggerBox: Sendable {
    let logger: Logger
    init(_ logger: Logger) { self.logger = logger }
}
