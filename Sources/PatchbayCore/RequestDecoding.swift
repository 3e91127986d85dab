import Foundation

/// Decodes a request body, turning every failure into a 400 that names the field at fault.
public enum RequestDecoding {
    public static func decode<T: Decodable>(_ type: T.Type, from body: Data) throws(APIError) -> T {
        guard !body.isEmpty else { throw .invalidRequest("The request body is empty; expected a JSON object.") }
        // Our own parse keeps object members in order (JSONDecoder does not) and bounds the nesting;
        // JSONDecoder still reads the typed fields, so a wrong one is a 400 that names it.
        let document: JSONValue
        do {
            document = try JSONValue(parsing: body)
        } catch {
            throw .invalidRequest("The request body is not valid JSON: \(error).", code: "invalid_json")
        }
        let decoder = JSONDecoder()
        decoder.userInfo[.orderedJSON] = document
        do {
            return try decoder.decode(T.self, from: body)
        } catch let error as APIError {
            throw error
        } catch let error as DecodingError {
            throw describe(error)
        } catch {
            throw .invalidRequest("The request body is not valid JSON.")
        }
    }

    /// `messages[0].content` style path for a coding path.
    static func path(_ codingPath: [any CodingKey]) -> String? {
        var result = ""
        for key in codingPath {
            if let index = key.intValue {
                result += "[\(index)]"
            } else {
                result += result.isEmpty ? key.stringValue : ".\(key.stringValue)"
            }
        }
        return result.isEmpty ? nil : result
    }

    static func describe(_ error: DecodingError) -> APIError {
        switch error {
        case .typeMismatch(let type, let context):
            let param = path(context.codingPath)
            return .invalidRequest("Invalid type for '\(param ?? "body")': expected \(typeName(type)).", param: param, code: "invalid_type")
        case .valueNotFound(let type, let context):
            let param = path(context.codingPath)
            return .invalidRequest("Invalid value for '\(param ?? "body")': expected \(typeName(type)), got null.", param: param, code: "invalid_type")
        case .keyNotFound(let key, let context):
            let param = path(context.codingPath + [key])
            return .invalidRequest("Missing required parameter: '\(param ?? key.stringValue)'.", param: param, code: "missing_required_parameter")
        case .dataCorrupted(let context):
            if context.codingPath.isEmpty {
                return .invalidRequest("The request body is not valid JSON.", code: "invalid_json")
            }
            let param = path(context.codingPath)
            return .invalidRequest("Invalid value for '\(param ?? "body")': \(context.debugDescription)", param: param, code: "invalid_value")
        @unknown default:
            return .invalidRequest("The request body could not be decoded.")
        }
    }

    private static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: "a string"
        case is Bool.Type: "a boolean"
        case is Int.Type, is Int64.Type: "an integer"
        case is Double.Type: "a number"
        case is [Any].Type: "an array"
        default:
            String(describing: type).contains("Array") ? "an array" : (String(describing: type).contains("Dictionary") ? "an object" : "a value of another type")
        }
    }
}

/// Throws a 400 naming `param` unless `value` lies in `range`.
func checkRange<T: Comparable>(_ value: T?, _ range: ClosedRange<T>, _ param: String) throws(APIError) {
    guard let value, !range.contains(value) else { return }
    throw .invalidRequest(
        "Invalid value for '\(param)': \(value) is not within [\(range.lowerBound), \(range.upperBound)].",
        param: param, code: "invalid_value")
}
