import Hummingbird
import PatchbayCore
import PatchbayHost

/// `GET /api/plugins`, `POST /api/plugins/load` — how a backend is added without a rebuild.
struct PluginsRoutes {
    let state: ServerState

    func register(on router: Router<some RequestContext>) {
        router.get("/api/plugins") { _, _ in
            JSONResponse.value(.object([
                ("plugins", .array(state.plugins.plugins.map(\.descriptor))),
                ("refused", .array(state.plugins.refusals.map { .object([("path", .string($0.path)), ("reason", .string($0.reason))]) })),
            ]))
        }
        router.post("/api/plugins/load") { request, _ in
            let load = try await state.decodeBody(PluginLoadRequest.self, of: request)
            do throws(PluginLoadError) {
                let plugin = try state.plugins.load(path: load.path)
                return JSONResponse.value(plugin.descriptor)
            } catch {
                let status = error.reason.hasPrefix("no such file") ? 404 : (error.reason.contains("already loaded") ? 409 : 400)
                throw APIError(status: status, message: "Plugin refused: \(error.description)", param: "path", code: "plugin_refused")
            }
        }
    }
}

extension Plugin {
    var descriptor: JSONValue {
        .object([
            ("name", .string(name)),
            ("version", .string(version)),
            ("abi_version", .string(abiVersion)),
            ("description", .string(summary)),
            ("model_formats", .array(modelFormats.map(JSONValue.string))),
            ("capabilities", .array(capabilities.names.map(JSONValue.string))),
            ("batching", .bool(isBatching)),
            ("path", .string(path)),
        ])
    }
}
