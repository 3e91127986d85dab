import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// A route that answers with a generation: its request body, and how the generation is
/// shown in its dialect. Everything between (finding the model, loading it on first use,
/// the capability check, the cancel registry, the admission queue, the run, keep-alives,
/// client departure) is `GenerationResponse`, written once for every such route.
protocol GenerationRoute: Sendable {
    associatedtype Body: GenerationRequestBody

    /// The start of this route's ids ("chatcmpl-"); the rest is random.
    static var idPrefix: String { get }
    /// The body, from the HTTP request: JSON unless the route says otherwise.
    func decode(_ request: Request, server: ServerState) async throws -> Body
    /// What to ask the engine, and how to answer, once the model is known.
    func plan(_ body: Body, id: String, model: LoadedModel, limits: GenerationLimits) throws -> GenerationPlan
}

extension GenerationRoute where Body: Decodable {
    func decode(_ request: Request, server: ServerState) async throws -> Body {
        try await server.decodeBody(Body.self, of: request)
    }
}

extension GenerationRoute {
    /// The key the run's own id cancels it by: `completion_id` (OpenAI ids) unless the
    /// route's ids are Anthropic message ids.
    static func runKey(_ id: String) -> CancelRegistry.Key {
        idPrefix == "msg_" ? .message(id) : .completion(id)
    }
}

/// What every generation request carries besides its dialect's own fields.
protocol GenerationRequestBody: Sendable {
    var modelName: String? { get }
    var isStreaming: Bool { get }
    var cancelID: String? { get }
    var sessionID: String? { get }
    func validate() throws(APIError)
}

extension GenerationRequestBody {
    /// Every generation is cancellable by its `cancel_id`, its `session_id` and its own id.
    func cancelKeys(runKey: CancelRegistry.Key) -> [CancelRegistry.Key] {
        [cancelID.map(CancelRegistry.Key.cancelID), sessionID.map(CancelRegistry.Key.session), runKey].compactMap { $0 }
    }
}

extension ChatCompletionRequest: GenerationRequestBody { var modelName: String? { model } }
extension CompletionRequest: GenerationRequestBody { var modelName: String? { model } }
extension ResponsesRequest: GenerationRequestBody { var modelName: String? { model } }
extension AnthropicMessagesRequest: GenerationRequestBody { var modelName: String? { model } }

/// The defaults a route fills in for what a request leaves open.
struct GenerationLimits: Sendable {
    /// `max_tokens` when the client sets none: the model's context length, never a small number.
    var maxTokens: Int
    /// The wall-clock cap the plugin is told (`--max-generation-seconds`).
    var maxWallMilliseconds: Int
}

/// One generation as its route wants it: the request for the engine and how the answer is
/// given, as a stream or collected into one response.
struct GenerationPlan: Sendable {
    enum Reply: Sendable {
        case stream(any EventStreamEncoder)
        case collect(any ResponseCollector)
    }

    var request: NormalizedRequest
    var reply: Reply
    /// A transcription answering a chat: its segments are shown as assistant text.
    var showsTranscriptAsContent = false
}

/// Builds one non-streamed response from a generation's events.
protocol ResponseCollector: Sendable {
    mutating func add(_ event: GenerationEvent)
    /// The engine's error, if the run failed.
    var error: APIError? { get }
    func response() -> Response
}

/// A collector from an accumulator of PatchbayCore and the function that renders it.
struct Collected<Accumulator: EventAccumulator>: ResponseCollector {
    var accumulator: Accumulator
    let render: @Sendable (Accumulator) -> Response

    init(_ accumulator: Accumulator, render: @escaping @Sendable (Accumulator) -> Response) {
        self.accumulator = accumulator
        self.render = render
    }

    mutating func add(_ event: GenerationEvent) { accumulator.accumulate(event) }
    var error: APIError? { accumulator.error }
    func response() -> Response { render(accumulator) }
}

protocol EventAccumulator: Sendable {
    mutating func accumulate(_ event: GenerationEvent)
    var error: APIError? { get }
}

extension ChatCompletionAccumulator: EventAccumulator {
    mutating func accumulate(_ event: GenerationEvent) { add(event) }
}

extension ResponseState: EventAccumulator {
    mutating func accumulate(_ event: GenerationEvent) { add(event) }
}

extension TranscriptionResult: EventAccumulator {
    mutating func accumulate(_ event: GenerationEvent) { add(event) }
}

extension ServerState {
    func limits(for model: LoadedModel) -> GenerationLimits {
        GenerationLimits(maxTokens: model.contextLength ?? configuration.fallbackMaxTokens, maxWallMilliseconds: maxWallMilliseconds)
    }

    var maxWallMilliseconds: Int {
        let (seconds, attoseconds) = configuration.maxGenerationDuration.components
        return Int(seconds) * 1000 + Int(attoseconds / 1_000_000_000_000_000)
    }

    /// Refuses, before any engine work, what the model cannot do.
    func check(_ request: NormalizedRequest, against model: LoadedModel) throws(APIError) {
        let backend = "(backend '\(model.plugin.name)')"
        switch request.kind {
        case .chat where !model.capabilities.contains(.chat):
            throw .invalidRequest("Model '\(model.id)' \(backend) does not support chat.", param: "model", code: "unsupported_capability")
        case .completion where !model.capabilities.contains(.completion):
            throw .invalidRequest("Model '\(model.id)' \(backend) does not support raw completions.",
                                  param: "model", code: "unsupported_capability")
        case .transcription where !model.capabilities.contains(.transcription):
            throw .invalidRequest("Model '\(model.id)' \(backend) does not transcribe audio; load a Whisper model.",
                                  param: "model", code: "unsupported_capability")
        default: break
        }
        if request.hasAudio && !model.capabilities.contains(.audioInput) {
            throw .invalidRequest("Audio provided but model '\(model.id)' \(backend) does not take audio input.",
                                  param: "messages", code: "unsupported_capability")
        }
        if request.hasImage && !model.capabilities.contains(.visionInput) {
            throw .invalidRequest("Image provided but model '\(model.id)' does not support vision.", param: "messages", code: "unsupported_capability")
        }
        if request.tools?.isEmpty == false && !model.capabilities.contains(.tools) {
            throw .invalidRequest("Model '\(model.id)' \(backend) does not support tools. For a GGUF model this means its chat template knows no tools; load it with a tool-aware 'chat_template_override'.", param: "tools", code: "unsupported_parameter")
        }
    }
}
