import Foundation

/// `POST /v1/messages`: Anthropic's Messages request, plus the reference's extensions.
/// Content blocks are read from JSON and translated into the normalized (OpenAI-shaped)
/// request; anything a client gets wrong is a 400 naming the field.
public struct AnthropicMessagesRequest: Decodable, Sendable {
    public var model: String?
    public var maxTokens: Int
    public var messages: [AnthropicMessage]
    public var system: JSONValue?
    public var tools: [AnthropicTool]?
    public var toolChoice: JSONValue?
    public var stopSequences: [String]?
    public var stream: Bool?
    public var temperature: Double?
    public var topP: Double?
    public var topK: Int?
    public var metadata: JSONValue?
    public var thinking: JSONValue?
    // Extensions (as in the system we replace).
    public var minP: Double?
    public var repetitionPenalty: Double?
    public var presencePenalty: Double?
    public var enableThinking: Bool?
    public var reasoningEffort: String?
    public var preserveThinking: Bool?
    public var sessionID: String?
    public var cancelID: String?

    enum CodingKeys: String, CodingKey {
        case model, messages, system, tools, stream, temperature, metadata, thinking
        case maxTokens = "max_tokens"
        case toolChoice = "tool_choice"
        case stopSequences = "stop_sequences"
        case topP = "top_p"
        case topK = "top_k"
        case minP = "min_p"
        case repetitionPenalty = "repetition_penalty"
        case presencePenalty = "presence_penalty"
        case enableThinking = "enable_thinking"
        case reasoningEffort = "reasoning_effort"
        case preserveThinking = "preserve_thinking"
        case sessionID = "session_id"
        case cancelID = "cancel_id"
    }

    public var isStreaming: Bool { stream ?? false }

    public func validate() throws(APIError) {
        if maxTokens < 1 {
            throw .invalidRequest("max_tokens: must be at least 1", param: "max_tokens", code: "invalid_value")
        }
        if messages.isEmpty {
            throw .invalidRequest("messages: at least one message is required", param: "messages", code: "invalid_value")
        }
        try sampling.validate()
        for tool in tools ?? [] where tool.name.isEmpty {
            throw .invalidRequest("tools: every tool needs a name", param: "tools", code: "invalid_value")
        }
    }

    var sampling: Sampling {
        Sampling(temperature: temperature, topP: topP, topK: topK, minP: minP,
                 repetitionPenalty: repetitionPenalty, presencePenalty: presencePenalty)
    }

    /// Whether thinking was asked for: `enable_thinking` > `reasoning_effort` > `thinking`.
    var wantsThinking: Bool? {
        if let enableThinking { return enableThinking }
        if let reasoningEffort { return reasoningEffort != "none" }
        if let type = thinking?["type"]?.stringValue { return type != "disabled" }
        return nil
    }

    public func normalized(maxWallMilliseconds: Int) throws(APIError) -> NormalizedRequest {
        var request = NormalizedRequest(kind: .chat, maxTokens: maxTokens, maxWallMilliseconds: maxWallMilliseconds)
        try Self.addConversation(system: system, messages: messages, tools: tools, to: &request)
        request.sampling = sampling
        request.stop = stopSequences ?? []
        request.toolChoice = try Self.openAIToolChoice(toolChoice)
        if toolChoice?["disable_parallel_tool_use"] == .bool(true) { request.parallelToolCalls = false }
        var kwargs: [(key: String, value: JSONValue)] = []
        if let wantsThinking { kwargs.append(("enable_thinking", .bool(wantsThinking))) }
        if let reasoningEffort { kwargs.append(("reasoning_effort", .string(reasoningEffort))) }
        if let preserveThinking { kwargs.append(("preserve_thinking", .bool(preserveThinking))) }
        request.chatTemplateKwargs = kwargs.isEmpty ? nil : .object(kwargs)
        return request
    }

    /// The system prompt, the messages and the tools, as the normalized (OpenAI) chat shape.
    static func addConversation(system: JSONValue?, messages: [AnthropicMessage], tools: [AnthropicTool]?,
                                to request: inout NormalizedRequest) throws(APIError) {
        if let systemText = try systemText(system) {
            request.messages.append(.object([("role", .string("system")), ("content", .string(systemText))]))
        }
        for (index, message) in messages.enumerated() {
            request.messages += try message.openAIMessages(at: index)
        }
        if let tools, !tools.isEmpty { request.tools = tools.map(\.openAITool) }
    }

    static func systemText(_ system: JSONValue?) throws(APIError) -> String? {
        switch system {
        case nil, .null?: return nil
        case .string(let text)?: return text
        case .array(let blocks)?:
            var parts: [String] = []
            for block in blocks {
                guard block["type"]?.stringValue == "text", let text = block["text"]?.stringValue else {
                    throw .invalidRequest("system: only text blocks are allowed", param: "system", code: "invalid_value")
                }
                parts.append(text)
            }
            return parts.joined(separator: "\n")
        default:
            throw .invalidRequest("system: must be a string or a list of text blocks", param: "system", code: "invalid_type")
        }
    }

    static func openAIToolChoice(_ choice: JSONValue?) throws(APIError) -> JSONValue? {
        guard let choice, choice != .null else { return nil }
        switch choice["type"]?.stringValue {
        case "auto": return .string("auto")
        case "any": return .string("required")
        case "none": return .string("none")
        case "tool":
            guard let name = choice["name"]?.stringValue else {
                throw .invalidRequest("tool_choice: a choice of type 'tool' needs a name", param: "tool_choice", code: "invalid_value")
            }
            return .object([("type", .string("function")), ("function", .object([("name", .string(name))]))])
        default:
            throw .invalidRequest("tool_choice: type must be one of auto, any, none, tool", param: "tool_choice", code: "invalid_value")
        }
    }
}

public struct AnthropicTool: Decodable, Sendable {
    public var name: String
    public var description: String?
    public var inputSchema: JSONValue?

    enum CodingKeys: String, CodingKey {
        case name, description
        case inputSchema = "input_schema"
    }

    /// The nested OpenAI function tool.
    var openAITool: JSONValue {
        var function: [(key: String, value: JSONValue)] = [("name", .string(name))]
        if let description { function.append(("description", .string(description))) }
        function.append(("parameters", inputSchema ?? .object([("type", .string("object")), ("properties", .object([]))])))
        return .object([("type", .string("function")), ("function", .object(function))])
    }
}

public struct AnthropicMessage: Decodable, Sendable {
    public var role: String
    public var content: JSONValue

    /// One Anthropic message as OpenAI messages: `tool_result` blocks become `tool` messages,
    /// `tool_use` blocks become `tool_calls`, thinking becomes `reasoning_content`.
    func openAIMessages(at index: Int) throws(APIError) -> [JSONValue] {
        let param = "messages[\(index)]"
        guard role == "user" || role == "assistant" else {
            throw .invalidRequest("\(param).role: must be 'user' or 'assistant', not '\(role)'", param: "\(param).role", code: "invalid_value")
        }
        let blocks: [JSONValue]
        switch content {
        case .string(let text): blocks = [.object([("type", .string("text")), ("text", .string(text))])]
        case .array(let items): blocks = items
        case .null where role == "assistant": blocks = []
        default:
            throw .invalidRequest("\(param).content: must be a string or a list of content blocks", param: "\(param).content", code: "invalid_type")
        }
        var parts: [JSONValue] = []
        var toolCalls: [JSONValue] = []
        var toolResults: [JSONValue] = []
        var thinking = ""
        for (blockIndex, block) in blocks.enumerated() {
            let where_ = "\(param).content[\(blockIndex)]"
            switch block["type"]?.stringValue {
            case "text":
                guard let text = block["text"]?.stringValue else {
                    throw .invalidRequest("\(where_).text: required", param: "\(where_).text", code: "missing_required_parameter")
                }
                parts.append(.object([("type", .string("text")), ("text", .string(text))]))
            case "image" where role == "user":
                parts.append(try Self.imagePart(block["source"], at: where_))
            case "tool_use" where role == "assistant":
                guard let id = block["id"]?.stringValue, let name = block["name"]?.stringValue else {
                    throw .invalidRequest("\(where_): tool_use needs an id and a name", param: where_, code: "invalid_value")
                }
                let arguments = (block["input"] ?? .object([])).jsonString
                toolCalls.append(.object([
                    ("id", .string(id)), ("type", .string("function")),
                    ("function", .object([("name", .string(name)), ("arguments", .string(arguments))])),
                ]))
            case "tool_result" where role == "user":
                guard let id = block["tool_use_id"]?.stringValue else {
                    throw .invalidRequest("\(where_).tool_use_id: required", param: "\(where_).tool_use_id", code: "missing_required_parameter")
                }
                toolResults.append(.object([
                    ("role", .string("tool")), ("tool_call_id", .string(id)),
                    ("content", .string(Self.resultText(block["content"]))),
                ]))
            case "thinking" where role == "assistant":
                thinking += block["thinking"]?.stringValue ?? ""
            case "redacted_thinking" where role == "assistant":
                break
            case let type?:
                throw .invalidRequest("\(where_).type: '\(type)' is not allowed in a \(role) message", param: "\(where_).type", code: "invalid_value")
            case nil:
                throw .invalidRequest("\(where_).type: required", param: "\(where_).type", code: "missing_required_parameter")
            }
        }
        if role == "user" {
            // Tool results answer the previous assistant turn, so they come first.
            if parts.isEmpty { return toolResults }
            let onlyText = parts.allSatisfy { $0["type"]?.stringValue == "text" }
            let content: JSONValue = onlyText
                ? .string(parts.compactMap { $0["text"]?.stringValue }.joined(separator: "\n"))
                : .array(parts)
            return toolResults + [.object([("role", .string("user")), ("content", content)])]
        }
        var message: [(key: String, value: JSONValue)] = [("role", .string("assistant"))]
        let text = parts.compactMap { $0["text"]?.stringValue }.joined(separator: "\n")
        message.append(("content", text.isEmpty && !toolCalls.isEmpty ? .null : .string(text)))
        if !thinking.isEmpty { message.append(("reasoning_content", .string(thinking))) }
        if !toolCalls.isEmpty { message.append(("tool_calls", .array(toolCalls))) }
        return [.object(message)]
    }

    static func imagePart(_ source: JSONValue?, at param: String) throws(APIError) -> JSONValue {
        let url: String
        switch source?["type"]?.stringValue {
        case "base64":
            guard let media = source?["media_type"]?.stringValue, let data = source?["data"]?.stringValue else {
                throw .invalidRequest("\(param).source: base64 images need media_type and data", param: "\(param).source", code: "invalid_value")
            }
            url = "data:\(media);base64,\(data)"
        case "url":
            guard let link = source?["url"]?.stringValue else {
                throw .invalidRequest("\(param).source.url: required", param: "\(param).source.url", code: "missing_required_parameter")
            }
            url = link
        default:
            throw .invalidRequest("\(param).source.type: must be 'base64' or 'url'", param: "\(param).source", code: "invalid_value")
        }
        return .object([("type", .string("image_url")), ("image_url", .object([("url", .string(url))]))])
    }

    /// A tool result's content: a string, or text blocks joined.
    static func resultText(_ content: JSONValue?) -> String {
        switch content {
        case .string(let text)?: return text
        case .array(let blocks)?: return blocks.compactMap { $0["text"]?.stringValue }.joined(separator: "\n")
        case nil, .null?: return ""
        case let other?: return other.jsonString
        }
    }
}

/// `POST /v1/messages/count_tokens`: the same fields, without `max_tokens`.
public struct AnthropicCountTokensRequest: Decodable, Sendable {
    public var model: String?
    public var messages: [AnthropicMessage]
    public var system: JSONValue?
    public var tools: [AnthropicTool]?

    public func normalized() throws(APIError) -> NormalizedRequest {
        if messages.isEmpty {
            throw .invalidRequest("messages: at least one message is required", param: "messages", code: "invalid_value")
        }
        var request = NormalizedRequest(kind: .chat, maxTokens: 1, maxWallMilliseconds: 0)
        try AnthropicMessagesRequest.addConversation(system: system, messages: messages, tools: tools, to: &request)
        return request
    }
}

extension FinishReason {
    /// Anthropic's `stop_reason`.
    public var anthropicName: String {
        switch self {
        case .stop, .cancelled: "end_turn"
        case .length, .timeLimit: "max_tokens"
        case .toolCalls: "tool_use"
        case .stopSequence: "stop_sequence"
        }
    }
}
