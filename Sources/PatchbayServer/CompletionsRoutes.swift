import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/completions`: a raw prompt, through a plugin's completion capability.
struct CompletionsRoutes {
    let state: ServerState

    func register(on router: Router<PatchbayRequestContext>) {
        router.post("/v1/completions") { request, context in try await handle(request, connection: context.connection) }
    }

    func handle(_ request: Request, connection: ClientConnection?) async throws -> Response {
        let completion = try await state.decodeBody(CompletionRequest.self, of: request)
        try completion.validate()
        return try await state.serve(model: completion.model, streaming: completion.isStreaming, dialect: .openAI) { model in
            try await respond(to: completion, with: model, connection: connection)
        }
    }

    func respond(to completion: CompletionRequest, with model: LoadedModel, connection: ClientConnection?) async throws -> Response {
        let normalized = completion.normalized(maxTokens: state.defaultMaxTokens(for: model),
                                               maxWallMilliseconds: state.maxWallMilliseconds)
        try state.check(normalized, against: model)
        let id = "cmpl-\(randomHex(24))"
        let created = Int(Date().timeIntervalSince1970)
        let pending = try state.enterQueue(on: model, request: normalized, keys: [
            completion.cancelID.map(CancelRegistry.Key.cancelID), completion.sessionID.map(CancelRegistry.Key.session), .completion(id),
        ].compactMap { $0 }, connection: connection)
        let echo = completion.echo == true ? normalized.prompt : nil

        guard completion.isStreaming else {
            let result = try await pending.run().collect()
            return JSONResponse.bytes(result.completionResponse(id: id, created: created, model: model.id, echo: echo))
        }

        let encoder = CompletionStreamEncoder(id: id, created: created, model: model.id,
                                              includeUsage: completion.streamOptions?.includeUsage ?? false, echo: echo)
        return try await pending.stream(encoder: encoder)
    }
}
