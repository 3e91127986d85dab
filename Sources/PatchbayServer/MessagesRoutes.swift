import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/messages` (Anthropic). Its ids are message ids (`message_id` cancels).
struct MessagesRoute: GenerationRoute {
    static let idPrefix = "msg_"

    func plan(_ messages: AnthropicMessagesRequest, id: String, model: LoadedModel, limits: GenerationLimits) throws -> GenerationPlan {
        let request = try messages.normalized(maxWallMilliseconds: limits.maxWallMilliseconds)
        return GenerationPlan(request: request, reply: messages.isStreaming
            ? .stream(AnthropicStreamEncoder(id: id, model: model.id))
            : .collect(Collected(ChatCompletionAccumulator()) { JSONResponse.bytes($0.anthropicResponse(id: id, model: model.id)) }))
    }
}

extension ServerState {
    /// `POST /v1/messages/count_tokens`
    func countTokens(_ request: Request) async throws -> Response {
        let count = try await decodeBody(AnthropicCountTokensRequest.self, of: request)
        let model = try await model(named: count.model)
        let normalized = try count.normalized()
        try check(normalized, against: model)
        let tokens = try await model.countTokens(normalized)
        return JSONResponse.value(.object([("input_tokens", .int(Int64(tokens)))]))
    }
}
