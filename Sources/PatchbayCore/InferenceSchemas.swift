/// `POST /api/inference/load`: the reference's `LoadRequest` fields that apply to
/// plugin backends, plus `backend` (a plugin name) and `alias` (the id clients use).
/// The whole body is also handed to the plugin, which reads what it understands.
public struct LoadModelRequest: Decodable, Sendable {
    public var modelPath: String
    public var backend: String?
    public var alias: String?
    public var maxSeqLength: Int?
    public var chatTemplateOverride: String?
    public var cacheTypeKV: String?
    public var ggufVariant: String?
    public var forceReload: Bool?
    /// How long the model may sit idle before it is unloaded (Ollama's `keep_alive`).
    public var keepAlive: KeepAlive?

    enum CodingKeys: String, CodingKey {
        case backend, alias
        case keepAlive = "keep_alive"
        case modelPath = "model_path"
        case maxSeqLength = "max_seq_length"
        case chatTemplateOverride = "chat_template_override"
        case cacheTypeKV = "cache_type_kv"
        case ggufVariant = "gguf_variant"
        case forceReload = "force_reload"
    }

    public init(modelPath: String) {
        self.modelPath = modelPath
    }

    public static let kvCacheTypes = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]

    public func validate() throws(APIError) {
        if modelPath.isEmpty {
            throw .invalidRequest("'model_path' must not be empty.", param: "model_path", code: "invalid_value")
        }
        try checkRange(maxSeqLength, 0...1_048_576, "max_seq_length")
        if let cacheTypeKV, !Self.kvCacheTypes.contains(cacheTypeKV) {
            throw .invalidRequest("Invalid value for 'cache_type_kv': expected one of \(Self.kvCacheTypes.joined(separator: ", ")).",
                                  param: "cache_type_kv", code: "invalid_value")
        }
        // The id clients type and every listing shows: printable and of a sensible length.
        if let alias, alias.isEmpty || alias.count > 256 || alias.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) {
            throw .invalidRequest("'alias' must be 1 to 256 printable characters.", param: "alias", code: "invalid_value")
        }
    }
}

/// How long a model may sit idle (no run, none waiting) before it is unloaded, as Ollama's
/// `keep_alive`: seconds as a number, or a string with a unit ("30s", "5m", "1h", "250ms");
/// a negative value keeps it loaded until unloaded by hand; 0 unloads it as soon as it is idle.
public struct KeepAlive: Decodable, Sendable, Equatable {
    /// nil: forever.
    public var idleLimit: Duration?

    public init(idleLimit: Duration?) {
        self.idleLimit = idleLimit
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let seconds = try? container.decode(Double.self) {
            self.init(seconds: seconds)
        } else if let text = try? container.decode(String.self), let parsed = Self(parsing: text) {
            self = parsed
        } else {
            throw DecodingError.dataCorruptedError(
                in: container, debugDescription: "keep_alive must be seconds (a number; -1 keeps the model loaded) or a duration such as \"30s\", \"5m\", \"1h\"")
        }
    }

    init(seconds: Double) {
        idleLimit = seconds < 0 ? nil : .milliseconds(Int64((min(seconds, 1e9) * 1000).rounded()))
    }

    /// "-1", "300", "30s", "5m", "1h", "250ms".
    public init?(parsing text: String) {
        let text = text.trimmingCharacters(in: .whitespaces).lowercased()
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let value = Double(text.dropLast(suffix.count)), value.isFinite else { return nil }
            self.init(seconds: value * scale)
            return
        }
        guard let value = Double(text), value.isFinite else { return nil }
        self.init(seconds: value)
    }
}

/// `POST /api/inference/unload` and `POST /api/inference/validate`.
public struct ModelReferenceRequest: Decodable, Sendable {
    public var modelPath: String
    public var backend: String?
    public var forceCancelActive: Bool?

    enum CodingKeys: String, CodingKey {
        case backend
        case modelPath = "model_path"
        case forceCancelActive = "force_cancel_active"
    }
}

/// `POST /api/plugins/load`.
public struct PluginLoadRequest: Decodable, Sendable {
    public var path: String
}
