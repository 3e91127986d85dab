import Foundation
import Hummingbird
import PatchbayCore
import PatchbayHost

/// `GET /api/plugins`, `POST /api/plugins/load` — how a backend is added without a rebuild.
struct PluginsRoutes {
    let state: ServerState

    var routes: [DeclaredRoute] {
        [RouteGroup.management.get("/api/plugins", access: .management) { _, _ in
            JSONResponse.value(.object([
                ("plugins", .array(state.plugins.plugins.map(\.descriptor))),
                ("refused", .array(state.plugins.refusals.map { .object([("path", .string($0.path)), ("reason", .string($0.reason))]) })),
            ]))
        },
        RouteGroup.management.post("/api/plugins/load", access: .management) { request, _ in
            let load = try await state.decodeBody(PluginLoadRequest.self, of: request)
            let path = try pluginPath(load.path)
            do throws(PluginLoadError) {
                let plugin = try state.plugins.load(path: path)
                return JSONResponse.value(plugin.descriptor)
            } catch {
                let status = error.reason.hasPrefix("no such file") ? 404 : (error.reason.contains("already loaded") ? 409 : 400)
                throw APIError(status: status, message: "Plugin refused: \(error.description)", param: "path", code: "plugin_refused")
            }
        }]
    }
}

extension PluginsRoutes {
    /// Opening a library runs its code, so only the operator chooses which: a library loads
    /// only from a `--plugin-dir` folder (a bare file name is looked up in them), never
    /// from a path a request makes up. Checked before anything touches the file.
    func pluginPath(_ requested: String) throws(APIError) -> String {
        let directories = state.configuration.pluginDirectories.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        let refusal = APIError(
            status: 403,
            message: "Plugins load only from the --plugin-dir folders (\(directories.isEmpty ? "none given" : directories.joined(separator: ", "))); copy the library there first.",
            param: "path", code: "plugin_path_not_allowed")
        if !requested.contains("/") {
            guard !requested.isEmpty, requested != ".", requested != "..",
                  let directory = directories.first(where: { FileManager.default.fileExists(atPath: $0 + "/" + requested) }) ?? directories.first
            else { throw refusal }
            return directory + "/" + requested
        }
        let path = URL(fileURLWithPath: requested).standardizedFileURL
        guard requested.hasPrefix("/"), directories.contains(path.deletingLastPathComponent().path) else { throw refusal }
        return path.path
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
