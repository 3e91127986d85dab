import Foundation

/// `POST /v1/chat/completions`, as OpenAI defines it plus the sampling, reasoning and cancel
/// fields local servers add (llama-server's `top_k`, `min_p`, ...; `session_id`, `cancel_id`).
/// Unknown fields are accepted and ignored.
public struct ChatCompletionRequest: Decodable, Sendable {
    public var model: String?
    public var messages: [ChatMessage]
    public var stream: Bool?
    public var streamOptions: StreamOptions?
    public var maxTokens: Int?
    public var maxCompletionTokens: Int?
    public var temperature: Double?
    public var topP: Double?
    public var presencePenalty: Double?
    public var frequencyPenalty: Double?
    public var seed: Int64?
    public var stop: StopSequences?
    public var n: Int?
    public var logprobs: Bool?
    public var tools: [JSONValue]?
    public var toolChoice: JSONValue?
    public var parallelToolCalls: Bool?
    public var responseFormat: JSONValue?
    public var chatTemplateKwargs: JSONValue?
    // Beyond OpenAI: llama.cpp-style sampling, reasoning switches, cancel keys.
    public var topK: Int?
    public var minP: Double?
    public var repetitionPenalty: Double?
    public var enableThinking: Bool?
    public var reasoningEffort: String?
    public var preserveThinking: Bool?
    public var sessionID: String?
    public var cancelID: String?
    /// llama-server's extension: stream prompt processing progress as `prompt_progress` chunks.
    public var returnProgress: Bool?

    public struct StreamOptions: Decodable, Sendable {
        public var includeUsage: Bool?
        enum CodingKeys: String, CodingKey { case includeUsage = "include_usage" }
    }

    enum CodingKeys: String, CodingKey {
        case model, messages, stream, temperature, seed, stop, n, logprobs, tools
        case streamOptions = "stream_options"
        case maxTokens = "max_tokens"
        case maxCompletionTokens = "max_completion_tokens"
        case topP = "top_p"
        case presencePenalty = "presence_penalty"
        case frequencyPenalty = "frequency_penalty"
        case toolChoice = "tool_choice"
        case parallelToolCalls = "parallel_tool_calls"
        case responseFormat = "response_format"
        case chatTemplateKwargs = "chat_template_kwargs"
        case topK = "top_k"
        case minP = "min_p"
        case repetitionPenalty = "repetition_penalty"
        case enableThinking = "enable_thinking"
        case reasoningEffort = "reasoning_effort"
        case preserveThinking = "preserve_thinking"
        case sessionID = "session_id"
        case cancelID = "cancel_id"
        case returnProgress = "return_progress"
    }

    public var isStreaming: Bool { stream ?? false }

    /// The token cap the client asked for (`max_completion_tokens` wins, as in OpenAI).
    public var requestedMaxTokens: Int? { maxCompletionTokens ?? maxTokens }

    var sampling: Sampling {
        Sampling(temperature: temperature, topP: topP, topK: topK, minP: minP, repetitionPenalty: repetitionPenalty,
                 presencePenalty: presencePenalty, frequencyPenalty: frequencyPenalty, seed: seed)
    }

    /// Range and shape checks beyond what the types enforce. Each failure names its field.
    public func validate() throws(APIError) {
        if messages.isEmpty {
            throw .invalidRequest("'messages' must contain at least one message.", param: "messages", code: "invalid_value")
        }
        for (index, message) in messages.enumerated() {
            try message.validate(param: "messages[\(index)]")
        }
        if !messages.contains(where: { $0.role != .system }) {
            throw .invalidRequest("'messages' must contain at least one non-system message.", param: "messages", code: "invalid_value")
        }
        try sampling.validate()
        try checkRange(maxTokens, 1...Int.max, "max_tokens")
        try checkRange(maxCompletionTokens, 1...Int.max, "max_completion_tokens")
        try checkRange(n, 1...1, "n")
        if logprobs == true {
            throw .invalidRequest("'logprobs' is not supported.", param: "logprobs", code: "unsupported_parameter")
        }
        if let reasoningEffort, !["none", "minimal", "low", "medium", "high"].contains(reasoningEffort) {
            throw .invalidRequest("Invalid value for 'reasoning_effort': expected one of none, minimal, low, medium, high.",
                                  param: "reasoning_effort", code: "invalid_value")
        }
        if let tools {
            for (index, tool) in tools.enumerated() {
                guard tool.isObject, tool["function"]?["name"]?.stringValue?.isEmpty == false else {
                    throw .invalidRequest("Each tool needs a 'function' with a non-empty 'name'.",
                                          param: "tools[\(index)]", code: "invalid_value")
                }
            }
        }
        if let toolChoice {
            switch toolChoice {
            case .string(let choice) where ["none", "auto", "required"].contains(choice): break
            case .object where toolChoice["function"]?["name"]?.stringValue?.isEmpty == false: break
            default:
                throw .invalidRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":…}}.",
                                      param: "tool_choice", code: "invalid_value")
            }
        }
        if let responseFormat, !responseFormat.isObject {
            throw .invalidRequest("'response_format' must be an object.", param: "response_format", code: "invalid_type")
        }
    }

    /// The normalized request a plugin receives (see patchbay.h).
    public func normalized(maxTokens defaultMaxTokens: Int, maxWallMilliseconds: Int) -> NormalizedRequest {
        var kwargs: [(key: String, value: JSONValue)] = []
        if case .object(let members)? = chatTemplateKwargs { kwargs = members }
        func setKwarg(_ key: String, _ value: JSONValue?) {
            guard let value else { return }
            kwargs.removeAll { $0.key == key }
            kwargs.append((key, value))
        }
        setKwarg("enable_thinking", enableThinking.map(JSONValue.bool))
        setKwarg("reasoning_effort", reasoningEffort.map(JSONValue.string))
        setKwarg("preserve_thinking", preserveThinking.map(JSONValue.bool))

        var request = NormalizedRequest(kind: .chat, maxTokens: requestedMaxTokens ?? defaultMaxTokens,
                                        maxWallMilliseconds: maxWallMilliseconds)
        request.messages = messages.map(\.normalized)
        request.sampling = sampling
        request.stop = stop?.values ?? []
        request.tools = tools
        request.toolChoice = toolChoice
        request.parallelToolCalls = parallelToolCalls
        request.responseFormat = responseFormat
        request.chatTemplateKwargs = kwargs.isEmpty ? nil : .object(kwargs)
        return request
    }
}

/// A string, or a list of strings: `stop`, a completion's `prompt`, the `input` of embeddings.
public struct StringList: Decodable, Sendable {
    public var values: [String]

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let single = try? container.decode(String.self) {
            values = [single]
        } else {
            values = try container.decode([String].self)
        }
    }
}

/// `stop`: a string or a list of at most 16 strings.
public struct StopSequences: Decodable, Sendable {
    public var values: [String]

    public init(from decoder: any Decoder) throws {
        values = try StringList(from: decoder).values
        if values.count > 16 {
            let container = try decoder.singleValueContainer()
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "at most 16 stop sequences are allowed")
        }
    }
}
