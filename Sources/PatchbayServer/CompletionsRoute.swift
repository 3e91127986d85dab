import Foundation
import PatchbayCore
import PatchbayHost

/// `POST /v1/completions`: a raw prompt, through a plugin's completion capability.
struct CompletionsRoute: GenerationRoute {
    static let idPrefix = "cmpl-"

    func plan(_ completion: CompletionRequest, id: String, model: LoadedModel, limits: GenerationLimits) throws -> GenerationPlan {
        let request = completion.normalized(maxTokens: limits.maxTokens, maxWallMilliseconds: limits.maxWallMilliseconds)
        let created = Int(Date().timeIntervalSince1970)
        let echo = completion.echo == true ? request.prompt : nil
        return GenerationPlan(request: request, reply: completion.isStreaming
            ? .stream(CompletionStreamEncoder(id: id, created: created, model: model.id,
                                              includeUsage: completion.streamOptions?.includeUsage ?? false, echo: echo))
            : .collect(Collected(ChatCompletionAccumulator()) {
                JSONResponse.bytes($0.completionResponse(id: id, created: created, model: model.id, echo: echo))
            }))
    }
}
