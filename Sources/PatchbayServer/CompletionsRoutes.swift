import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/completions`: a raw prompt, through a plugin's completion capability.
struct CompletionsRoutes {
    let state: ServerState

    func register(on router: Router<some RequestContext>) {
        router.post("/v1/completions") { request, _ in try await handle(request) }
    }

    func handle(_ request: Request) async throws -> Response {
        let body = try await request.collectBody(limit: state.configuration.maxBodyBytes)
        let completion = try RequestDecoding.decode(CompletionRequest.self, from: body)
        try completion.validate()
        let model = try state.models.model(named: completion.model)
        guard model.capabilities.contains(.completion) else {
            throw APIError.invalidRequest("Model '\(model.id)' (backend '\(model.plugin.name)') does not support raw completions.",
                                          param: "model", code: "unsupported_capability")
        }
        let normalized = completion.normalized(maxTokens: state.defaultMaxTokens(for: model),
                                               maxWallMilliseconds: state.maxWallMilliseconds)
        let id = "cmpl-\(randomHex(24))"
        let created = Int(Date().timeIntervalSince1970)
        let lease = try state.startRun(on: model, request: normalized, keys: [
            completion.cancelID.map(CancelRegistry.Key.cancelID), completion.sessionID.map(CancelRegistry.Key.session), .completion(id),
        ].compactMap { $0 })
        let echo = completion.echo == true ? normalized.prompt : nil

        guard completion.isStreaming else {
            var result = ChatCompletionAccumulator()
            try await lease.pump { events in events.forEach { result.add($0) } }
            if let error = result.error { throw error }
            return JSONResponse.bytes(result.completionResponse(id: id, created: created, model: model.id, echo: echo))
        }

        let first = try await lease.firstEvents()
        let encoder = CompletionStreamEncoder(id: id, created: created, model: model.id,
                                              includeUsage: completion.streamOptions?.includeUsage ?? false, echo: echo)
        return lease.eventStream(startingWith: first, encoder: encoder)
    }
}
