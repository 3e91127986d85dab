import Foundation

/// `POST /v1/responses` (OpenAI Responses), translated into the normalized chat request.
public struct ResponsesRequest: Decodable, Sendable {
    public var model: String?
    public var input: JSONValue
    public var instructions: String?
    public var tools: [JSONValue]?
    public var toolChoice: JSONValue?
    public var maxOutputTokens: Int?
    public var temperature: Double?
    public var topP: Double?
    public var stream: Bool?
    public var reasoning: JSONValue?
    public var text: JSONValue?
    public var parallelToolCalls: Bool?
    public var previousResponseID: String?
    // Extensions.
    public var topK: Int?
    public var minP: Double?
    public var repetitionPenalty: Double?
    public var sessionID: String?
    public var cancelID: String?

    enum CodingKeys: String, CodingKey {
        case model, input, instructions, tools, temperature, stream, reasoning, text
        case toolChoice = "tool_choice"
        case maxOutputTokens = "max_output_tokens"
        case topP = "top_p"
        case parallelToolCalls = "parallel_tool_calls"
        case previousResponseID = "previous_response_id"
        case topK = "top_k"
        case minP = "min_p"
        case repetitionPenalty = "repetition_penalty"
        case sessionID = "session_id"
        case cancelID = "cancel_id"
    }

    public var isStreaming: Bool { stream ?? false }

    public func validate() throws(APIError) {
        if previousResponseID != nil {
            throw .invalidRequest("'previous_response_id' is not supported: responses are not stored; send the whole conversation in 'input'.",
                                  param: "previous_response_id", code: "unsupported_parameter")
        }
        if let maxOutputTokens, maxOutputTokens < 1 {
            throw .invalidRequest("'max_output_tokens' must be at least 1.", param: "max_output_tokens", code: "invalid_value")
        }
        try sampling.validate()
    }

    var sampling: Sampling {
        Sampling(temperature: temperature, topP: topP, topK: topK, minP: minP, repetitionPenalty: repetitionPenalty)
    }

    public func normalized(maxTokens defaultMaxTokens: Int, maxWallMilliseconds: Int) throws(APIError) -> NormalizedRequest {
        var request = NormalizedRequest(kind: .chat, maxTokens: maxOutputTokens ?? defaultMaxTokens,
                                        maxWallMilliseconds: maxWallMilliseconds)
        var messages: [JSONValue] = []
        if let instructions { messages.append(Self.message("system", .string(instructions))) }
        messages += try Self.messages(from: input)
        if !messages.contains(where: { $0["role"]?.stringValue != "system" }) {
            throw .invalidRequest("'input' must contain at least one message.", param: "input", code: "invalid_value")
        }
        request.messages = messages
        request.sampling = sampling
        let functions = (tools ?? []).compactMap(Self.chatTool)
        request.tools = functions.isEmpty ? nil : functions
        request.toolChoice = try Self.chatToolChoice(toolChoice)
        request.parallelToolCalls = parallelToolCalls
        request.responseFormat = Self.responseFormat(text?["format"])
        if let effort = reasoning?["effort"]?.stringValue {
            request.chatTemplateKwargs = .object([("enable_thinking", .bool(effort != "none")), ("reasoning_effort", .string(effort))])
        }
        return request
    }

    static func message(_ role: String, _ content: JSONValue) -> JSONValue {
        .object([("role", .string(role)), ("content", content)])
    }

    /// Input items → chat messages. Consecutive function calls become one assistant turn;
    /// item types that carry nothing for the model (reasoning, unknown ones) are dropped.
    static func messages(from input: JSONValue) throws(APIError) -> [JSONValue] {
        switch input {
        case .string(let text): return [message("user", .string(text))]
        case .array(let items):
            var messages: [JSONValue] = []
            var pendingCalls: [JSONValue] = []
            func flushCalls() {
                guard !pendingCalls.isEmpty else { return }
                messages.append(.object([("role", .string("assistant")), ("content", .null), ("tool_calls", .array(pendingCalls))]))
                pendingCalls = []
            }
            for (index, item) in items.enumerated() {
                let param = "input[\(index)]"
                let type = item["type"]?.stringValue ?? (item["role"] != nil ? "message" : nil)
                switch type {
                case "message":
                    flushCalls()
                    messages.append(try chatMessage(item, at: param))
                case "function_call":
                    guard let callID = item["call_id"]?.stringValue, let name = item["name"]?.stringValue else {
                        throw .invalidRequest("\(param): a function_call needs call_id and name", param: param, code: "invalid_value")
                    }
                    pendingCalls.append(.object([
                        ("id", .string(callID)), ("type", .string("function")),
                        ("function", .object([("name", .string(name)), ("arguments", item["arguments"] ?? .string("{}"))])),
                    ]))
                case "function_call_output":
                    flushCalls()
                    guard let callID = item["call_id"]?.stringValue else {
                        throw .invalidRequest("\(param).call_id: required", param: "\(param).call_id", code: "missing_required_parameter")
                    }
                    let output = item["output"]?.stringValue ?? item["output"]?.jsonString ?? ""
                    messages.append(.object([("role", .string("tool")), ("tool_call_id", .string(callID)), ("content", .string(output))]))
                default:
                    continue
                }
            }
            flushCalls()
            return messages
        default:
            throw .invalidRequest("'input' must be a string or a list of items.", param: "input", code: "invalid_type")
        }
    }

    static func chatMessage(_ item: JSONValue, at param: String) throws(APIError) -> JSONValue {
        guard let role = item["role"]?.stringValue else {
            throw .invalidRequest("\(param).role: required", param: "\(param).role", code: "missing_required_parameter")
        }
        let chatRole: String
        switch role {
        case "system", "developer": chatRole = "system"
        case "user", "assistant": chatRole = role
        default:
            throw .invalidRequest("\(param).role: must be one of system, developer, user, assistant", param: "\(param).role", code: "invalid_value")
        }
        switch item["content"] {
        case .string(let text)?: return message(chatRole, .string(text))
        case .array(let parts)?:
            var converted: [JSONValue] = []
            for (index, part) in parts.enumerated() {
                switch part["type"]?.stringValue {
                case "input_text", "output_text", "text":
                    converted.append(.object([("type", .string("text")), ("text", part["text"] ?? .string(""))]))
                case "input_image":
                    guard let url = part["image_url"]?.stringValue else {
                        throw .invalidRequest("\(param).content[\(index)].image_url: required (file ids are not supported)",
                                              param: "\(param).content[\(index)].image_url", code: "invalid_value")
                    }
                    converted.append(.object([("type", .string("image_url")), ("image_url", .object([("url", .string(url))]))]))
                default:
                    continue
                }
            }
            let texts = converted.compactMap { $0["type"]?.stringValue == "text" ? $0["text"]?.stringValue : nil }
            if texts.count == converted.count { return message(chatRole, .string(texts.joined(separator: "\n"))) }
            return message(chatRole, .array(converted))
        default:
            throw .invalidRequest("\(param).content: must be a string or a list of parts", param: "\(param).content", code: "invalid_type")
        }
    }

    /// A flat Responses function tool → the nested chat shape; other tool types are dropped.
    static func chatTool(_ tool: JSONValue) -> JSONValue? {
        guard tool["type"]?.stringValue == "function", let name = tool["name"] else { return nil }
        var function: [(key: String, value: JSONValue)] = [("name", name)]
        if let description = tool["description"] { function.append(("description", description)) }
        function.append(("parameters", tool["parameters"] ?? .object([("type", .string("object")), ("properties", .object([]))])))
        return .object([("type", .string("function")), ("function", .object(function))])
    }

    static func chatToolChoice(_ choice: JSONValue?) throws(APIError) -> JSONValue? {
        switch choice {
        case nil, .null?: return nil
        case .string(let mode)? where ["auto", "none", "required"].contains(mode): return .string(mode)
        case let object? where object["type"]?.stringValue == "function":
            guard let name = object["name"] else {
                throw .invalidRequest("tool_choice: a function choice needs a name", param: "tool_choice", code: "invalid_value")
            }
            return .object([("type", .string("function")), ("function", .object([("name", name)]))])
        default:
            throw .invalidRequest("tool_choice: must be auto, none, required or {type: function, name}", param: "tool_choice", code: "invalid_value")
        }
    }

    static func responseFormat(_ format: JSONValue?) -> JSONValue? {
        switch format?["type"]?.stringValue {
        case "json_object": return .object([("type", .string("json_object"))])
        case "json_schema":
            var schema: [(key: String, value: JSONValue)] = [("name", format?["name"] ?? .string("response"))]
            if let body = format?["schema"] { schema.append(("schema", body)) }
            if let strict = format?["strict"] { schema.append(("strict", strict)) }
            return .object([("type", .string("json_schema")), ("json_schema", .object(schema))])
        default: return nil
        }
    }
}
