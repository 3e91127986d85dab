import HTTPTypes
import Hummingbird

/// What a route is, declared where the route is: the error envelope its clients read, the
/// key it needs, its `route` label in the request metrics, and the bodies it takes. The
/// middlewares read these and nothing else; no path is sniffed.
struct RouteTraits: Sendable {
    enum Access: Sendable {
        /// No key: `/health` and the web page's files, which carry no data.
        case open
        /// The API key when one is set (the admin key works too).
        case inference
        /// The admin key when one is set, else the API key: routes that change what runs on
        /// the machine or reveal its files, and the metrics.
        case management
    }

    var dialect: Dialect
    var access: Access
    /// The path as declared, with `{id}` for a parameter; "unmatched" for unknown paths, so
    /// that scanners cannot make the label set grow without bound.
    var label: String
    /// A multipart form instead of JSON (OpenAI's audio upload).
    var takesMultipartForm = false
}

/// One route: where, what it is, and its handler.
struct DeclaredRoute: Sendable {
    typealias Handler = @Sendable (Request, PatchbayRequestContext) async throws -> Response

    var method: HTTPRequest.Method
    /// A Hummingbird path; a trailing `/**` takes the rest of the path (ids with slashes).
    var path: String
    var traits: RouteTraits
    var handler: Handler
}

/// Routes that share a dialect and, unless a route says otherwise, an access class. A group
/// may own a path prefix: an unknown path under it is answered in the group's dialect.
struct RouteGroup: Sendable {
    var dialect: Dialect
    var access: RouteTraits.Access
    var ownedPrefix: String?

    static let openAI = RouteGroup(dialect: .openAI, access: .inference)
    static let anthropic = RouteGroup(dialect: .anthropic, access: .inference, ownedPrefix: "/v1/messages")
    static let management = RouteGroup(dialect: .management, access: .inference, ownedPrefix: "/api")

    func get(_ path: String, label: String? = nil, access: RouteTraits.Access? = nil,
             _ handler: @escaping DeclaredRoute.Handler) -> DeclaredRoute {
        route(.get, path, label: label, access: access, multipart: false, handler)
    }

    func post(_ path: String, access: RouteTraits.Access? = nil, takesMultipartForm: Bool = false,
              _ handler: @escaping DeclaredRoute.Handler) -> DeclaredRoute {
        route(.post, path, label: nil, access: access, multipart: takesMultipartForm, handler)
    }

    private func route(_ method: HTTPRequest.Method, _ path: String, label: String?, access: RouteTraits.Access?, multipart: Bool,
                       _ handler: @escaping DeclaredRoute.Handler) -> DeclaredRoute {
        DeclaredRoute(method: method, path: path,
                      traits: RouteTraits(dialect: dialect, access: access ?? self.access, label: label ?? path, takesMultipartForm: multipart),
                      handler: handler)
    }
}

/// The declared routes by their path as Hummingbird reports it (`endpointPath`, set once
/// the router matched a route, before any middleware runs).
struct RouteTable: Sendable {
    private var byEndpoint: [String: RouteTraits] = [:]
    private var ownedPrefixes: [(prefix: String, dialect: Dialect)] = []

    init(_ routes: [DeclaredRoute], groups: [RouteGroup]) {
        for route in routes { byEndpoint[RouterPath(route.path).description] = route.traits }
        ownedPrefixes = groups.compactMap { group in group.ownedPrefix.map { ($0, group.dialect) } }
    }

    /// The traits of the route the router matched; for a request it matched none of,
    /// "unmatched" in the dialect of the group that owns the path's prefix, if any, and
    /// needing the API key.
    func traits(endpointPath: String?, path: String) -> RouteTraits {
        if let endpointPath, let traits = byEndpoint[endpointPath] { return traits }
        let dialect = ownedPrefixes.first { path == $0.prefix || path.hasPrefix($0.prefix + "/") }?.dialect ?? .openAI
        return RouteTraits(dialect: dialect, access: .inference, label: "unmatched")
    }
}
