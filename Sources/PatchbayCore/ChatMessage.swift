/// One message of an OpenAI chat conversation.
public struct ChatMessage: Decodable, Sendable {
    public enum Role: String, Sendable {
        case system, user, assistant, tool
    }

    public enum Content: Sendable {
        case text(String)
        case parts([ContentPart])

        var isEmpty: Bool {
            switch self {
            case .text(let text): text.isEmpty
            case .parts(let parts): parts.isEmpty
            }
        }
    }

    public enum ContentPart: Sendable {
        case text(String)
        /// An image as a URL (a `data:` URI or http(s)).
        case imageURL(String)
        /// Audio as base64 (`input_audio`), with its format (`wav`, `mp3`).
        case inputAudio(data: String, format: String)
    }

    public var role: Role
    public var content: Content?
    public var name: String?
    public var toolCalls: [JSONValue]?
    public var toolCallID: String?
    public var reasoningContent: String?

    enum CodingKeys: String, CodingKey {
        case role, content, name
        case toolCalls = "tool_calls"
        case toolCallID = "tool_call_id"
        case reasoningContent = "reasoning_content"
    }

    public init(role: Role, content: Content?, toolCalls: [JSONValue]? = nil, toolCallID: String? = nil) {
        self.role = role
        self.content = content
        self.toolCalls = toolCalls
        self.toolCallID = toolCallID
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let roleName = try container.decode(String.self, forKey: .role)
        switch roleName {
        case "developer": role = .system  // OpenAI's newer name for the system role
        default:
            guard let known = Role(rawValue: roleName) else {
                throw DecodingError.dataCorruptedError(
                    forKey: .role, in: container,
                    debugDescription: "unknown role '\(roleName)'; expected system, developer, user, assistant or tool")
            }
            role = known
        }
        if try !container.contains(.content) || container.decodeNil(forKey: .content) {
            content = nil
        } else if let text = try? container.decode(String.self, forKey: .content) {
            content = .text(text)
        } else {
            var parts: [ContentPart] = []
            var list = try container.nestedUnkeyedContainer(forKey: .content)
            while !list.isAtEnd {
                let part = try list.nestedContainer(keyedBy: PartKeys.self)
                let type = try part.decode(String.self, forKey: .type)
                switch type {
                case "text", "input_text":
                    parts.append(.text(try part.decode(String.self, forKey: .text)))
                case "image_url":
                    let image = try part.nestedContainer(keyedBy: PartKeys.self, forKey: .imageURL)
                    parts.append(.imageURL(try image.decode(String.self, forKey: .url)))
                case "input_audio":
                    let audio = try part.nestedContainer(keyedBy: PartKeys.self, forKey: .inputAudio)
                    parts.append(.inputAudio(data: try audio.decode(String.self, forKey: .data),
                                             format: try audio.decodeIfPresent(String.self, forKey: .format) ?? "wav"))
                default:
                    throw DecodingError.dataCorruptedError(
                        forKey: .type, in: part, debugDescription: "unsupported content part type '\(type)'")
                }
            }
            content = .parts(parts)
        }
        name = try container.decodeIfPresent(String.self, forKey: .name)
        toolCalls = try container.decodeIfPresent([JSONValue].self, forKey: .toolCalls)
        toolCallID = try container.decodeIfPresent(String.self, forKey: .toolCallID)
        reasoningContent = try container.decodeIfPresent(String.self, forKey: .reasoningContent)
    }

    private enum PartKeys: String, CodingKey {
        case type, text, url, data, format
        case imageURL = "image_url"
        case inputAudio = "input_audio"
    }

    /// The per-role shape rules of the OpenAI spec, enforced at the boundary so a
    /// malformed conversation is a clear 400 instead of an engine error later.
    func validate(param: String) throws(APIError) {
        if toolCalls != nil && role != .assistant {
            throw .invalidRequest("\"tool_calls\" is only valid on role=\"assistant\" messages.", param: "\(param).tool_calls")
        }
        if toolCallID != nil && role != .tool {
            throw .invalidRequest("\"tool_call_id\" is only valid on role=\"tool\" messages.", param: "\(param).tool_call_id")
        }
        let hasContent = !(content?.isEmpty ?? true)
        switch role {
        case .tool:
            if toolCallID?.isEmpty ?? true {
                throw .invalidRequest("role=\"tool\" messages require \"tool_call_id\".", param: "\(param).tool_call_id")
            }
            if !hasContent {
                throw .invalidRequest("role=\"tool\" messages require non-empty \"content\".", param: "\(param).content")
            }
        case .assistant:
            if !hasContent && (toolCalls?.isEmpty ?? true) {
                throw .invalidRequest("role=\"assistant\" messages require either \"content\" or \"tool_calls\".", param: "\(param).content")
            }
        case .user, .system:
            if !hasContent {
                throw .invalidRequest("role=\"\(role.rawValue)\" messages require non-empty \"content\".", param: "\(param).content")
            }
        }
        for (index, call) in (toolCalls ?? []).enumerated() {
            guard call["function"]?["name"]?.stringValue?.isEmpty == false else {
                throw .invalidRequest("Each tool call needs a 'function' with a 'name'.", param: "\(param).tool_calls[\(index)]")
            }
        }
    }

    /// The message's audio parts, in order.
    public var audioParts: [(data: String, format: String)] {
        guard case .parts(let parts)? = content else { return [] }
        return parts.compactMap { if case .inputAudio(let data, let format) = $0 { (data, format) } else { nil } }
    }

    /// Whether the message carries an image part.
    public var hasImage: Bool {
        guard case .parts(let parts)? = content else { return false }
        return parts.contains { if case .imageURL = $0 { true } else { false } }
    }

    var normalized: JSONValue {
        var members: [(key: String, value: JSONValue)] = [("role", .string(role.rawValue))]
        switch content {
        case .text(let text)?: members.append(("content", .string(text)))
        case .parts(let parts)?:
            members.append(("content", .array(parts.map { part in
                switch part {
                case .text(let text): .object([("type", .string("text")), ("text", .string(text))])
                case .imageURL(let url):
                    .object([("type", .string("image_url")), ("image_url", .object([("url", .string(url))]))])
                case .inputAudio(let data, let format):
                    .object([("type", .string("input_audio")),
                             ("input_audio", .object([("data", .string(data)), ("format", .string(format))]))])
                }
            })))
        case nil: members.append(("content", .null))
        }
        if let reasoningContent { members.append(("reasoning_content", .string(reasoningContent))) }
        if let toolCalls { members.append(("tool_calls", .array(toolCalls))) }
        if let toolCallID { members.append(("tool_call_id", .string(toolCallID))) }
        if let name { members.append(("name", .string(name))) }
        return .object(members)
    }
}
