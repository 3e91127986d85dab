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

    /// One open route per file of `WebAssets.pageFiles`: these paths and no others are public.
    var routes: [DeclaredRoute] {
        let assets = WebAssets.shared
        if assets.files.count < WebAssets.pageFiles.count {
            state.logger.warning("the web page's files are missing; / and /ui/ answer 404", metadata: [
                "looked_in": .string(WebAssets.directory().path),
            ])
        }
        return WebAssets.pageFiles.map { file in
            RouteGroup.openAI.get(file.path, access: .open) { _, _ in try assets.response(for: file.path) }
        }
    }
}

/// One of the page's files: the path it is served at, its name in the Web folder, and the
/// content type it goes out with.
struct PageFile: Sendable {
    let path: String
    let name: String
    let contentType: ContentType

    init(_ path: String, _ name: String, _ contentType: ContentType) {
        self.path = path
        self.name = name
        self.contentType = contentType
    }

    enum ContentType: String, Sendable {
        case html = "text/html; charset=utf-8"
        /// What a `<script type="module">` and its imports must be served as (a browser refuses
        /// a module script of any other type, and `nosniff` is on).
        case javaScript = "text/javascript; charset=utf-8"
        case css = "text/css; charset=utf-8"
        case svg = "image/svg+xml"
    }
}

/// The page's files, read once at start.
struct WebAssets: Sendable {
    /// Every file of the page, the one list the routes and the files read at start come from.
    /// app.js is the entry module; the other scripts are the modules it imports.
    static let pageFiles: [PageFile] = [
        PageFile("/", "index.html", .html),
        PageFile("/ui/app.js", "app.js", .javaScript),
        PageFile("/ui/page.js", "page.js", .javaScript),
        PageFile("/ui/api.js", "api.js", .javaScript),
        PageFile("/ui/models.js", "models.js", .javaScript),
        PageFile("/ui/conversations.js", "conversations.js", .javaScript),
        PageFile("/ui/transcript.js", "transcript.js", .javaScript),
        PageFile("/ui/run.js", "run.js", .javaScript),
        PageFile("/ui/audio.js", "audio.js", .javaScript),
        PageFile("/ui/markdown.js", "markdown.js", .javaScript),
        PageFile("/ui/style.css", "style.css", .css),
        PageFile("/ui/favicon.svg", "favicon.svg", .svg),
    ]

    /// The files found, by the path they are served at.
    let files: [String: WebFile]

    static let shared = WebAssets(directory: directory())

    static let pageHeaders: HTTPFields = [
        .contentSecurityPolicy: "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            + "media-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        .xContentTypeOptions: "nosniff",
        HTTPField.Name("Referrer-Policy")!: "no-referrer",
        HTTPField.Name("X-Frame-Options")!: "DENY",
        HTTPField.Name("Permissions-Policy")!: "microphone=(self), camera=(), geolocation=()",
        .cacheControl: "no-cache",
    ]

    init(directory: URL) {
        var files: [String: WebFile] = [:]
        for file in Self.pageFiles {
            guard let data = try? Data(contentsOf: directory.appendingPathComponent(file.name)) else { continue }
            files[file.path] = WebFile(bytes: [UInt8](data), contentType: file.contentType.rawValue)
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
