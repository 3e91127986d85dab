import Hummingbird
import PatchbayCore

/// Which error envelope a client expects, decided by the path it called.
enum Dialect {
    /// `{"error":{message,type,param,code}}` — the OpenAI routes.
    case openAI
    /// `{"type":"error","error":{type,message}}` — `/v1/messages`.
    case anthropic
    /// The OpenAI envelope plus FastAPI's `detail`, which Studio-style UIs read — `/api/*`.
    case studio

    init(path: String) {
        if path.hasPrefix("/v1/messages") {
            self = .anthropic
        } else if path.hasPrefix("/api/") {
            self = .studio
        } else {
            self = .openAI
        }
    }

    func response(for error: APIError) -> Response {
        var bytes: [UInt8]
        switch self {
        case .openAI: bytes = error.openAIEnvelope
        case .anthropic: bytes = error.anthropicEnvelope
        case .studio:
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
