import Foundation
import Hummingbird
import PatchbayCore

extension Request {
    /// The body, refused with 413 past the configured limit (checked against
    /// Content-Length first, so an oversized upload is not read at all).
    func collectBody(limit: Int) async throws -> Data {
        if let length = headers[.contentLength].flatMap(Int.init), length > limit {
            throw APIError(status: 413, message: "The request body (\(length) bytes) exceeds the limit of \(limit) bytes.",
                           code: "request_too_large")
        }
        do {
            let buffer = try await body.collect(upTo: limit)
            return Data(buffer.readableBytesView)
        } catch let error as any HTTPResponseError where error.status == .contentTooLarge {
            throw APIError(status: 413, message: "The request body exceeds the limit of \(limit) bytes.", code: "request_too_large")
        } catch {
            // The client's fault: a body shorter than its Content-Length, broken chunked
            // framing, a transfer coding this server does not decode.
            throw APIError.invalidRequest("The request body could not be read: it ended early or its framing is broken.",
                                          code: "invalid_body")
        }
    }
}

extension ServerState {
    /// The request's body as `T`: 413 past the body limit, 400 naming the field on bad JSON.
    func decodeBody<T: Decodable>(_ type: T.Type, of request: Request) async throws -> T {
        let body = try await request.collectBody(limit: configuration.maxBodyBytes)
        return try RequestDecoding.decode(type, from: body)
    }
}

enum JSONResponse {
    static func bytes(_ bytes: [UInt8], status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    static func value(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        bytes(value.jsonBytes, status: status)
    }
}

