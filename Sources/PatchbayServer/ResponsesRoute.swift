import Foundation
import PatchbayCore
import PatchbayHost

/// `POST /v1/responses` (OpenAI Responses). Nothing is stored: each request carries its
/// whole conversation in `input`.
struct ResponsesRoute: GenerationRoute {
    static let idPrefix = "resp_"

    func plan(_ responses: ResponsesRequest, id: String, model: LoadedModel, limits: GenerationLimits) throws -> GenerationPlan {
        let request = try responses.normalized(maxTokens: limits.maxTokens, maxWallMilliseconds: limits.maxWallMilliseconds)
        let response = ResponseState(id: id, model: model.id, createdAt: Int(Date().timeIntervalSince1970))
        return GenerationPlan(request: request, reply: responses.isStreaming
            ? .stream(ResponsesStreamEncoder(state: response))
            : .collect(Collected(response) { JSONResponse.bytes($0.json) }))
    }
}
