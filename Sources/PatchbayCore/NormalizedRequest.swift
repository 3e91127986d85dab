import Foundation

/// The one request shape every plugin receives, whatever dialect the client spoke.
/// Its JSON form is documented in patchbay.h.
public struct NormalizedRequest: Sendable {
    public enum Kind: String, Sendable { case chat, completion, transcription }

    public var kind: Kind
    public var messages: [JSONValue] = []
    public var prompt: String?
    /// At most `maxTokensLimit`, whatever the client asked for.
    public var maxTokens: Int
    public var maxWallMilliseconds: Int
    public var sampling = Sampling()
    public var stop: [String] = []
    public var tools: [JSONValue]?
    public var toolChoice: JSONValue?
    public var parallelToolCalls: Bool?
    public var responseFormat: JSONValue?
    public var chatTemplateKwargs: JSONValue?
    /// Bytes handed to the plugin beside the JSON (ABI 1.1), referred to by name.
    public var inputs: [ByteInput] = []
    /// Kind "transcription": the name of the input holding the audio, and the language (nil = detect).
    public var audioInput: String?
    public var language: String?
    /// The HTTP request's id (`x-request-id`), for the plugin's log lines about this run.
    public var requestID: String?

    /// Plugins read `max_tokens` into a C `int`, so a client's `Int.max` ("no limit") must not overflow it.
    public static let maxTokensLimit = Int(Int32.max)

    public init(kind: Kind, maxTokens: Int, maxWallMilliseconds: Int) {
        self.kind = kind
        self.maxTokens = min(maxTokens, Self.maxTokensLimit)
        self.maxWallMilliseconds = maxWallMilliseconds
    }

    public var json: JSONValue {
        var members: [(key: String, value: JSONValue)] = [("kind", .string(kind.rawValue))]
        switch kind {
        case .chat: members.append(("messages", .array(messages)))
        case .completion: members.append(("prompt", .string(prompt ?? "")))
        case .transcription:
            members.append(("audio", .object([("input", .string(audioInput ?? ""))])))
            if let language { members.append(("language", .string(language))) }
            if let prompt { members.append(("prompt", .string(prompt))) }
        }
        if let requestID { members.append(("request_id", .string(requestID))) }
        members.append(("max_tokens", .int(Int64(maxTokens))))
        members.append(("max_wall_ms", .int(Int64(maxWallMilliseconds))))
        members += sampling.members
        if !stop.isEmpty { members.append(("stop", .array(stop.map(JSONValue.string)))) }
        if let tools { members.append(("tools", .array(tools))) }
        if let toolChoice { members.append(("tool_choice", toolChoice)) }
        if let parallelToolCalls { members.append(("parallel_tool_calls", .bool(parallelToolCalls))) }
        if let responseFormat { members.append(("response_format", responseFormat)) }
        if let chatTemplateKwargs { members.append(("chat_template_kwargs", chatTemplateKwargs)) }
        return .object(members)
    }

    /// Whether any message carries an `input_audio` part.
    public var hasAudio: Bool {
        messages.contains { message in message["content"]?.arrayValue?.contains { $0["type"]?.stringValue == "input_audio" } ?? false }
    }

    /// Whether any message carries an image part.
    public var hasImage: Bool {
        messages.contains { message in
            message["content"]?.arrayValue?.contains { ["image_url", "image"].contains($0["type"]?.stringValue) } ?? false
        }
    }

    /// Turns every image given as a base64 `data:` URL into a byte input, and its part into
    /// `{"type":"image","image":{"input":NAME}}`, for a plugin that takes byte inputs (so no
    /// base64 crosses the plugin ABI). Other URLs are left as they are. A malformed data URL is a 400.
    public mutating func moveImagesToByteInputs() throws(APIError) {
        for (messageIndex, message) in messages.enumerated() {
            guard case .object(var members) = message,
                  let contentIndex = members.firstIndex(where: { $0.key == "content" }),
                  case .array(var parts) = members[contentIndex].value else { continue }
            var changed = false
            for (partIndex, part) in parts.enumerated() {
                guard part["type"]?.stringValue == "image_url", let url = part["image_url"]?["url"]?.stringValue,
                      url.hasPrefix("data:") else { continue }
                let param = "messages[\(messageIndex)].content[\(partIndex)].image_url.url"
                guard let comma = url.firstIndex(of: ","), url[..<comma].hasSuffix(";base64"),
                      let bytes = Data(base64Encoded: String(url[url.index(after: comma)...]), options: .ignoreUnknownCharacters)
                else {
                    throw .invalidRequest("The image is not a valid base64 data URL (data:<type>;base64,<data>).", param: param,
                                          code: "invalid_image")
                }
                let mediaType = String(url[url.index(url.startIndex, offsetBy: 5)..<comma].dropLast(";base64".count))
                let name = "image-\(inputs.count)"
                inputs.append(ByteInput(name: name, mediaType: mediaType, bytes: [UInt8](bytes)))
                parts[partIndex] = .object([("type", .string("image")), ("image", .object([("input", .string(name))]))])
                changed = true
            }
            if changed {
                members[contentIndex].value = .array(parts)
                messages[messageIndex] = .object(members)
            }
        }
    }
}

/// Sampling settings; nil means "the engine's default".
public struct Sampling: Sendable {
    public var temperature: Double?
    public var topP: Double?
    public var topK: Int?
    public var minP: Double?
    public var repetitionPenalty: Double?
    public var presencePenalty: Double?
    public var frequencyPenalty: Double?
    public var seed: Int64?

    public init(temperature: Double? = nil, topP: Double? = nil, topK: Int? = nil, minP: Double? = nil,
                repetitionPenalty: Double? = nil, presencePenalty: Double? = nil,
                frequencyPenalty: Double? = nil, seed: Int64? = nil) {
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.minP = minP
        self.repetitionPenalty = repetitionPenalty
        self.presencePenalty = presencePenalty
        self.frequencyPenalty = frequencyPenalty
        self.seed = seed
    }

    /// The ranges every dialect accepts (the reference's); a failure names its field.
    public func validate() throws(APIError) {
        try checkRange(temperature, 0...2, "temperature")
        try checkRange(topP, 0...1, "top_p")
        try checkRange(topK, -1...100, "top_k")
        try checkRange(minP, 0...1, "min_p")
        try checkRange(repetitionPenalty, 1...2, "repetition_penalty")
        try checkRange(presencePenalty, -2...2, "presence_penalty")
        try checkRange(frequencyPenalty, -2...2, "frequency_penalty")
    }

    var members: [(key: String, value: JSONValue)] {
        var members: [(key: String, value: JSONValue)] = []
        if let temperature { members.append(("temperature", .double(temperature))) }
        if let topP { members.append(("top_p", .double(topP))) }
        if let topK { members.append(("top_k", .int(Int64(topK)))) }
        if let minP { members.append(("min_p", .double(minP))) }
        if let repetitionPenalty { members.append(("repetition_penalty", .double(repetitionPenalty))) }
        if let presencePenalty { members.append(("presence_penalty", .double(presencePenalty))) }
        if let frequencyPenalty { members.append(("frequency_penalty", .double(frequencyPenalty))) }
        if let seed { members.append(("seed", .int(seed))) }
        return members
    }
}

/// A named buffer handed to a run beside its JSON request (audio, an image); the JSON
/// refers to it as `{"input": name}`. Bytes never cross the plugin ABI as base64.
public struct ByteInput: Sendable, Equatable {
    public var name: String
    /// MIME type, e.g. `audio/wav`; empty when unknown.
    public var mediaType: String
    public var bytes: [UInt8]

    public init(name: String, mediaType: String, bytes: [UInt8]) {
        self.name = name
        self.mediaType = mediaType
        self.bytes = bytes
    }
}
