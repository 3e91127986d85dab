import Foundation
import HTTPTypes
import Hummingbird
import PatchbayCore
import PatchbayHost
import Synchronization

/// `POST /v1/chat/completions`
struct ChatCompletionsRoutes {
    let state: ServerState

    func register(on router: Router<PatchbayRequestContext>) {
        router.post("/v1/chat/completions") { request, context in try await handle(request, connection: context.connection) }
    }

    func handle(_ request: Request, connection: ClientConnection?) async throws -> Response {
        let chat = try await state.decodeBody(ChatCompletionRequest.self, of: request)
        try chat.validate()
        return try await state.serve(model: chat.model, streaming: chat.isStreaming, dialect: .openAI) { model in
            try await respond(to: chat, with: model, connection: connection)
        }
    }

    func respond(to chat: ChatCompletionRequest, with model: LoadedModel, connection: ClientConnection?) async throws -> Response {
        if model.capabilities.contains(.transcription) && !model.capabilities.contains(.chat) {
            return try await transcribe(chat, on: model, connection: connection)
        }
        var normalized = chat.normalized(maxTokens: state.defaultMaxTokens(for: model), maxWallMilliseconds: state.maxWallMilliseconds)
        try state.check(normalized, against: model)
        if normalized.tools?.isEmpty == true { normalized.tools = nil }

        let id = "chatcmpl-\(randomHex(24))"
        let created = Int(Date().timeIntervalSince1970)
        let pending = try state.enterQueue(on: model, request: normalized, keys: [
            chat.cancelID.map(CancelRegistry.Key.cancelID), chat.sessionID.map(CancelRegistry.Key.session), .completion(id),
        ].compactMap { $0 }, connection: connection)

        guard chat.isStreaming else {
            let result = try await pending.run().collect()
            return JSONResponse.bytes(result.response(id: id, created: created, model: model.id))
        }

        let encoder = ChatCompletionStreamEncoder(id: id, created: created, model: model.id,
                                                  includeUsage: chat.streamOptions?.includeUsage ?? false,
                                                  includeProgress: chat.returnProgress ?? false)
        return try await pending.stream(encoder: encoder)
    }
}

extension ChatCompletionsRoutes {
    /// Chat with a speech-to-text model (Whisper): the last `input_audio` part is
    /// transcribed, and the transcript is the assistant's message, streamed or not.
    func transcribe(_ chat: ChatCompletionRequest, on model: LoadedModel, connection: ClientConnection?) async throws -> Response {
        guard let messageIndex = chat.messages.lastIndex(where: { !$0.audioParts.isEmpty }),
              let audio = chat.messages[messageIndex].audioParts.last else {
            throw APIError.invalidRequest("Model '\(model.id)' transcribes speech: send the audio as an 'input_audio' content part.",
                                          param: "messages", code: "unsupported_capability")
        }
        let param = "messages[\(messageIndex)].content"
        guard let bytes = Data(base64Encoded: audio.data, options: .ignoreUnknownCharacters), !bytes.isEmpty else {
            throw APIError.invalidRequest("'input_audio.data' must be the audio file in base64.", param: param, code: "invalid_audio")
        }
        guard bytes.count <= state.configuration.maxAudioBytes else {
            throw APIError(status: 413, message: "The audio (\(bytes.count) bytes) exceeds the limit of \(state.configuration.maxAudioBytes) bytes.",
                           param: param, code: "file_too_large")
        }
        let mediaType = TranscriptionRequest.audioMediaType(forExtension: audio.format) ?? "audio/\(audio.format.lowercased())"
        var request = NormalizedRequest(kind: .transcription, maxTokens: NormalizedRequest.maxTokensLimit,
                                        maxWallMilliseconds: state.maxWallMilliseconds)
        request.inputs = [ByteInput(name: "audio", mediaType: mediaType, bytes: [UInt8](bytes))]
        request.audioInput = "audio"
        request.sampling.temperature = chat.temperature

        let id = "chatcmpl-\(randomHex(24))"
        let created = Int(Date().timeIntervalSince1970)
        let pending = try state.enterQueue(on: model, request: request, keys: [
            chat.cancelID.map(CancelRegistry.Key.cancelID), chat.sessionID.map(CancelRegistry.Key.session), .completion(id),
        ].compactMap { $0 }, connection: connection, presenting: TranscriptAsContent().present)
        guard chat.isStreaming else {
            let result = try await pending.run().collect()
            return JSONResponse.bytes(result.response(id: id, created: created, model: model.id))
        }
        let encoder = ChatCompletionStreamEncoder(id: id, created: created, model: model.id,
                                                  includeUsage: chat.streamOptions?.includeUsage ?? false)
        return try await pending.stream(encoder: encoder)
    }
}

/// Shows a transcription's segments as assistant text: the segments in order, the first
/// without the space Whisper puts before each.
final class TranscriptAsContent: Sendable {
    private let started = Mutex(false)

    func present(_ event: GenerationEvent) -> GenerationEvent {
        guard case .segment(let segment) = event else { return event }
        let first = started.withLock { started in
            defer { started = true }
            return !started
        }
        return .content(first ? String(segment.text.drop { $0.isWhitespace }) : segment.text)
    }
}

let eventStreamHeaders: HTTPFields = [
    .contentType: "text/event-stream",
    .cacheControl: "no-cache",
    HTTPField.Name("X-Accel-Buffering")!: "no",
]

extension ServerState {
    /// Refuses, before any engine work, what the model cannot do.
    func check(_ request: NormalizedRequest, against model: LoadedModel) throws(APIError) {
        switch request.kind {
        case .chat where !model.capabilities.contains(.chat):
            throw .invalidRequest("Model '\(model.id)' (backend '\(model.plugin.name)') does not support chat.", param: "model", code: "unsupported_capability")
        case .completion where !model.capabilities.contains(.completion):
            throw .invalidRequest("Model '\(model.id)' (backend '\(model.plugin.name)') does not support raw completions.",
                                  param: "model", code: "unsupported_capability")
        default: break
        }
        if request.hasAudio && !model.capabilities.contains(.audioInput) {
            throw .invalidRequest("Audio provided but model '\(model.id)' (backend '\(model.plugin.name)') does not take audio input.",
                                  param: "messages", code: "unsupported_capability")
        }
        if request.hasImage && !model.capabilities.contains(.visionInput) {
            throw .invalidRequest("Image provided but model '\(model.id)' does not support vision.", param: "messages", code: "unsupported_capability")
        }
        if request.tools?.isEmpty == false && !model.capabilities.contains(.tools) {
            throw .invalidRequest("Model '\(model.id)' (backend '\(model.plugin.name)') does not support tools. For a GGUF model this means its chat template knows no tools; load it with a tool-aware 'chat_template_override'.", param: "tools", code: "unsupported_parameter")
        }
    }
}
