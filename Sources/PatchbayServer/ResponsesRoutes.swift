import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/responses` (OpenAI Responses). Nothing is stored: each request carries its
/// whole conversation in `input`.
struct ResponsesRoutes {
    let state: ServerState

    func register(on router: Router<PatchbayRequestContext>) {
        router.post("/v1/responses") { request, context in try await handle(request, connection: context.connection) }
    }

    func handle(_ request: Request, connection: ClientConnection?) async throws -> Response {
        let responses = try await state.decodeBody(ResponsesRequest.self, of: request)
        try responses.validate()
        return try await state.serve(model: responses.model, streaming: responses.isStreaming, dialect: .openAI) { model in
            try await respond(to: responses, with: model, connection: connection)
        }
    }

    func respond(to responses: ResponsesRequest, with model: LoadedModel, connection: ClientConnection?) async throws -> Response {
        let normalized = try responses.normalized(maxTokens: state.defaultMaxTokens(for: model),
                                                  maxWallMilliseconds: state.maxWallMilliseconds)
        try state.check(normalized, against: model)

        let id = "resp_\(randomHex(24))"
        let pending = try state.enterQueue(on: model, request: normalized, keys: [
            responses.cancelID.map(CancelRegistry.Key.cancelID), responses.sessionID.map(CancelRegistry.Key.session), .completion(id),
        ].compactMap { $0 }, connection: connection)
        let response = ResponseState(id: id, model: model.id, createdAt: Int(Date().timeIntervalSince1970))

        guard responses.isStreaming else {
            var result = response
            try await pending.run().pump { events in events.forEach { result.add($0) } }
            if let error = result.error { throw error }
            return JSONResponse.bytes(result.json)
        }
        return try await pending.stream(encoder: ResponsesStreamEncoder(state: response))
    }
}
