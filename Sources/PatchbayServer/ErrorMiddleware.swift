import Hummingbird
import Logging
import PatchbayCore

/// The one place errors become responses: every failure leaves in the caller's dialect,
/// and nothing reaches a client as an opaque 500.
struct ErrorMiddleware: RouterMiddleware {
    typealias Context = PatchbayRequestContext
    let logger: Logger

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let dialect = context.route.dialect
        do {
            return try await next(request, context)
        } catch let error as APIError {
            return dialect.response(for: error)
        } catch let error as HostError {
            return dialect.response(for: APIError(error))
        } catch let error as any HTTPResponseError {
            return dialect.response(for: APIError(httpError: error, request: request))
        } catch {
            logger.error("unhandled error", metadata: ["path": .string(request.uri.path), "error": .string("\(error)")])
            return dialect.response(for: .internalError("The server failed to handle this request."))
        }
    }
}

extension APIError {
    /// Errors Hummingbird raises itself: unknown route, body over the limit, …
    init(httpError: any HTTPResponseError, request: Request) {
        let status = Int(httpError.status.code)
        switch status {
        case 404:
            self = .notFound("Unknown route: \(request.method) \(request.uri.path)", code: "unknown_route")
        case 405:
            self = APIError(status: 405, message: "Method \(request.method) is not allowed on \(request.uri.path).", code: "method_not_allowed")
        case 413:
            self = APIError(status: 413, message: "The request body is larger than this server accepts.", code: "request_too_large")
        default:
            self = APIError(status: status, message: httpError.status.reasonPhrase)
        }
    }
}
