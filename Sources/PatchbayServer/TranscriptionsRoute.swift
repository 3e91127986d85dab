import Foundation
import HTTPTypes
import Hummingbird
import MultipartKit
import PatchbayCore
import PatchbayHost

/// `POST /v1/audio/transcriptions`: OpenAI's multipart form, answered by a model whose
/// plugin transcribes (the whisper backend); cancellable like any generation (`cancel_id`,
/// `session_id` form fields).
struct TranscriptionsRoute: GenerationRoute {
    static let idPrefix = "transcription-"
    let maxAudioBytes: Int

    func decode(_ request: Request, server: ServerState) async throws -> TranscriptionRequest {
        // The form's other fields are small; the file is what the limit is about.
        let body = try await request.collectBody(limit: maxAudioBytes + 64 * 1024)
        let form = try MultipartForm.parse(body, contentType: request.headers[.contentType])
        if let file = form.first(where: { $0.name == "file" }), file.body.count > maxAudioBytes {
            throw APIError(status: 413, message: "The audio file (\(file.body.count) bytes) exceeds the limit of \(maxAudioBytes) bytes.",
                           param: "file", code: "file_too_large")
        }
        return try TranscriptionRequest(form: form)
    }

    func plan(_ transcription: TranscriptionRequest, id: String, model: LoadedModel, limits: GenerationLimits) throws -> GenerationPlan {
        let format = transcription.responseFormat
        return GenerationPlan(request: transcription.normalized(maxWallMilliseconds: limits.maxWallMilliseconds), reply: transcription.stream
            ? .stream(TranscriptionStreamEncoder())
            : .collect(Collected(TranscriptionResult()) { result in
                let (bytes, contentType) = result.response(format: format)
                return Response(status: .ok, headers: [.contentType: contentType], body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
            }))
    }
}

extension TranscriptionRequest: GenerationRequestBody {
    var modelName: String? { model }
    var isStreaming: Bool { stream }
    func validate() {}  // checked while the form is read
}

/// `multipart/form-data` bodies, parsed with MultipartKit's parser.
enum MultipartForm {
    static func parse(_ body: Data, contentType: String?) throws(APIError) -> [FormPart] {
        guard let contentType, contentType.lowercased().hasPrefix("multipart/form-data") else {
            throw APIError(status: 415, message: "Content-Type must be multipart/form-data (got \(contentType.map { "'\($0)'" } ?? "none")).",
                           code: "unsupported_media_type")
        }
        guard let boundary = parameter("boundary", in: contentType), !boundary.isEmpty, boundary.utf8.count <= 200 else {
            throw .invalidRequest("The multipart Content-Type has no boundary.", code: "invalid_body")
        }
        var parts: [FormPart] = []
        var current: (headers: [(String, String)], body: [UInt8])?
        let parser = MultipartParser(boundary: boundary)
        parser.onHeader = { name, value in
            if current == nil { current = ([], []) }
            current?.headers.append((name, value))
        }
        parser.onBody = { buffer in
            if current == nil { current = ([], []) }
            current?.body.append(contentsOf: buffer.readableBytesView)
        }
        parser.onPartComplete = {
            defer { current = nil }
            guard let part = current else { return }
            let disposition = part.headers.first { $0.0.lowercased() == "content-disposition" }?.1 ?? ""
            parts.append(FormPart(name: parameter("name", in: disposition) ?? "",
                                  fileName: parameter("filename", in: disposition),
                                  contentType: part.headers.first { $0.0.lowercased() == "content-type" }?.1,
                                  body: part.body))
        }
        do {
            try parser.execute(ByteBuffer(bytes: body))
        } catch {
            throw .invalidRequest("The multipart body is malformed.", code: "invalid_body")
        }
        if current != nil || parts.isEmpty {
            throw .invalidRequest("The multipart body ended before its closing boundary.", code: "invalid_body")
        }
        return parts
    }

    /// A `key=value` or `key="quoted value"` parameter of a header value.
    static func parameter(_ key: String, in header: String) -> String? {
        var rest = Substring(header)
        while let semicolon = rest.firstIndex(of: ";") {
            rest = rest[rest.index(after: semicolon)...].drop { $0 == " " || $0 == "\t" }
            guard let equals = rest.firstIndex(of: "=") else { return nil }
            let name = rest[..<equals].trimmingCharacters(in: .whitespaces).lowercased()
            var value = rest[rest.index(after: equals)...]
            var parsed = ""
            if value.first == "\"" {
                value = value.dropFirst()
                var escaped = false
                var end = value.endIndex
                for index in value.indices {
                    let character = value[index]
                    if escaped { parsed.append(character); escaped = false }
                    else if character == "\\" { escaped = true }
                    else if character == "\"" { end = index; break }
                    else { parsed.append(character) }
                }
                rest = end < value.endIndex ? value[value.index(after: end)...] : ""
            } else {
                let end = value.firstIndex(of: ";") ?? value.endIndex
                parsed = value[..<end].trimmingCharacters(in: .whitespaces)
                rest = value[end...]
            }
            if name == key { return parsed }
        }
        return nil
    }
}
