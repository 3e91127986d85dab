import Foundation
import HTTPTypes
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `POST /v1/chat/completions`
struct ChatCompletionsRoutes {
    let state: ServerState

    func register(on router: Router<PatchbayRequestContext>) {
        router.post("/v1/chat/completions") { request, context in try await handle(request, connection: context.connection) }
    }

    func handle(_ request: Request, connection: ClientConnection?) async throws -> Response {
        let chat = try await state.decodeBody(ChatCompletionRequest.self, of: request)
        try chat.validate()
        let model = try state.models.model(named: chat.model)
        var normalized = chat.normalized(maxTokens: state.defaultMaxTokens(for: model), maxWallMilliseconds: state.maxWallMilliseconds)
        try state.check(normalized, against: model)
        if normalized.tools?.isEmpty == true { normalized.tools = nil }

        let id = "chatcmpl-\(randomHex(24))"
        let created = Int(Date().timeIntervalSince1970)
        let lease = try state.startRun(on: model, request: normalized, keys: [
            chat.cancelID.map(CancelRegistry.Key.cancelID), chat.sessionID.map(CancelRegistry.Key.session), .completion(id),
        ].compactMap { $0 }, connection: connection)

        guard chat.isStreaming else {
            let result = try await lease.collect()
            return JSONResponse.bytes(result.response(id: id, created: created, model: model.id))
        }

        let first = try await lease.firstEvents()
        let encoder = ChatCompletionStreamEncoder(id: id, created: created, model: model.id,
                                                  includeUsage: chat.streamOptions?.includeUsage ?? false,
                                                  includeProgress: chat.returnProgress ?? false)
        return lease.eventStream(startingWith: first, encoder: encoder)
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
        if request.hasImage && !model.capabilities.contains(.visionInput) {
            throw .invalidRequest("Image provided but model '\(model.id)' does not support vision.", param: "messages", code: "unsupported_capability")
        }
        if request.tools?.isEmpty == false && !model.capabilities.contains(.tools) {
            throw .invalidRequest("Model '\(model.id)' (backend '\(model.plugin.name)') does not support tools. For a GGUF model this means its chat template knows no tools; load it with a tool-aware 'chat_template_override'.", param: "tools", code: "unsupported_parameter")
        }
    }
}
