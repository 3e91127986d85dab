/// An error a client sees: an HTTP status plus the fields both dialects' envelopes carry.
///
/// Everything that can go wrong on a request ends up as one of these; the server maps it
/// to the OpenAI envelope `{"error":{message,type,param,code}}` or the Anthropic envelope
/// `{"type":"error","error":{type,message}}` in one place.
public struct APIError: Error, Sendable, Equatable {
    public var status: Int
    public var message: String
    /// The request field at fault (OpenAI's `param`), e.g. `messages[1].content`.
    public var param: String?
    /// A machine-readable code (OpenAI's `code`), e.g. `model_not_found`.
    public var code: String?
    /// When the client may try again (the `Retry-After` header), for 429 and 503.
    public var retryAfterSeconds: Int?

    public init(status: Int, message: String, param: String? = nil, code: String? = nil, retryAfterSeconds: Int? = nil) {
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retryAfterSeconds = retryAfterSeconds
    }

    public static func invalidRequest(_ message: String, param: String? = nil, code: String? = nil) -> APIError {
        APIError(status: 400, message: message, param: param, code: code)
    }

    public static func notFound(_ message: String, code: String? = nil) -> APIError {
        APIError(status: 404, message: message, code: code)
    }

    public static func conflict(_ message: String, code: String? = nil) -> APIError {
        APIError(status: 409, message: message, code: code)
    }

    public static func internalError(_ message: String) -> APIError {
        APIError(status: 500, message: message, code: "internal_error")
    }

    /// OpenAI's `type` for this status.
    public var openAIType: String {
        switch status {
        case 401: "authentication_error"
        case 403: "permission_error"
        case 404: "not_found_error"
        case 409: "conflict_error"
        case 429: "rate_limit_error"
        case 400..<500: "invalid_request_error"
        default: "server_error"
        }
    }

    /// Anthropic's `type` for this status.
    public var anthropicType: String {
        switch status {
        case 401: "authentication_error"
        case 403: "permission_error"
        case 404: "not_found_error"
        case 413: "request_too_large"
        case 429: "rate_limit_error"
        case 503, 529: "overloaded_error"
        case 400..<500: "invalid_request_error"
        default: "api_error"
        }
    }

    /// `{"error":{"message","type","param","code"}}`
    public var openAIEnvelope: [UInt8] {
        var out = JSONWriter()
        out.raw("{\"error\":{\"message\":")
        out.string(message)
        out.raw(",\"type\":")
        out.string(openAIType)
        out.raw(",\"param\":")
        out.optionalString(param)
        out.raw(",\"code\":")
        out.optionalString(code)
        out.raw("}}")
        return out.bytes
    }

    /// `{"type":"error","error":{"type","message"}}`
    public var anthropicEnvelope: [UInt8] {
        var out = JSONWriter()
        out.raw("{\"type\":\"error\",\"error\":{\"type\":")
        out.string(anthropicType)
        out.raw(",\"message\":")
        out.string(message)
        out.raw("}}")
        return out.bytes
    }
}
