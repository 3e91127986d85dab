import HTTPTypes
import Hummingbird
import PatchbayCore

/// Checks API keys, sent as `Authorization: Bearer <key>` (OpenAI SDK) or `x-api-key: <key>`
/// (Anthropic SDK), by the access class each route declares (`RouteTraits.Access`):
///
/// - open routes (`/health`, the web page's files: no data) need no key; the page asks for
///   one when an API call needs it;
/// - inference routes need the API key when one is set (the admin key is accepted too);
/// - management routes (load, unload, validate, plugins, metrics) need the admin key when
///   one is set, else the API key when that is set.
struct AuthMiddleware: RouterMiddleware {
    typealias Context = PatchbayRequestContext
    let apiKey: String?
    let adminKey: String?

    init(apiKey: String?, adminKey: String?) {
        self.apiKey = apiKey.flatMap { $0.isEmpty ? nil : $0 }
        self.adminKey = adminKey.flatMap { $0.isEmpty ? nil : $0 }
    }

    var isEnabled: Bool { apiKey != nil || adminKey != nil }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let access = context.route.access
        if access == .open { return try await next(request, context) }
        let presented = Self.presentedKeys(request.headers)
        func matches(_ key: String?) -> Bool {
            guard let key else { return false }
            return presented.contains { constantTimeEquals($0, key) }
        }
        if access == .management, let adminKey {
            guard matches(adminKey) else {
                throw APIError(status: 401, message: "This route needs the admin key.", code: "invalid_api_key")
            }
        } else if let apiKey {
            guard matches(apiKey) || matches(adminKey) else {
                throw APIError(status: 401, message: "Invalid or missing API key.", code: "invalid_api_key")
            }
        }
        return try await next(request, context)
    }

    static func presentedKeys(_ headers: HTTPFields) -> [String] {
        let bearer = headers[.authorization].flatMap { $0.lowercased().hasPrefix("bearer ") ? String($0.dropFirst(7)) : nil }
        return [bearer, headers[HTTPField.Name("x-api-key")!]].compactMap { $0 }
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// an attacker how much of a guessed key was right.
func constantTimeEquals(_ a: String, _ b: String) -> Bool {
    let x = Array(a.utf8), y = Array(b.utf8)
    var difference = UInt8(x.count == y.count ? 0 : 1)
    for index in 0..<max(x.count, y.count) {
        difference |= (index < x.count ? x[index] : 0) ^ (index < y.count ? y[index] : 0)
    }
    return difference == 0
}
