import Foundation

/// `POST /v1/embeddings`.
public struct EmbeddingsRequest: Decodable, Sendable {
    public var model: String?
    public var input: StringList
    public var encodingFormat: String?
    public var dimensions: Int?

    enum CodingKeys: String, CodingKey {
        case model, input, dimensions
        case encodingFormat = "encoding_format"
    }

    public func validate() throws(APIError) {
        if input.values.isEmpty || input.values.contains(where: \.isEmpty) {
            throw .invalidRequest("'input' must be a non-empty string or a list of non-empty strings.", param: "input", code: "invalid_value")
        }
        if input.values.count > 2048 {
            throw .invalidRequest("'input' holds at most 2048 texts.", param: "input", code: "invalid_value")
        }
        if let encodingFormat, !["float", "base64"].contains(encodingFormat) {
            throw .invalidRequest("'encoding_format' must be 'float' or 'base64'.", param: "encoding_format", code: "invalid_value")
        }
        if dimensions != nil {
            throw .invalidRequest("'dimensions' is not supported: the model decides its dimensions.", param: "dimensions", code: "unsupported_parameter")
        }
    }

    /// The OpenAI list response; base64 is the little-endian float32 bytes, as OpenAI sends them.
    public func response(vectors: [[Float]], model: String, promptTokens: Int) -> [UInt8] {
        var json = JSONWriter()
        json.raw("{\"object\":\"list\",\"data\":[")
        for (index, vector) in vectors.enumerated() {
            if index > 0 { json.raw(",") }
            json.raw("{\"object\":\"embedding\",\"index\":")
            json.int(index)
            json.raw(",\"embedding\":")
            if encodingFormat == "base64" {
                let bytes = vector.withUnsafeBufferPointer { Data(buffer: $0) }
                json.string(bytes.base64EncodedString())
            } else {
                json.raw("[")
                for (position, value) in vector.enumerated() {
                    if position > 0 { json.raw(",") }
                    json.double(Double(value))
                }
                json.raw("]")
            }
            json.raw("}")
        }
        json.raw("],\"model\":")
        json.string(model)
        json.raw(",\"usage\":{\"prompt_tokens\":")
        json.int(promptTokens)
        json.raw(",\"total_tokens\":")
        json.int(promptTokens)
        json.raw("}}")
        return json.bytes
    }
}
