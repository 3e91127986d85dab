import Foundation
import PatchbayCore
import PatchbayHost

/// `POST /v1/chat/completions`. A model that only transcribes (Whisper) answers a chat by
/// transcribing its last `input_audio` part: the transcript is the assistant's message.
struct ChatCompletionsRoute: GenerationRoute {
    static let idPrefix = "chatcmpl-"
    let maxAudioBytes: Int

    func plan(_ chat: ChatCompletionRequest, id: String, model: LoadedModel, limits: GenerationLimits) throws -> GenerationPlan {
        let transcribes = model.capabilities.contains(.transcription) && !model.capabilities.contains(.chat)
        var request = transcribes
            ? try chat.transcription(for: model, maxAudioBytes: maxAudioBytes, maxWallMilliseconds: limits.maxWallMilliseconds)
            : chat.normalized(maxTokens: limits.maxTokens, maxWallMilliseconds: limits.maxWallMilliseconds)
        if request.tools?.isEmpty == true { request.tools = nil }
        let created = Int(Date().timeIntervalSince1970)
        let reply: GenerationPlan.Reply = chat.isStreaming
            ? .stream(ChatCompletionStreamEncoder(id: id, created: created, model: model.id, includeUsage: chat.streamOptions?.includeUsage ?? false,
                                                  includeProgress: !transcribes && chat.returnProgress == true))
            : .collect(Collected(ChatCompletionAccumulator()) { JSONResponse.bytes($0.response(id: id, created: created, model: model.id)) })
        return GenerationPlan(request: request, reply: reply, showsTranscriptAsContent: transcribes)
    }
}

extension ChatCompletionRequest {
    /// The request a transcribing model gets for this chat: its last `input_audio` part.
    func transcription(for model: LoadedModel, maxAudioBytes: Int, maxWallMilliseconds: Int) throws(APIError) -> NormalizedRequest {
        guard let messageIndex = messages.lastIndex(where: { !$0.audioParts.isEmpty }), let audio = messages[messageIndex].audioParts.last else {
            throw .invalidRequest("Model '\(model.id)' transcribes speech: send the audio as an 'input_audio' content part.",
                                  param: "messages", code: "unsupported_capability")
        }
        let param = "messages[\(messageIndex)].content"
        guard let bytes = Data(base64Encoded: audio.data, options: .ignoreUnknownCharacters), !bytes.isEmpty else {
            throw .invalidRequest("'input_audio.data' must be the audio file in base64.", param: param, code: "invalid_audio")
        }
        guard bytes.count <= maxAudioBytes else {
            throw APIError(status: 413, message: "The audio (\(bytes.count) bytes) exceeds the limit of \(maxAudioBytes) bytes.",
                           param: param, code: "file_too_large")
        }
        let mediaType = TranscriptionRequest.audioMediaType(forExtension: audio.format) ?? "audio/\(audio.format.lowercased())"
        return NormalizedRequest.transcription(of: ByteInput(name: "audio", mediaType: mediaType, bytes: [UInt8](bytes)),
                                               temperature: temperature, maxWallMilliseconds: maxWallMilliseconds)
    }
}
