import HTTPTypes
import Hummingbird
import PatchbayCore

/// When an API key is configured, accepts it as `Authorization: Bearer <key>` (OpenAI SDK)
/// or `x-api-key: <key>` (Anthropic SDK). `/health` stays open for probes.
struct AuthMiddleware<Context: RequestContext>: RouterMiddleware {
    let apiKey: String

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        if request.uri.path == "/health" { return try await next(request, context) }
        let bearer = request.headers[.authorization].flatMap { value -> String? in
            value.lowercased().hasPrefix("bearer ") ? String(value.dropFirst(7)) : nil
        }
        let headerKey = request.headers[HTTPField.Name("x-api-key")!]
        guard bearer == apiKey || headerKey == apiKey else {
            throw APIError(status: 401, message: "Invalid or missing API key.", code: "invalid_api_key")
        }
        return try await next(request, context)
    }
}
