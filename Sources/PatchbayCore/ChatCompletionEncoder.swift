/// Turns generation events into OpenAI chat completion SSE frames.
///
/// Every content delta becomes one `chat.completion.chunk`; the constant part of
/// each chunk is rendered once, so the per-token cost is one escape of the text.
public struct ChatCompletionStreamEncoder: EventStreamEncoder {
    private let prefix: [UInt8]
    private let includeUsage: Bool
    private let includeProgress: Bool
    private var sentRole = false
    private var usage: Usage?
    private var startedToolCalls: Set<Int> = []

    /// `includeProgress`: forward prompt processing progress as llama-server does for
    /// `return_progress` (chunks with no choices and a `prompt_progress` object).
    public init(id: String, created: Int, model: String, includeUsage: Bool, includeProgress: Bool = false) {
        var head = JSONWriter()
        head.raw("{\"id\":")
        head.string(id)
        head.raw(",\"object\":\"chat.completion.chunk\",\"created\":")
        head.int(created)
        head.raw(",\"model\":")
        head.string(model)
        prefix = head.bytes
        self.includeUsage = includeUsage
        self.includeProgress = includeProgress
    }

    /// Appends the SSE frames for `event` to `out`.
    public mutating func encode(_ event: GenerationEvent, into out: inout [UInt8]) {
        switch event {
        case .content(let text):
            frame(into: &out) { $0.raw("\"content\":"); $0.string(text) }
        case .reasoning(let text):
            frame(into: &out) { $0.raw("\"reasoning_content\":"); $0.string(text) }
        case .toolCall(let delta):
            let isFirst = startedToolCalls.insert(delta.index).inserted
            frame(into: &out) { json in
                json.raw("\"tool_calls\":[{\"index\":")
                json.int(delta.index)
                if isFirst {
                    json.raw(",\"id\":")
                    json.string(delta.id ?? "call_\(delta.index)")
                    json.raw(",\"type\":\"function\",\"function\":{\"name\":")
                    json.string(delta.name ?? "")
                    json.raw(",\"arguments\":")
                } else {
                    json.raw(",\"function\":{\"arguments\":")
                }
                json.string(delta.arguments)
                json.raw("}}]")
            }
        case .usage(let usage):
            self.usage = usage
        case .progress(let progress) where includeProgress && progress.total > 0:  // total 0: only a sign of life
            var json = JSONWriter()
            json.raw(prefix)
            json.raw(",\"choices\":[],\"prompt_progress\":{\"total\":")
            json.int(progress.total)
            json.raw(",\"cache\":")
            json.int(progress.cached)
            json.raw(",\"processed\":")
            json.int(progress.processed)
            json.raw(",\"time_ms\":")
            json.int(progress.elapsedMilliseconds)
            json.raw("}}")
            SSE.data(json.bytes, into: &out)
        case .timings, .progress, .segment, .language:
            break
        case .finish(let reason):
            var json = JSONWriter()
            json.raw(prefix)
            json.raw(",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":")
            json.string(reason.openAIName)
            json.raw("}]}")
            SSE.data(json.bytes, into: &out)
            if includeUsage {
                var json = JSONWriter()
                json.raw(prefix)
                json.raw(",\"choices\":[],\"usage\":")
                Self.writeUsage(usage ?? Usage(promptTokens: 0, completionTokens: 0), into: &json)
                json.raw("}")
                SSE.data(json.bytes, into: &out)
            }
            SSE.done(into: &out)
        case .error(let error):
            encode(error: APIError(error), into: &out)
        }
    }

    public func encode(error: APIError, into out: inout [UInt8]) {
        SSE.openAIError(error, into: &out)
    }

    private mutating func frame(into out: inout [UInt8], delta body: (inout JSONWriter) -> Void) {
        var json = JSONWriter()
        json.raw(prefix)
        json.raw(",\"choices\":[{\"index\":0,\"delta\":{")
        if !sentRole {
            json.raw("\"role\":\"assistant\",")
            sentRole = true
        }
        body(&json)
        json.raw("},\"finish_reason\":null}]}")
        SSE.data(json.bytes, into: &out)
    }

    static func writeUsage(_ usage: Usage, into json: inout JSONWriter) {
        json.raw("{\"prompt_tokens\":")
        json.int(usage.promptTokens)
        json.raw(",\"completion_tokens\":")
        json.int(usage.completionTokens)
        json.raw(",\"total_tokens\":")
        json.int(usage.promptTokens + usage.completionTokens)
        json.raw(",\"prompt_tokens_details\":{\"cached_tokens\":")
        json.int(usage.cachedTokens)
        json.raw("}}")
    }
}

/// Collects a whole generation into one OpenAI `chat.completion` object.
public struct ChatCompletionAccumulator: Sendable {
    public private(set) var content = ""
    public private(set) var reasoning = ""
    public private(set) var toolCalls: [ToolCallDelta] = []
    public private(set) var usage = Usage(promptTokens: 0, completionTokens: 0)
    public private(set) var finishReason: FinishReason?
    public private(set) var error: APIError?

    public init() {}

    public mutating func add(_ event: GenerationEvent) {
        switch event {
        case .content(let text): content += text
        case .reasoning(let text): reasoning += text
        case .toolCall(let delta):
            if let index = toolCalls.firstIndex(where: { $0.index == delta.index }) {
                toolCalls[index].arguments += delta.arguments
            } else {
                toolCalls.append(delta)
            }
        case .usage(let usage): self.usage = usage
        case .timings, .progress, .segment, .language: break
        case .finish(let reason): finishReason = reason
        case .error(let error): self.error = APIError(error)
        }
    }

    public func response(id: String, created: Int, model: String) -> [UInt8] {
        var json = JSONWriter(capacity: content.utf8.count + 512)
        json.raw("{\"id\":")
        json.string(id)
        json.raw(",\"object\":\"chat.completion\",\"created\":")
        json.int(created)
        json.raw(",\"model\":")
        json.string(model)
        json.raw(",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":")
        if content.isEmpty && !toolCalls.isEmpty { json.raw("null") } else { json.string(content) }
        if !reasoning.isEmpty {
            json.raw(",\"reasoning_content\":")
            json.string(reasoning)
        }
        if !toolCalls.isEmpty {
            json.raw(",\"tool_calls\":[")
            for (position, call) in toolCalls.enumerated() {
                if position > 0 { json.raw(",") }
                json.raw("{\"id\":")
                json.string(call.id ?? "call_\(call.index)")
                json.raw(",\"type\":\"function\",\"function\":{\"name\":")
                json.string(call.name ?? "")
                json.raw(",\"arguments\":")
                json.string(call.arguments)
                json.raw("}}")
            }
            json.raw("]")
        }
        json.raw("},\"logprobs\":null,\"finish_reason\":")
        json.string((finishReason ?? .stop).openAIName)
        json.raw("}],\"usage\":")
        ChatCompletionStreamEncoder.writeUsage(usage, into: &json)
        json.raw("}")
        return json.bytes
    }
}

/// Server-sent events framing.
public enum SSE {
    public static func data(_ payload: [UInt8], into out: inout [UInt8]) {
        out.append(contentsOf: "data: ".utf8)
        out.append(contentsOf: payload)
        out.append(contentsOf: "\n\n".utf8)
    }

    public static func done(into out: inout [UInt8]) {
        out.append(contentsOf: "data: [DONE]\n\n".utf8)
    }

    /// An error in-band, as OpenAI-compatible servers send it once the 200 has gone out, then [DONE].
    public static func openAIError(_ error: APIError, into out: inout [UInt8]) {
        var json = JSONWriter()
        json.raw("{\"error\":{\"message\":")
        json.string(error.message)
        json.raw(",\"type\":")
        json.string(error.openAIType)
        json.raw(",\"code\":")
        json.optionalString(error.code)
        json.raw("}}")
        data(json.bytes, into: &out)
        done(into: &out)
    }

    /// A comment line; clients ignore it, proxies see traffic.
    public static func comment(_ text: String, into out: inout [UInt8]) {
        out.append(contentsOf: ": \(text)\n\n".utf8)
    }
}
