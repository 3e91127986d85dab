import Hummingbird
import PatchbayCore

/// Which error envelope a client expects: declared by the route group of the route it
/// called (`RouteGroup`).
enum Dialect: Sendable {
    /// `{"error":{message,type,param,code}}` — the OpenAI routes.
    case openAI
    /// `{"type":"error","error":{type,message}}` — `/v1/messages`.
    case anthropic
    /// The OpenAI envelope plus FastAPI's `detail`, which management UIs read — `/api/*`.
    case management

    /// The `dialect` label of the request metrics.
    var metricLabel: String {
        switch self {
        case .openAI: "openAI"
        case .anthropic: "anthropic"
        case .management: "management"
        }
    }

    func response(for error: APIError) -> Response {
        var bytes: [UInt8]
        switch self {
        case .openAI: bytes = error.openAIEnvelope
        case .anthropic: bytes = error.anthropicEnvelope
        case .management:
            bytes = error.openAIEnvelope
            bytes.removeLast()  // the closing brace: append "detail" beside "error"
            var detail = JSONWriter()
            detail.raw(",\"detail\":")
            detail.string(error.message)
            detail.raw("}")
            bytes += detail.bytes
        }
        var headers: HTTPFields = [.contentType: "application/json"]
        if let seconds = error.retryAfterSeconds { headers[.retryAfter] = String(seconds) }
        return Response(
            status: HTTPResponse.Status(code: error.status),
            headers: headers,
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}
