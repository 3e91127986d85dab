/// The one request shape every plugin receives, whatever dialect the client spoke.
/// Its JSON form is documented in patchbay.h.
public struct NormalizedRequest: Sendable {
    public enum Kind: String, Sendable { case chat, completion }

    public var kind: Kind
    public var messages: [JSONValue] = []
    public var prompt: String?
    public var maxTokens: Int
    public var maxWallMilliseconds: Int
    public var sampling = Sampling()
    public var stop: [String] = []
    public var tools: [JSONValue]?
    public var toolChoice: JSONValue?
    public var parallelToolCalls: Bool?
    public var responseFormat: JSONValue?
    public var chatTemplateKwargs: JSONValue?

    public init(kind: Kind, maxTokens: Int, maxWallMilliseconds: Int) {
        self.kind = kind
        self.maxTokens = maxTokens
        self.maxWallMilliseconds = maxWallMilliseconds
    }

    public var json: JSONValue {
        var members: [(key: String, value: JSONValue)] = [("kind", .string(kind.rawValue))]
        switch kind {
        case .chat: members.append(("messages", .array(messages)))
        case .completion: members.append(("prompt", .string(prompt ?? "")))
        }
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

    /// Whether any message carries an image part.
    public var hasImage: Bool {
        messages.contains { message in
            message["content"]?.arrayValue?.contains { $0["type"]?.stringValue == "image_url" } ?? false
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
