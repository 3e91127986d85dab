import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// The model-management routes under `/api/inference`: load, unload, validate,
/// status, load-progress, and the cancel route (deliberately not under `/v1`).
struct InferenceRoutes {
    let state: ServerState

    var routes: [DeclaredRoute] {
        let group = RouteGroup.management
        return [
            group.post("/api/inference/load", access: .management) { request, _ in try await load(request) },
            group.post("/api/inference/unload", access: .management) { request, _ in try await unload(request) },
            group.post("/api/inference/validate", access: .management) { request, _ in try await validate(request) },
            group.get("/api/inference/status") { _, _ in status() },
            group.get("/api/inference/load-progress") { request, _ in
                progress(state.models.loadProgress(modelID: request.uri.queryParameters["model"].map(String.init)))
            },
            group.post("/api/inference/cancel") { request, _ in try await cancel(request) },
        ]
    }

    private func load(_ request: Request) async throws -> Response {
        if state.isStopping { throw ModelRegistry.shuttingDown }
        let body = try await request.collectBody(limit: state.configuration.maxBodyBytes)
        let load = try RequestDecoding.decode(LoadModelRequest.self, from: body)
        try load.validate()
        let raw = try RequestDecoding.decode(JSONValue.self, from: body)
        let started = ContinuousClock.now
        let model: LoadedModel, alreadyLoaded: Bool
        do {
            (model, alreadyLoaded) = try await state.models.load(load, body: raw)
        } catch {
            state.metrics.modelLoad(backend: load.backend ?? "auto", succeeded: false, duration: .now - started)
            throw error
        }
        if !alreadyLoaded { state.metrics.modelLoad(backend: model.plugin.name, succeeded: true, duration: .now - started) }
        // A load of a model already loaded changes its keep_alive only when it names one.
        if let keepAlive = load.keepAlive {
            model.keepAlive = keepAlive.idleLimit
        } else if !alreadyLoaded {
            model.keepAlive = state.configuration.modelKeepAlive
        }
        var summary = model.statusObject
        if case .object(var members) = summary {
            members.insert(("status", .string(alreadyLoaded ? "already_loaded" : "loaded")), at: 0)
            summary = .object(members)
        }
        return JSONResponse.value(summary)
    }

    private func unload(_ request: Request) async throws -> Response {
        let unload = try await state.decodeBody(ModelReferenceRequest.self, of: request)
        if unload.forceCancelActive == true, let model = try? state.models.model(named: unload.modelPath) {
            state.metrics.cancelled(.unload, count: model.unfinishedRunCount)
        }
        let id = try await state.models.unload(named: unload.modelPath, forceCancelActive: unload.forceCancelActive ?? false)
        return JSONResponse.value(.object([("status", .string("unloaded")), ("model", .string(id))]))
    }

    /// Checks that a model could be loaded (file exists, a plugin claims it) without loading weights.
    private func validate(_ request: Request) async throws -> Response {
        let target = try await state.decodeBody(ModelReferenceRequest.self, of: request)
        let path = target.modelPath
        do {
            try ModelRegistry.checkModelFile(path)
        } catch {
            throw APIError(status: 400, message: error.message, param: "model_path", code: error.code)  // a missing file is a 400 here, as management UIs expect
        }
        let plugin = try state.models.resolvePlugin(modelPath: path, backend: target.backend)
        let url = URL(fileURLWithPath: path)
        return JSONResponse.value(.object([
            ("valid", .bool(true)),
            ("message", .string("'\(url.lastPathComponent)' can be loaded by the '\(plugin.name)' backend.")),
            ("identifier", .string(path)),
            ("display_name", .string(url.deletingPathExtension().lastPathComponent)),
            ("is_gguf", .bool(url.pathExtension.lowercased() == "gguf")),
            ("is_lora", .bool(false)),
            ("is_vision", .bool(plugin.capabilities.contains(.visionInput))),
            ("backend", .string(plugin.name)),
        ]))
    }

    private func status() -> Response {
        let models = state.models.models
        let active = models.first
        return JSONResponse.value(.object([
            ("active_model", active.map { .string($0.id) } ?? .null),
            ("is_gguf", .bool(active.map { $0.modelPath.lowercased().hasSuffix(".gguf") } ?? false)),
            ("context_length", active?.contextLength.map { .int(Int64($0)) } ?? .null),
            ("loaded", .array(models.map { .string($0.id) })),
            ("loading", .array(state.models.loadingIDs.map(JSONValue.string))),
            ("models", .array(models.map(\.statusObject))),
            ("active_generations", .int(Int64(state.cancels.liveRunCount))),
        ]))
    }

    private func progress(_ progress: ModelRegistry.LoadProgress) -> Response {
        JSONResponse.value(.object([
            ("model", progress.modelID.map(JSONValue.string) ?? .null),
            ("phase", progress.phase.map(JSONValue.string) ?? .null),
            ("bytes_loaded", .int(Int64(progress.bytesLoaded))),
            ("bytes_total", .int(Int64(progress.bytesTotal))),
            ("fraction", .double(progress.fraction)),
        ]))
    }

    /// `{"cancelled": N}`. A body that is not a JSON object, or names no usable key,
    /// cancels nothing — it never means "cancel everything".
    private func cancel(_ request: Request) async throws -> Response {
        let body = try await request.collectBody(limit: 64 * 1024)
        let json = (try? JSONDecoder().decode(JSONValue.self, from: body)) ?? .null
        func key(_ name: String) -> String? { json[name]?.stringValue.flatMap { $0.isEmpty ? nil : $0 } }
        let cancelled = state.cancels.cancel(CancelRegistry.Target(
            cancelID: key("cancel_id"), sessionID: key("session_id"), completionID: key("completion_id") ?? key("response_id"), messageID: key("message_id")))
        state.metrics.cancelled(.api, count: cancelled)
        return JSONResponse.value(.object([("cancelled", .int(Int64(cancelled)))]))
    }
}

extension LoadedModel {
    var statusObject: JSONValue {
        .object([
            ("model", .string(id)),
            ("model_path", .string(modelPath)),
            ("backend", .string(plugin.name)),
            ("context_length", contextLength.map { .int(Int64($0)) } ?? .null),
            ("is_gguf", .bool(modelPath.lowercased().hasSuffix(".gguf"))),
            ("is_vision", .bool(capabilities.contains(.visionInput))),
            ("capabilities", .array(capabilities.names.map(JSONValue.string))),
            ("active_generations", .int(Int64(activeRunCount))),
        ] + detailMembers)
    }
}
