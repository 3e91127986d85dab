import Foundation
import HTTPTypes
import Hummingbird
import PatchbayCore

/// Keeps web pages the user happens to open from driving the server.
///
/// - `Host` must name this server (DNS rebinding sends the attacker's name).
/// - A request from a page (`Origin`) of another origin is refused unless the operator
///   allowed that origin (`--cors-origins`), which also answers CORS preflights.
/// - A POST must say its body is JSON. A page can send `text/plain`, form or
///   multipart bodies cross-site without a preflight; a JSON content type it cannot.
///   The one exception is a route that takes a multipart form (OpenAI's audio upload):
///   there the `Origin` check above is what stops a page (browsers send `Origin` on every
///   cross-origin POST, forms included).
///
/// Refusals are thrown, and written by `ErrorMiddleware` in the route's dialect.
struct RequestGuard: RouterMiddleware {
    typealias Context = PatchbayRequestContext
    let policy: OriginPolicy

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // HTTP/1's Host header arrives as the request's authority.
        let host = request.head.authority
        if let host, !policy.allowsHost(host) {
            throw APIError(status: 403, message: "Host '\(host)' is not allowed. Start patchbay with --allowed-hosts \(OriginPolicy.hostName(host)) to serve it.",
                           code: "host_not_allowed")
        }
        if let origin = request.headers[.origin] {
            if policy.allowsCrossOrigin(origin) {
                if request.method == .options, request.headers[.accessControlRequestMethod] != nil {
                    var response = Response(status: .noContent)
                    policy.addPreflightHeaders(to: &response.headers, requestedHeaders: request.headers[.accessControlRequestHeaders])
                    return response
                }
            } else if !OriginPolicy.isSameOrigin(origin, host: host) {
                throw APIError(status: 403, message: "Requests from web pages at '\(origin)' are not allowed. Start patchbay with --cors-origins \(origin) to allow them.",
                               code: "origin_not_allowed")
            }
        }
        let contentType = request.headers[.contentType]
        if request.method == .post, !Self.isJSON(contentType), !(context.route.takesMultipartForm && Self.isMultipartForm(contentType)) {
            throw APIError(status: 415, message: "Content-Type must be application/json (got \(contentType.map { "'\($0)'" } ?? "none")).",
                           code: "unsupported_media_type")
        }
        return try await next(request, context)
    }

    static func isMultipartForm(_ contentType: String?) -> Bool {
        contentType?.lowercased().hasPrefix("multipart/form-data") ?? false
    }

    /// `application/json`, with parameters (`; charset=utf-8`), or a `+json` type.
    static func isJSON(_ contentType: String?) -> Bool {
        guard let contentType else { return false }
        let mediaType = contentType.split(separator: ";", maxSplits: 1).first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
        return mediaType == "application/json" || (mediaType.hasPrefix("application/") && mediaType.hasSuffix("+json"))
    }
}

/// Lets an allowed origin's pages read every answer, refusals and errors included: it sits
/// outside the error middleware, so it sees each request's final response.
struct CORSHeaders: RouterMiddleware {
    typealias Context = PatchbayRequestContext
    let policy: OriginPolicy

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var response = try await next(request, context)
        if let origin = request.headers[.origin], policy.allowsCrossOrigin(origin),
           request.head.authority.map(policy.allowsHost) ?? true {
            policy.addHeaders(to: &response.headers, origin: origin)
        }
        return response
    }
}

/// Which `Host` names and web origins the operator allows.
struct OriginPolicy: Sendable {
    /// The address the server is bound to (`--host`).
    var boundHost: String
    var allowedHosts: [String]
    var corsOrigins: [String]

    /// Loopback names and addresses always; the bound address; with a wildcard bind
    /// (0.0.0.0, ::) any IP address, since clients reach the machine by its addresses
    /// (a rebinding attack needs a DNS name); and the operator's names.
    func allowsHost(_ hostHeader: String) -> Bool {
        let name = Self.hostName(hostHeader)
        if name == "localhost" || name.hasSuffix(".localhost") || Self.isLoopbackAddress(name) { return true }
        let bound = boundHost.lowercased().trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        if name == bound { return true }
        if ["0.0.0.0", "::", ""].contains(bound), Self.isIPAddress(name) { return true }
        return allowedHosts.contains { pattern in
            let pattern = pattern.lowercased()
            if pattern == "*" { return true }
            if pattern.hasPrefix("*.") { return name.hasSuffix(pattern.dropFirst()) }
            return name == pattern
        }
    }

    func allowsCrossOrigin(_ origin: String) -> Bool {
        corsOrigins.contains { $0 == "*" || $0.lowercased() == origin.lowercased() }
    }

    /// A page served by this server itself (same scheme-less host and port).
    static func isSameOrigin(_ origin: String, host: String?) -> Bool {
        guard let host, let url = URL(string: origin), let originHost = url.host, ["http", "https"].contains(url.scheme ?? "") else { return false }
        let originAuthority = (originHost.contains(":") ? "[\(originHost)]" : originHost) + (url.port.map { ":\($0)" } ?? "")
        return originAuthority.lowercased() == host.lowercased()
    }

    func addHeaders(to headers: inout HTTPFields, origin: String) {
        headers[.accessControlAllowOrigin] = origin
        headers[.vary] = "Origin"
        headers[.accessControlExposeHeaders] = "Retry-After"
    }

    /// What a preflight answer adds to the headers every answer to the origin gets (`CORSHeaders`).
    func addPreflightHeaders(to headers: inout HTTPFields, requestedHeaders: String?) {
        headers[.accessControlAllowMethods] = "GET, POST, OPTIONS"
        headers[.accessControlAllowHeaders] = requestedHeaders ?? "authorization, content-type, x-api-key, anthropic-version"
        headers[.accessControlMaxAge] = "600"
    }

    /// The name in a `Host` header, lowercased, without port or IPv6 brackets.
    static func hostName(_ hostHeader: String) -> String {
        let value = hostHeader.lowercased()
        if value.hasPrefix("["), let end = value.firstIndex(of: "]") {
            return String(value[value.index(after: value.startIndex)..<end])
        }
        if value.filter({ $0 == ":" }).count == 1, let colon = value.firstIndex(of: ":") { return String(value[..<colon]) }
        return value
    }

    static func isIPAddress(_ name: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, name, &v4) == 1 || inet_pton(AF_INET6, name, &v6) == 1
    }

    static func isLoopbackAddress(_ name: String) -> Bool {
        var v4 = in_addr()
        if inet_pton(AF_INET, name, &v4) == 1 { return UInt32(bigEndian: v4.s_addr) >> 24 == 127 }
        return name == "::1"
    }
}
