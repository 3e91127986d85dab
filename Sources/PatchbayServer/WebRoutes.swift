import Foundation
import HTTPTypes
import Hummingbird
import Logging
import PatchbayCore

/// The web chat page: `GET /` and its assets under `/ui/`, plain files from
/// `Sources/PatchbayServer/Web` (a SwiftPM resource of this target).
///
/// The page is a client like any other: it calls the same routes with the same keys, and no
/// route exists for it alone. Its files carry no data, so they are public GETs (AuthMiddleware
/// lets exactly these paths through). Every file goes out with a Content-Security-Policy that
/// allows scripts, styles and requests from this origin only, no inline script or style, and
/// no framing.
struct WebRoutes {
    let state: ServerState

    /// One open route per file: these paths and no others are public.
    var routes: [DeclaredRoute] {
        let assets = WebAssets.shared
        if assets.files.count < WebAssets.paths.count {
            state.logger.warning("the web page's files are missing; / and /ui/ answer 404", metadata: [
                "looked_in": .string(WebAssets.directory().path),
            ])
        }
        return WebAssets.paths.keys.sorted().map { path in
            RouteGroup.openAI.get(path, access: .open) { _, _ in try assets.response(for: path) }
        }
    }
}

/// The page's files, read once at start.
struct WebAssets: Sendable {
    /// Where each file is served, and its name in the Web folder.
    static let paths = [
        "/": "index.html", "/ui/app.js": "app.js", "/ui/markdown.js": "markdown.js", "/ui/style.css": "style.css",
        "/ui/favicon.svg": "favicon.svg",
    ]

    /// The files found, by the path they are served at.
    let files: [String: WebFile]

    static let shared = WebAssets(directory: directory())

    /// Whether `path` is one of the page's own files (public, like `/health`).
    static func isPagePath(_ path: String) -> Bool { paths[path] != nil }

    static let pageHeaders: HTTPFields = [
        .contentSecurityPolicy: "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            + "media-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        .xContentTypeOptions: "nosniff",
        HTTPField.Name("Referrer-Policy")!: "no-referrer",
        HTTPField.Name("X-Frame-Options")!: "DENY",
        HTTPField.Name("Permissions-Policy")!: "microphone=(self), camera=(), geolocation=()",
        .cacheControl: "no-cache",
    ]

    static let contentTypes = [
        "html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
        "svg": "image/svg+xml", "png": "image/png", "ico": "image/x-icon", "json": "application/json",
    ]

    init(directory: URL) {
        var files: [String: WebFile] = [:]
        for (path, name) in Self.paths {
            let url = directory.appendingPathComponent(name)
            guard let data = try? Data(contentsOf: url) else { continue }
            files[path] = WebFile(bytes: [UInt8](data), contentType: Self.contentTypes[url.pathExtension] ?? "application/octet-stream")
        }
        self.files = files
    }

    func response(for path: String) throws(APIError) -> Response {
        guard let file = files[path] else {
            throw .notFound("The web page's file for \(path) is missing from this installation.", code: "page_not_installed")
        }
        return file.response()
    }

    /// Where the Web folder is: in the resource bundle SwiftPM puts beside the executable
    /// (`.build/debug`, `.build/release`), through `Bundle.module`. That accessor traps when
    /// its bundle is missing (a binary copied away without it), so it is only touched once the
    /// bundle is known to be there; without it the server runs, minus the page.
    static func directory() -> URL {
        #if os(Linux)
        let bundleName = "patchbay_PatchbayServer.resources"
        #else
        let bundleName = "patchbay_PatchbayServer.bundle"
        #endif
        let besideExecutable = Bundle.main.bundleURL.appendingPathComponent(bundleName)
        guard isDirectory(besideExecutable) else { return besideExecutable.appendingPathComponent("Web") }
        return (Bundle.module.resourceURL ?? Bundle.module.bundleURL).appendingPathComponent("Web")
    }

    static func isDirectory(_ url: URL) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory) && isDirectory.boolValue
    }
}

struct WebFile: Sendable {
    let bytes: [UInt8]
    let contentType: String

    func response() -> Response {
        var headers = WebAssets.pageHeaders
        headers[.contentType] = contentType
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}
