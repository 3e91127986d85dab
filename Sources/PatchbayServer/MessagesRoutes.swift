import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/messages` and `POST /v1/messages/count_tokens` (Anthropic). Errors on these
/// paths are written in Anthropic's envelope by the error middleware.
struct MessagesRoutes {
    let state: ServerState

    func register(on router: Router<PatchbayRequestContext>) {
        router.post("/v1/messages") { request, context in try await messages(request, connection: context.connection) }
        router.post("/v1/messages/count_tokens") { request, _ in try await countTokens(request) }
    }

    func messages(_ request: Request, connection: ClientConnection?) async throws -> Response {
        let messages = try await state.decodeBody(AnthropicMessagesRequest.self, of: request)
        try messages.validate()
        return try await state.serve(model: messages.model, streaming: messages.isStreaming, dialect: .anthropic) { model in
            try await respond(to: messages, with: model, connection: connection)
        }
    }

    func respond(to messages: AnthropicMessagesRequest, with model: LoadedModel, connection: ClientConnection?) async throws -> Response {
        let normalized = try messages.normalized(maxWallMilliseconds: state.maxWallMilliseconds)
        try state.check(normalized, against: model)

        // Every run is cancellable by cancel_id, session_id and its message id, streaming or not.
        let id = "msg_\(randomHex(24))"
        let pending = try state.enterQueue(on: model, request: normalized, keys: [
            messages.cancelID.map(CancelRegistry.Key.cancelID), messages.sessionID.map(CancelRegistry.Key.session), .message(id),
        ].compactMap { $0 }, connection: connection)

        guard messages.isStreaming else {
            let result = try await pending.run().collect()
            return JSONResponse.bytes(result.anthropicResponse(id: id, model: model.id))
        }

        let encoder = AnthropicStreamEncoder(id: id, model: model.id)
        return try await pending.stream(encoder: encoder)
    }

    func countTokens(_ request: Request) async throws -> Response {
        let count = try await state.decodeBody(AnthropicCountTokensRequest.self, of: request)
        let model = try await state.model(named: count.model)
        let normalized = try count.normalized()
        try state.check(normalized, against: model)
        let tokens = try await model.countTokens(normalized)
        return JSONResponse.value(.object([("input_tokens", .int(Int64(tokens)))]))
    }
}
