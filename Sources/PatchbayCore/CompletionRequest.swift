import Foundation

/// `POST /v1/completions`: raw prompt completion, as OpenAI defines it plus the extensions.
public struct CompletionRequest: Decodable, Sendable {
    public var model: String?
    public var prompt: StringList
    public var stream: Bool?
    public var streamOptions: ChatCompletionRequest.StreamOptions?
    public var maxTokens: Int?
    public var temperature: Double?
    public var topP: Double?
    public var presencePenalty: Double?
    public var frequencyPenalty: Double?
    public var seed: Int64?
    public var stop: StopSequences?
    public var echo: Bool?
    public var n: Int?
    public var logprobs: Int?
    public var topK: Int?
    public var minP: Double?
    public var repetitionPenalty: Double?
    public var sessionID: String?
    public var cancelID: String?

    enum CodingKeys: String, CodingKey {
        case model, prompt, stream, temperature, seed, stop, echo, n, logprobs
        case streamOptions = "stream_options"
        case maxTokens = "max_tokens"
        case topP = "top_p"
        case presencePenalty = "presence_penalty"
        case frequencyPenalty = "frequency_penalty"
        case topK = "top_k"
        case minP = "min_p"
        case repetitionPenalty = "repetition_penalty"
        case sessionID = "session_id"
        case cancelID = "cancel_id"
    }

    public var isStreaming: Bool { stream ?? false }

    public func validate() throws(APIError) {
        guard let text = prompt.values.first, !text.isEmpty else {
            throw .invalidRequest("'prompt' must be a non-empty string.", param: "prompt", code: "invalid_value")
        }
        if prompt.values.count > 1 {
            throw .invalidRequest("Only one prompt per request is supported; send the others as separate requests.",
                                  param: "prompt", code: "unsupported_value")
        }
        if let n, n != 1 {
            throw .invalidRequest("Only n=1 is supported.", param: "n", code: "unsupported_value")
        }
        if logprobs != nil {
            throw .invalidRequest("'logprobs' is not supported.", param: "logprobs", code: "unsupported_parameter")
        }
        if let maxTokens, maxTokens < 1 {
            throw .invalidRequest("'max_tokens' must be at least 1.", param: "max_tokens", code: "invalid_value")
        }
        try sampling.validate()
    }

    var sampling: Sampling {
        Sampling(temperature: temperature, topP: topP, topK: topK, minP: minP, repetitionPenalty: repetitionPenalty,
                 presencePenalty: presencePenalty, frequencyPenalty: frequencyPenalty, seed: seed)
    }

    public func normalized(maxTokens defaultMaxTokens: Int, maxWallMilliseconds: Int) -> NormalizedRequest {
        var request = NormalizedRequest(kind: .completion, maxTokens: maxTokens ?? defaultMaxTokens,
                                        maxWallMilliseconds: maxWallMilliseconds)
        request.prompt = prompt.values.first
        request.sampling = sampling
        request.stop = stop?.values ?? []
        return request
    }
}

/// Turns generation events into `text_completion` SSE chunks.
public struct CompletionStreamEncoder: EventStreamEncoder {
    private let prefix: [UInt8]
    private let includeUsage: Bool
    private var echo: String?
    private var usage = Usage(promptTokens: 0, completionTokens: 0)

    public init(id: String, created: Int, model: String, includeUsage: Bool, echo: String?) {
        var head = JSONWriter()
        head.raw("{\"id\":")
        head.string(id)
        head.raw(",\"object\":\"text_completion\",\"created\":")
        head.int(created)
        head.raw(",\"model\":")
        head.string(model)
        prefix = head.bytes
        self.includeUsage = includeUsage
        self.echo = echo
    }

    public mutating func encode(_ event: GenerationEvent, into out: inout [UInt8]) {
        if let echo {
            self.echo = nil
            chunk(echo, finish: nil, into: &out)
        }
        switch event {
        case .content(let text): chunk(text, finish: nil, into: &out)
        case .reasoning, .toolCall, .timings, .progress, .segment, .language: break
        case .usage(let usage): self.usage = usage
        case .finish(let reason):
            chunk("", finish: reason, into: &out)
            if includeUsage {
                var json = JSONWriter()
                json.raw(prefix)
                json.raw(",\"choices\":[],\"usage\":")
                ChatCompletionStreamEncoder.writeUsage(usage, into: &json)
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

    private func chunk(_ text: String, finish: FinishReason?, into out: inout [UInt8]) {
        var json = JSONWriter()
        json.raw(prefix)
        json.raw(",\"choices\":[{\"text\":")
        json.string(text)
        json.raw(",\"index\":0,\"logprobs\":null,\"finish_reason\":")
        json.optionalString(finish?.openAIName)
        json.raw("}]}")
        SSE.data(json.bytes, into: &out)
    }
}

extension ChatCompletionAccumulator {
    /// The non-streaming `text_completion` response.
    public func completionResponse(id: String, created: Int, model: String, echo: String?) -> [UInt8] {
        var json = JSONWriter(capacity: content.utf8.count + 256)
        json.raw("{\"id\":")
        json.string(id)
        json.raw(",\"object\":\"text_completion\",\"created\":")
        json.int(created)
        json.raw(",\"model\":")
        json.string(model)
        json.raw(",\"choices\":[{\"text\":")
        json.string((echo ?? "") + content)
        json.raw(",\"index\":0,\"logprobs\":null,\"finish_reason\":")
        json.string((finishReason ?? .stop).openAIName)
        json.raw("}],\"usage\":")
        ChatCompletionStreamEncoder.writeUsage(usage, into: &json)
        json.raw("}")
        return json.bytes
    }
}
