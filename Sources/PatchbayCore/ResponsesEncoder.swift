/// A Responses API response as it builds up: output items in order (reasoning, message,
/// function calls), usage and status. Streaming renders its events from it; a
/// non-streaming request renders only the final object.
public struct ResponseState: Sendable {
    enum Item: Sendable {
        case reasoning(id: String, text: String)
        case message(id: String, text: String)
        case functionCall(id: String, callID: String, name: String, arguments: String, index: Int)
    }

    let id: String
    let model: String
    let createdAt: Int
    var items: [Item] = []
    var usage = Usage(promptTokens: 0, completionTokens: 0)
    var finish: FinishReason?
    public private(set) var error: APIError?

    public init(id: String, model: String, createdAt: Int) {
        self.id = id
        self.model = model
        self.createdAt = createdAt
    }

    /// Adds an event; returns the index of the item it went to, and whether that item is new.
    @discardableResult
    public mutating func add(_ event: GenerationEvent) -> (index: Int, isNew: Bool)? {
        switch event {
        case .reasoning(let text):
            if case .reasoning(let id, let sofar)? = items.last {
                items[items.count - 1] = .reasoning(id: id, text: sofar + text)
                return (items.count - 1, false)
            }
            items.append(.reasoning(id: "rs_\(randomHex(24))", text: text))
        case .content(let text):
            if case .message(let id, let sofar)? = items.last {
                items[items.count - 1] = .message(id: id, text: sofar + text)
                return (items.count - 1, false)
            }
            items.append(.message(id: "msg_\(randomHex(24))", text: text))
        case .toolCall(let delta):
            if case .functionCall(let id, let callID, let name, let arguments, let index)? = items.last, index == delta.index {
                items[items.count - 1] = .functionCall(id: id, callID: callID, name: name, arguments: arguments + delta.arguments, index: index)
                return (items.count - 1, false)
            }
            items.append(.functionCall(id: "fc_\(randomHex(24))", callID: delta.id ?? "call_\(randomHex(24))",
                                       name: delta.name ?? "", arguments: delta.arguments, index: delta.index))
        case .usage(let usage):
            self.usage = usage
            return nil
        case .timings, .progress, .segment, .language:
            return nil
        case .finish(let reason):
            finish = reason
            return nil
        case .error(let error):
            fail(APIError(error))
            return nil
        }
        return (items.count - 1, true)
    }

    /// The response failed (the engine's error, or the server's before the engine ran).
    public mutating func fail(_ error: APIError) {
        self.error = error
    }

    var status: String {
        if error != nil { return "failed" }
        switch finish {
        case nil: return "in_progress"
        case .length?, .timeLimit?: return "incomplete"
        default: return "completed"
        }
    }

    /// The whole `response` object.
    public func render(into json: inout JSONWriter) {
        json.raw("{\"id\":")
        json.string(id)
        json.raw(",\"object\":\"response\",\"created_at\":")
        json.int(createdAt)
        json.raw(",\"status\":")
        json.string(status)
        json.raw(",\"model\":")
        json.string(model)
        json.raw(",\"output\":[")
        for (position, item) in items.enumerated() {
            if position > 0 { json.raw(",") }
            Self.render(item, done: true, into: &json)
        }
        json.raw("],\"parallel_tool_calls\":true,\"tool_choice\":\"auto\",\"tools\":[],\"error\":")
        if let error {
            json.raw("{\"code\":")
            json.string(error.code ?? "server_error")
            json.raw(",\"message\":")
            json.string(error.message)
            json.raw("}")
        } else {
            json.raw("null")
        }
        json.raw(",\"incomplete_details\":")
        json.raw(status == "incomplete" ? "{\"reason\":\"max_output_tokens\"}" : "null")
        if finish != nil {
            json.raw(",\"usage\":{\"input_tokens\":")
            json.int(usage.promptTokens)
            json.raw(",\"input_tokens_details\":{\"cached_tokens\":")
            json.int(usage.cachedTokens)
            json.raw("},\"output_tokens\":")
            json.int(usage.completionTokens)
            json.raw(",\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":")
            json.int(usage.promptTokens + usage.completionTokens)
            json.raw("}")
        }
        json.raw("}")
    }

    public var json: [UInt8] {
        var json = JSONWriter()
        render(into: &json)
        return json.bytes
    }

    static func render(_ item: Item, done: Bool, into json: inout JSONWriter) {
        let status = done ? "completed" : "in_progress"
        switch item {
        case .reasoning(let id, let text):
            json.raw("{\"type\":\"reasoning\",\"id\":")
            json.string(id)
            json.raw(",\"summary\":[],\"content\":[")
            if done {
                json.raw("{\"type\":\"reasoning_text\",\"text\":")
                json.string(text)
                json.raw("}")
            }
            json.raw("]}")
        case .message(let id, let text):
            json.raw("{\"type\":\"message\",\"id\":")
            json.string(id)
            json.raw(",\"status\":")
            json.string(status)
            json.raw(",\"role\":\"assistant\",\"content\":[")
            if done {
                json.raw("{\"type\":\"output_text\",\"text\":")
                json.string(text)
                json.raw(",\"annotations\":[],\"logprobs\":[]}")
            }
            json.raw("]}")
        case .functionCall(let id, let callID, let name, let arguments, _):
            json.raw("{\"type\":\"function_call\",\"id\":")
            json.string(id)
            json.raw(",\"call_id\":")
            json.string(callID)
            json.raw(",\"name\":")
            json.string(name)
            json.raw(",\"arguments\":")
            json.string(done ? arguments : "")
            json.raw(",\"status\":")
            json.string(status)
            json.raw("}")
        }
    }
}

/// Turns generation events into the Responses API's named SSE events, with sequence numbers:
/// response.created / in_progress, output_item.added, content_part.added, the deltas, the
/// matching .done events, output_item.done, and response.completed (or response.failed).
public struct ResponsesStreamEncoder: EventStreamEncoder {
    private var state: ResponseState
    private var sequence = 0
    private var started = false

    public init(state: ResponseState) {
        self.state = state
    }

    public mutating func encode(error: APIError, into out: inout [UInt8]) {
        start(into: &out)
        if !state.items.isEmpty { close(state.items.count - 1, into: &out) }
        state.fail(error)
        finish(into: &out)
    }

    /// `response.created` and `response.in_progress`, before the first event.
    private mutating func start(into out: inout [UInt8]) {
        guard !started else { return }
        started = true
        let snapshot = state
        emit("response.created", into: &out) { $0.raw(",\"response\":"); snapshot.render(into: &$0) }
        emit("response.in_progress", into: &out) { $0.raw(",\"response\":"); snapshot.render(into: &$0) }
    }

    /// `response.completed`, or `response.failed` once the state holds an error.
    private mutating func finish(into out: inout [UInt8]) {
        let final = state
        emit(final.error == nil ? "response.completed" : "response.failed", into: &out) {
            $0.raw(",\"response\":")
            final.render(into: &$0)
        }
    }

    public mutating func encode(_ event: GenerationEvent, into out: inout [UInt8]) {
        start(into: &out)
        let openBefore = state.items.count
        let piece: String
        switch event {
        case .content(let text), .reasoning(let text): piece = text
        case .toolCall(let delta): piece = delta.arguments
        case .finish, .error:
            if openBefore > 0 { close(openBefore - 1, into: &out) }
            state.add(event)
            finish(into: &out)
            return
        case .usage, .timings, .progress, .segment, .language:
            state.add(event)
            return
        }
        guard let (index, isNew) = state.add(event) else { return }
        if isNew {
            if index > 0 { close(index - 1, into: &out) }
            open(index, into: &out)
        }
        delta(piece, at: index, into: &out)
    }

    private mutating func open(_ index: Int, into out: inout [UInt8]) {
        let item = state.items[index]
        emit("response.output_item.added", into: &out) { json in
            json.raw(",\"output_index\":")
            json.int(index)
            json.raw(",\"item\":")
            ResponseState.render(item, done: false, into: &json)
        }
        if case .message(let id, _) = item {
            emit("response.content_part.added", into: &out) { json in
                Self.location(id, index, into: &json)
                json.raw(",\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[],\"logprobs\":[]}")
            }
        }
    }

    private mutating func delta(_ text: String, at index: Int, into out: inout [UInt8]) {
        guard !text.isEmpty else { return }
        switch state.items[index] {
        case .reasoning(let id, _):
            emit("response.reasoning_text.delta", into: &out) { Self.location(id, index, into: &$0); $0.raw(",\"delta\":"); $0.string(text) }
        case .message(let id, _):
            emit("response.output_text.delta", into: &out) {
                Self.location(id, index, into: &$0)
                $0.raw(",\"delta\":")
                $0.string(text)
                $0.raw(",\"logprobs\":[]")
            }
        case .functionCall(let id, _, _, _, _):
            emit("response.function_call_arguments.delta", into: &out) { json in
                json.raw(",\"item_id\":")
                json.string(id)
                json.raw(",\"output_index\":")
                json.int(index)
                json.raw(",\"delta\":")
                json.string(text)
            }
        }
    }

    private mutating func close(_ index: Int, into out: inout [UInt8]) {
        let item = state.items[index]
        switch item {
        case .reasoning(let id, let text):
            emit("response.reasoning_text.done", into: &out) { Self.location(id, index, into: &$0); $0.raw(",\"text\":"); $0.string(text) }
        case .message(let id, let text):
            emit("response.output_text.done", into: &out) {
                Self.location(id, index, into: &$0)
                $0.raw(",\"text\":")
                $0.string(text)
                $0.raw(",\"logprobs\":[]")
            }
            emit("response.content_part.done", into: &out) { json in
                Self.location(id, index, into: &json)
                json.raw(",\"part\":{\"type\":\"output_text\",\"text\":")
                json.string(text)
                json.raw(",\"annotations\":[],\"logprobs\":[]}")
            }
        case .functionCall(let id, _, let name, let arguments, _):
            emit("response.function_call_arguments.done", into: &out) { json in
                json.raw(",\"item_id\":")
                json.string(id)
                json.raw(",\"output_index\":")
                json.int(index)
                json.raw(",\"name\":")
                json.string(name)
                json.raw(",\"arguments\":")
                json.string(arguments)
            }
        }
        emit("response.output_item.done", into: &out) { json in
            json.raw(",\"output_index\":")
            json.int(index)
            json.raw(",\"item\":")
            ResponseState.render(item, done: true, into: &json)
        }
    }

    private static func location(_ itemID: String, _ index: Int, into json: inout JSONWriter) {
        json.raw(",\"item_id\":")
        json.string(itemID)
        json.raw(",\"output_index\":")
        json.int(index)
        json.raw(",\"content_index\":0")
    }

    private mutating func emit(_ type: String, into out: inout [UInt8], _ body: (inout JSONWriter) -> Void) {
        var json = JSONWriter()
        json.raw("{\"type\":")
        json.string(type)
        json.raw(",\"sequence_number\":")
        json.int(sequence)
        sequence += 1
        body(&json)
        json.raw("}")
        out.append(contentsOf: "event: \(type)\ndata: ".utf8)
        out.append(contentsOf: json.bytes)
        out.append(contentsOf: "\n\n".utf8)
    }
}

