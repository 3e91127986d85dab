import Foundation

/// Turns generation events into Anthropic Messages SSE events:
/// `message_start`, then per content block `content_block_start` / `content_block_delta`
/// (`text_delta`, `thinking_delta`, `input_json_delta`) / `content_block_stop`, then
/// `message_delta` (stop_reason, usage) and `message_stop`. Errors go in-band as `event: error`.
public struct AnthropicStreamEncoder: EventStreamEncoder {
    private enum Block: Equatable {
        case text, thinking, tool(Int)
    }

    private let id: String
    private let model: String
    private var started = false
    private var open: Block?
    private var nextIndex = 0
    private var usage = Usage(promptTokens: 0, completionTokens: 0)

    public init(id: String, model: String) {
        self.id = id
        self.model = model
    }

    public mutating func encode(_ event: GenerationEvent, into out: inout [UInt8]) {
        if !started { start(into: &out) }
        switch event {
        case .content(let text):
            openBlock(.text, into: &out) { $0.raw("{\"type\":\"text\",\"text\":\"\"}") }
            delta(into: &out) { $0.raw("{\"type\":\"text_delta\",\"text\":"); $0.string(text); $0.raw("}") }
        case .reasoning(let text):
            openBlock(.thinking, into: &out) { $0.raw("{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}") }
            delta(into: &out) { $0.raw("{\"type\":\"thinking_delta\",\"thinking\":"); $0.string(text); $0.raw("}") }
        case .toolCall(let call):
            openBlock(.tool(call.index), into: &out) { json in
                json.raw("{\"type\":\"tool_use\",\"id\":")
                json.string(Self.toolUseID(call.id, index: call.index))
                json.raw(",\"name\":")
                json.string(call.name ?? "")
                json.raw(",\"input\":{}}")
            }
            if !call.arguments.isEmpty {
                delta(into: &out) { $0.raw("{\"type\":\"input_json_delta\",\"partial_json\":"); $0.string(call.arguments); $0.raw("}") }
            }
        case .usage(let usage):
            self.usage = usage
        case .timings, .progress, .segment, .language:
            break
        case .finish(let reason):
            closeBlock(into: &out)
            Self.event("message_delta", into: &out) { json in
                json.raw("{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":")
                json.string(reason.anthropicName)
                json.raw(",\"stop_sequence\":")
                json.optionalString(reason.stopSequence)
                json.raw("},\"usage\":{\"input_tokens\":")
                json.int(usage.promptTokens)
                json.raw(",\"output_tokens\":")
                json.int(usage.completionTokens)
                json.raw("}}")
            }
            Self.event("message_stop", into: &out) { $0.raw("{\"type\":\"message_stop\"}") }
        case .error(let error):
            encode(error: APIError(error), into: &out)
        }
    }

    public func encode(error: APIError, into out: inout [UInt8]) {
        Self.event("error", into: &out) { json in
            json.raw("{\"type\":\"error\",\"error\":{\"type\":")
            json.string(error.anthropicType)
            json.raw(",\"message\":")
            json.string(error.message)
            json.raw("}}")
        }
    }

    /// Anthropic ids look like `toolu_…`; an engine's own call id is kept inside one.
    static func toolUseID(_ id: String?, index: Int) -> String {
        guard let id, !id.isEmpty else { return "toolu_\(index)" }
        return id.hasPrefix("toolu_") ? id : "toolu_\(id)"
    }

    private mutating func start(into out: inout [UInt8]) {
        started = true
        Self.event("message_start", into: &out) { json in
            json.raw("{\"type\":\"message_start\",\"message\":{\"id\":")
            json.string(id)
            json.raw(",\"type\":\"message\",\"role\":\"assistant\",\"model\":")
            json.string(model)
            json.raw(",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}}")
        }
        Self.event("ping", into: &out) { $0.raw("{\"type\":\"ping\"}") }
    }

    private mutating func openBlock(_ block: Block, into out: inout [UInt8], contentBlock: (inout JSONWriter) -> Void) {
        guard open != block else { return }
        closeBlock(into: &out)
        open = block
        let index = nextIndex
        Self.event("content_block_start", into: &out) { json in
            json.raw("{\"type\":\"content_block_start\",\"index\":")
            json.int(index)
            json.raw(",\"content_block\":")
            contentBlock(&json)
            json.raw("}")
        }
    }

    private mutating func closeBlock(into out: inout [UInt8]) {
        guard open != nil else { return }
        let index = nextIndex
        Self.event("content_block_stop", into: &out) { json in
            json.raw("{\"type\":\"content_block_stop\",\"index\":")
            json.int(index)
            json.raw("}")
        }
        open = nil
        nextIndex += 1
    }

    private func delta(into out: inout [UInt8], _ body: (inout JSONWriter) -> Void) {
        let index = nextIndex
        Self.event("content_block_delta", into: &out) { json in
            json.raw("{\"type\":\"content_block_delta\",\"index\":")
            json.int(index)
            json.raw(",\"delta\":")
            body(&json)
            json.raw("}")
        }
    }

    static func event(_ name: String, into out: inout [UInt8], _ body: (inout JSONWriter) -> Void) {
        var json = JSONWriter()
        body(&json)
        out.append(contentsOf: "event: \(name)\ndata: ".utf8)
        out.append(contentsOf: json.bytes)
        out.append(contentsOf: "\n\n".utf8)
    }
}

extension ChatCompletionAccumulator {
    /// The non-streaming Anthropic Messages response: thinking, text, then tool_use blocks.
    public func anthropicResponse(id: String, model: String) -> [UInt8] {
        var json = JSONWriter(capacity: content.utf8.count + 512)
        json.raw("{\"id\":")
        json.string(id)
        json.raw(",\"type\":\"message\",\"role\":\"assistant\",\"model\":")
        json.string(model)
        json.raw(",\"content\":[")
        var first = true
        func separator() {
            if !first { json.raw(",") }
            first = false
        }
        if !reasoning.isEmpty {
            separator()
            json.raw("{\"type\":\"thinking\",\"thinking\":")
            json.string(reasoning)
            json.raw(",\"signature\":\"\"}")
        }
        if !content.isEmpty || toolCalls.isEmpty {
            separator()
            json.raw("{\"type\":\"text\",\"text\":")
            json.string(content)
            json.raw("}")
        }
        for call in toolCalls {
            separator()
            json.raw("{\"type\":\"tool_use\",\"id\":")
            json.string(AnthropicStreamEncoder.toolUseID(call.id, index: call.index))
            json.raw(",\"name\":")
            json.string(call.name ?? "")
            json.raw(",\"input\":")
            // The engine's arguments are JSON text, kept in the model's key order; broken JSON is kept as a string.
            if let input = try? JSONValue(parsing: Array(call.arguments.utf8)), input.isObject {
                json.value(input)
            } else {
                json.raw("{\"_raw\":")
                json.string(call.arguments)
                json.raw("}")
            }
            json.raw("}")
        }
        json.raw("],\"stop_reason\":")
        json.string((finishReason ?? .stop).anthropicName)
        json.raw(",\"stop_sequence\":")
        json.optionalString(finishReason?.stopSequence)
        json.raw(",\"usage\":{\"input_tokens\":")
        json.int(usage.promptTokens)
        json.raw(",\"output_tokens\":")
        json.int(usage.completionTokens)
        json.raw("}}")
        return json.bytes
    }
}
