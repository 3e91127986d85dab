/// Why the host or an engine could not do what was asked, in the host's own terms: what
/// kind of failure it is, a sentence for the client, the field at fault and a
/// machine-readable code. Nothing here is HTTP: the server maps each kind to a status and
/// an envelope (`APIError.init(_:)`).
///
/// It lives beside `GenerationEvent`, which carries it when a run fails.
public struct HostError: Error, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// The request cannot be served as asked (a field, a capability, a file).
        case invalidRequest
        /// No such model or file.
        case notFound
        /// Not now, in this state: a model loading or with generations in flight, an alias taken.
        case conflict
        /// The run was cancelled.
        case cancelled
        /// Every slot is taken; worth trying again shortly.
        case busy
        /// Not serving for a while: shutting down, overloaded, timed out, an engine backing off.
        case unavailable
        /// The engine is gone or broke its contract.
        case engineFailed
        case outOfMemory
        /// Anything else the engine or the host reports (a load that failed).
        case failed
    }

    public var kind: Kind
    public var message: String
    /// The request field at fault, e.g. `model`.
    public var param: String?
    /// A machine-readable code, e.g. `model_not_found`.
    public var code: String?
    /// When trying again makes sense.
    public var retryAfterMilliseconds: Int?

    public init(_ kind: Kind, _ message: String, param: String? = nil, code: String? = nil, retryAfterMilliseconds: Int? = nil) {
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retryAfterMilliseconds = retryAfterMilliseconds
    }

    public static func invalidRequest(_ message: String, param: String? = nil, code: String? = nil) -> HostError {
        HostError(.invalidRequest, message, param: param, code: code)
    }

    public static func notFound(_ message: String, param: String? = nil, code: String? = nil) -> HostError {
        HostError(.notFound, message, param: param, code: code)
    }

    public static func conflict(_ message: String, code: String? = nil) -> HostError {
        HostError(.conflict, message, code: code)
    }
}

extension APIError {
    /// The status and envelope fields a client sees for a host error.
    public init(_ error: HostError) {
        let status = switch error.kind {
        case .invalidRequest: 400
        case .notFound: 404
        case .conflict: 409
        case .cancelled: 499
        case .busy: 429
        case .unavailable: 503
        case .engineFailed: 502
        case .outOfMemory: 507
        case .failed: 500
        }
        // Retry-After counts whole seconds, at least one.
        self.init(status: status, message: error.message, param: error.param, code: error.code,
                  retryAfterSeconds: error.retryAfterMilliseconds.map { max(1, ($0 + 999) / 1000) })
    }

    /// Any error a route meets, as the client sees it: what the host and the routes throw,
    /// or an opaque 500 for anything else.
    public init(from error: any Error) {
        switch error {
        case let error as APIError: self = error
        case let error as HostError: self.init(error)
        default: self = .internalError("The server failed to handle this request.")
        }
    }
}
