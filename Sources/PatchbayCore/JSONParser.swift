import Foundation

/// Why a JSON text was refused, and the byte offset where that was found.
public struct JSONParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public var offset: Int

    public var description: String { "\(reason) at byte \(offset)" }
}

extension JSONValue {
    /// Parses JSON text strictly (RFC 8259, UTF-8), keeping object members in document order,
    /// which `JSONDecoder` does not. Numbers land in `JSONDecoder`'s cases: integers that fit
    /// `Int64` are `.int`, and so are `1.0` and `1e2`; the rest are `.double`. Refused: nesting deeper than
    /// `JSONParser.maxDepth`, a key repeated in one object, numbers beyond `Double`, lone
    /// surrogate escapes, invalid UTF-8 and anything after the value. A UTF-8 BOM is skipped.
    public init(parsing json: some ContiguousBytes) throws(JSONParseError) {
        let result = json.withUnsafeBytes { raw in
            Result { () throws(JSONParseError) -> JSONValue in
                var parser = JSONParser(bytes: raw.bindMemory(to: UInt8.self))
                return try parser.document()
            }
        }
        self = try result.get()
    }
}

/// A recursive-descent parser over UTF-8 bytes; see `JSONValue.init(parsing:)`.
struct JSONParser {
    /// Deep enough for any schema, shallow enough that recursion cannot exhaust a thread's stack.
    static let maxDepth = 512

    private let bytes: UnsafeBufferPointer<UInt8>
    private var offset = 0
    private var depth = 0
    /// Reused by every string that holds escapes.
    private var scratch: [UInt8] = []

    init(bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    mutating func document() throws(JSONParseError) -> JSONValue {
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { offset = 3 }
        let result = try value()
        skipWhitespace()
        guard offset == bytes.count else { throw failure("unexpected data after the JSON value") }
        return result
    }

    // MARK: Values

    private mutating func value() throws(JSONParseError) -> JSONValue {
        skipWhitespace()
        guard offset < bytes.count else { throw failure("unexpected end of data") }
        switch bytes[offset] {
        case UInt8(ascii: "{"): return try object()
        case UInt8(ascii: "["): return try array()
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default: throw failure("unexpected character")
        }
    }

    private mutating func object() throws(JSONParseError) -> JSONValue {
        try enter()
        var members: [(key: String, value: JSONValue)] = []
        var keys = KeyCheck()
        skipWhitespace()
        if try consume(UInt8(ascii: "}")) {
            depth -= 1
            return .object(members)
        }
        repeat {
            skipWhitespace()
            let keyOffset = offset
            guard offset < bytes.count, bytes[offset] == UInt8(ascii: "\"") else { throw failure("expected a string key") }
            let key = try string()
            guard keys.isNew(key, among: members) else {
                throw JSONParseError(reason: "the key '\(key)' appears twice in one object", offset: keyOffset)
            }
            skipWhitespace()
            guard try consume(UInt8(ascii: ":")) else { throw failure("expected ':' after an object key") }
            members.append((key, try value()))
            skipWhitespace()
        } while try consume(UInt8(ascii: ","))
        guard try consume(UInt8(ascii: "}")) else { throw failure("expected ',' or '}' in an object") }
        depth -= 1
        return .object(members)
    }

    private mutating func array() throws(JSONParseError) -> JSONValue {
        try enter()
        var items: [JSONValue] = []
        skipWhitespace()
        if try consume(UInt8(ascii: "]")) {
            depth -= 1
            return .array(items)
        }
        repeat {
            items.append(try value())
            skipWhitespace()
        } while try consume(UInt8(ascii: ","))
        guard try consume(UInt8(ascii: "]")) else { throw failure("expected ',' or ']' in an array") }
        depth -= 1
        return .array(items)
    }

    /// Steps over the opening bracket at `offset`, one level deeper.
    private mutating func enter() throws(JSONParseError) {
        guard depth < Self.maxDepth else { throw failure("nesting deeper than \(Self.maxDepth) levels") }
        depth += 1
        offset += 1
    }

    private mutating func literal(_ word: StaticString) throws(JSONParseError) {
        let text = UnsafeBufferPointer(start: word.utf8Start, count: word.utf8CodeUnitCount)
        guard bytes.count - offset >= text.count, bytes[offset..<offset + text.count].elementsEqual(text) else {
            throw failure("unexpected character")
        }
        offset += text.count
    }

    // MARK: Numbers

    private mutating func number() throws(JSONParseError) -> JSONValue {
        let start = offset
        let negative = bytes[offset] == UInt8(ascii: "-")
        if negative { offset += 1 }
        guard offset < bytes.count, isDigit(bytes[offset]) else { throw failure("expected a digit") }
        var integer: Int64? = 0
        if bytes[offset] == UInt8(ascii: "0") {
            offset += 1
        } else {
            while offset < bytes.count, isDigit(bytes[offset]) {
                integer = integer.flatMap { accumulate($0, bytes[offset], negative: negative) }
                offset += 1
            }
        }
        var integral = true
        if offset < bytes.count, bytes[offset] == UInt8(ascii: ".") {
            offset += 1
            try digits()
            integral = false
        }
        if offset < bytes.count, bytes[offset] | 0x20 == UInt8(ascii: "e") {
            offset += 1
            if offset < bytes.count, bytes[offset] == UInt8(ascii: "+") || bytes[offset] == UInt8(ascii: "-") { offset += 1 }
            try digits()
            integral = false
        }
        if integral, let integer { return .int(integer) }
        guard let number = Double(String(decoding: bytes[start..<offset], as: UTF8.self)), number.isFinite else {
            throw JSONParseError(reason: "a number too large to represent", offset: start)
        }
        // As JSONDecoder does: `1.0` and `1e2` are integers, but digits past Int64 are a double.
        if !integral, let exact = Int64(exactly: number) { return .int(exact) }
        return .double(number)
    }

    /// `value * 10 ± digit`, or nil past Int64 (negative numbers accumulate downwards to reach Int64.min).
    private func accumulate(_ value: Int64, _ digit: UInt8, negative: Bool) -> Int64? {
        let (shifted, overflow) = value.multipliedReportingOverflow(by: 10)
        let unit = Int64(digit - UInt8(ascii: "0"))
        let (result, carry) = negative ? shifted.subtractingReportingOverflow(unit) : shifted.addingReportingOverflow(unit)
        return overflow || carry ? nil : result
    }

    /// One or more digits, as a fraction or an exponent needs.
    private mutating func digits() throws(JSONParseError) {
        guard offset < bytes.count, isDigit(bytes[offset]) else { throw failure("expected a digit") }
        while offset < bytes.count, isDigit(bytes[offset]) { offset += 1 }
    }

    private func isDigit(_ byte: UInt8) -> Bool { byte &- UInt8(ascii: "0") < 10 }

    // MARK: Strings

    /// The string whose opening quote is at `offset`. Runs without escapes are copied whole.
    private mutating func string() throws(JSONParseError) -> String {
        offset += 1
        let start = offset
        while offset < bytes.count {
            switch bytes[offset] {
            case UInt8(ascii: "\""):
                defer { offset += 1 }
                return try text(UnsafeBufferPointer(rebasing: bytes[start..<offset]), from: start)
            case UInt8(ascii: "\\"):
                return try escapedString(from: start)
            case ..<0x20:
                throw failure("a control character in a string must be escaped")
            default:
                offset += 1
            }
        }
        throw JSONParseError(reason: "unterminated string", offset: start - 1)
    }

    /// The rest of a string that has escapes, built in `scratch` from its first `start..<offset` bytes.
    private mutating func escapedString(from start: Int) throws(JSONParseError) -> String {
        scratch.removeAll(keepingCapacity: true)
        var runStart = start
        while offset < bytes.count {
            let byte = bytes[offset]
            guard byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") || byte < 0x20 else {
                offset += 1
                continue
            }
            scratch.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart..<offset]))
            switch byte {
            case UInt8(ascii: "\""):
                offset += 1
                return try text(scratch, from: start)
            case UInt8(ascii: "\\"):
                try escape()
                runStart = offset
            default:
                throw failure("a control character in a string must be escaped")
            }
        }
        throw JSONParseError(reason: "unterminated string", offset: start - 1)
    }

    /// Appends the character of the escape at `offset` to `scratch`.
    private mutating func escape() throws(JSONParseError) {
        guard offset + 1 < bytes.count else { throw failure("unterminated string") }
        let escapeOffset = offset
        let letter = bytes[offset + 1]
        offset += 2
        switch letter {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): scratch.append(letter)
        case UInt8(ascii: "b"): scratch.append(0x08)
        case UInt8(ascii: "f"): scratch.append(0x0C)
        case UInt8(ascii: "n"): scratch.append(0x0A)
        case UInt8(ascii: "r"): scratch.append(0x0D)
        case UInt8(ascii: "t"): scratch.append(0x09)
        case UInt8(ascii: "u"):
            guard var scalar = hexQuad().map(UInt32.init) else {
                throw JSONParseError(reason: "expected four hex digits after \\u", offset: escapeOffset)
            }
            if (0xD800..<0xDC00).contains(scalar) {
                guard let low = lowSurrogateEscape() else {
                    throw JSONParseError(reason: "a high surrogate escape without its low surrogate", offset: escapeOffset)
                }
                scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
            } else if (0xDC00..<0xE000).contains(scalar) {
                throw JSONParseError(reason: "a low surrogate escape without its high surrogate", offset: escapeOffset)
            }
            appendUTF8(scalar)
        default:
            throw JSONParseError(reason: "an invalid escape sequence", offset: escapeOffset)
        }
    }

    /// The `\uDC00`…`\uDFFF` escape at `offset` that must follow a high surrogate, or nil.
    private mutating func lowSurrogateEscape() -> UInt32? {
        guard bytes.count - offset >= 2, bytes[offset] == UInt8(ascii: "\\"), bytes[offset + 1] == UInt8(ascii: "u") else { return nil }
        offset += 2
        guard let low = hexQuad(), (0xDC00..<0xE000).contains(low) else { return nil }
        return UInt32(low)
    }

    /// The four hex digits at `offset`, or nil.
    private mutating func hexQuad() -> UInt16? {
        guard bytes.count - offset >= 4 else { return nil }
        var value: UInt16 = 0
        for _ in 0..<4 {
            let byte = bytes[offset]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            value = value << 4 | UInt16(digit)
            offset += 1
        }
        return value
    }

    private mutating func appendUTF8(_ scalar: UInt32) {
        switch scalar {
        case ..<0x80:
            scratch.append(UInt8(scalar))
        case ..<0x800:
            scratch.append(UInt8(0xC0 | scalar >> 6))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        case ..<0x10000:
            scratch.append(UInt8(0xE0 | scalar >> 12))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        default:
            scratch.append(UInt8(0xF0 | scalar >> 18))
            scratch.append(UInt8(0x80 | scalar >> 12 & 0x3F))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        }
    }

    /// UTF-8 bytes as a String; invalid UTF-8 is refused, not repaired.
    private func text(_ utf8: some Collection<UInt8>, from start: Int) throws(JSONParseError) -> String {
        guard let text = String(validating: utf8, as: UTF8.self) else {
            throw JSONParseError(reason: "invalid UTF-8 in a string", offset: start)
        }
        return text
    }

    // MARK: Whitespace and punctuation

    private mutating func skipWhitespace() {
        while offset < bytes.count {
            switch bytes[offset] {
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): offset += 1
            default: return
            }
        }
    }

    /// Steps over `byte` if it is next.
    private mutating func consume(_ byte: UInt8) throws(JSONParseError) -> Bool {
        guard offset < bytes.count else { throw failure("unexpected end of data") }
        guard bytes[offset] == byte else { return false }
        offset += 1
        return true
    }

    private func failure(_ reason: String) -> JSONParseError {
        JSONParseError(reason: reason, offset: offset)
    }
}

/// Spots a key repeated in one object: a scan while the object is small, a set once it is not,
/// so that an object with many keys costs linear time.
private struct KeyCheck {
    private var seen: Set<String>?

    mutating func isNew(_ key: String, among members: [(key: String, value: JSONValue)]) -> Bool {
        if seen == nil {
            if members.count < 16 { return !members.contains { $0.key == key } }
            seen = Set(members.lazy.map(\.key))
        }
        return seen!.insert(key).inserted
    }
}
