import Hummingbird
import PatchbayCore
import PatchbayHost

/// `GET /v1/models`, `GET /v1/models/{id}`
struct ModelsRoutes {
    let state: ServerState

    var routes: [DeclaredRoute] {
        [listing, oneModel]
    }

    /// Loaded models, then (with --models-dir) those a request can load by naming them.
    private var listing: DeclaredRoute {
        RouteGroup.openAI.get("/v1/models") { _, _ in
            let loaded = state.models.models
            let available = state.availableModels.filter { file in !loaded.contains { $0.id == file.id } }
            return JSONResponse.value(.object([
                ("object", .string("list")),
                ("data", .array(loaded.map(\.openAIModelObject) + available.map(\.openAIModelObject))),
            ]))
        }
    }

    /// `**` so that an id with slashes ("org/model") is one model id.
    private var oneModel: DeclaredRoute {
        RouteGroup.openAI.get("/v1/models/**", label: "/v1/models/{id}") { _, context in
            let id = context.parameters.getCatchAll().joined(separator: "/")
            guard let model = state.models.models.first(where: { $0.id == id }) else {
                throw APIError(status: 404, message: "The model '\(id)' does not exist or is not loaded.", param: "model", code: "model_not_found")
            }
            return JSONResponse.value(model.openAIModelObject)
        }
    }
}

extension ServerState.AvailableModel {
    /// A model `--models-dir` offers that is not loaded: `"loaded": false`.
    var openAIModelObject: JSONValue {
        .object([
            ("id", .string(id)),
            ("object", .string("model")),
            ("created", .int(0)),
            ("owned_by", .string("patchbay")),
            ("loaded", .bool(false)),
            ("backend", .string(backend)),
        ])
    }
}

extension LoadedModel {
    var openAIModelObject: JSONValue {
        .object([
            ("id", .string(id)),
            ("object", .string("model")),
            ("created", .int(Int64(loadedAt.timeIntervalSince1970))),
            ("owned_by", .string("patchbay")),
            ("loaded", .bool(true)),
            ("keep_alive_seconds", keepAlive.map { .int($0.components.seconds) } ?? .int(-1)),
            ("backend", .string(plugin.name)),
            ("context_length", contextLength.map { .int(Int64($0)) } ?? .null),
            ("capabilities", .array(capabilities.names.map(JSONValue.string))),
        ] + detailMembers)
    }

    /// What a client or UI may want to know about the model beyond its context; null where
    /// the backend does not say. Shared by `/v1/models` and `/api/inference/status`.
    var detailMembers: [(key: String, value: JSONValue)] {
        func number(_ value: Int?) -> JSONValue { value.map { .int(Int64($0)) } ?? .null }
        return [
            ("parallel_slots", number(details.parallelSlots)),
            ("embedding_dimensions", number(details.embeddingDimensions)),
            ("training_context_length", number(details.trainingContextLength)),
            ("parameter_count", number(details.parameterCount)),
            ("size_bytes", details.sizeBytes.map { .int(Int64(clamping: $0)) } ?? .null),
            ("architecture", details.architecture.map(JSONValue.string) ?? .null),
            ("supports_tools", .bool(capabilities.contains(.tools))),
            ("supports_reasoning", .bool(capabilities.contains(.reasoning))),
        ]
    }
}
