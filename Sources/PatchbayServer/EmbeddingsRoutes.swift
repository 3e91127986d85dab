import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/embeddings`, through a plugin's embeddings capability.
struct EmbeddingsRoutes {
    let state: ServerState

    var routes: [DeclaredRoute] {
        [RouteGroup.openAI.post("/v1/embeddings") { request, _ in try await handle(request) }]
    }

    func handle(_ request: Request) async throws -> Response {
        let embeddings = try await state.decodeBody(EmbeddingsRequest.self, of: request)
        try embeddings.validate()
        let model = try await state.model(named: embeddings.model)
        var vectors: [[Float]] = []
        var promptTokens = 0
        for text in embeddings.input.values {
            vectors.append(try await model.embed(text))
            if model.capabilities.contains(.tokenize) {
                var prompt = NormalizedRequest(kind: .completion, maxTokens: 1, maxWallMilliseconds: 0)
                prompt.prompt = text
                promptTokens += (try? await model.countTokens(prompt)) ?? 0
            }
        }
        return JSONResponse.bytes(embeddings.response(vectors: vectors, model: model.id, promptTokens: promptTokens))
    }
}
