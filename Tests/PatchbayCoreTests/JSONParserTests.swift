import Foundation
import Testing

@testable import PatchbayCore

/// The strict, order-keeping parser every request body goes through first.
@Suite("JSON parser")
struct JSONParserTests {
    func parse(_ text: String) throws(JSONParseError) -> JSONValue {
        try JSONValue(parsing: Array(text.utf8))
    }

    func failure(_ bytes: [UInt8]) -> JSONParseError? {
        do {
            _ = try JSONValue(parsing: bytes)
            return nil
        } catch {
            return error
        }
    }

    @Test(arguments: [
        (#"{"z":1,"a":[true,false,null],"m":{"y":"x","b":{}},"c":[]}"#, #"{"z":1,"a":[true,false,null],"m":{"y":"x","b":{}},"c":[]}"#),
        (" \t\r\n[ 1 ,\n-2 ] \n", "[1,-2]"),
        (#"{ "a" : "b" }"#, #"{"a":"b"}"#),
        (#""""#, #""""#),
        ("\"tab\\there\\nnew\\\"q\\\\b\\/s\\b\\f\\r\"", "\"tab\\there\\nnew\\\"q\\\\b/s\\u0008\\u000c\\r\""),
        (#""caf\u00e9 \u20ac \ud83d\ude00 \u0000""#, "\"café € 😀 \\u0000\""),
        ("\"raw é 😀\"", "\"raw é 😀\""),
        (#"{"\u0061b":1,"é":2}"#, #"{"ab":1,"é":2}"#),
        ("\u{FEFF}[1]", "[1]"),
        ("0", "0"),
        ("-0", "0"),
        ("1.0", "1"),
        ("1e2", "100"),
        ("1E+2", "100"),
        ("100e-2", "1"),
        ("1.5", "1.5"),
        ("-2.5e-3", "-0.0025"),
        ("9223372036854775807", "9223372036854775807"),
        ("-9223372036854775808", "-9223372036854775808"),
        ("9223372036854775808", "9.223372036854776e+18"),
        ("123456789012345678901234567890", "1.2345678901234568e+29"),
        ("1e-400", "0"),
        ("true", "true"),
        ("null", "null"),
    ])
    func parsesValidDocuments(json: String, compact: String) throws {
        #expect(try parse(json).jsonString == compact)
    }

    /// Numbers land in the same case as `JSONDecoder` puts them, which the rest of the code relies on.
    @Test(arguments: ["0", "-0", "-0.0", "1", "1.0", "1e2", "0.1e1", "1.5", "-7", "2.5e-3", "1e18", "1e19",
                      "9223372036854775807", "9223372036854775808", "-9223372036854775809", "1.00000000000000000001"])
    func numbersMatchJSONDecoder(number: String) throws {
        let decoded = try JSONDecoder().decode(JSONValue.self, from: Data(number.utf8))
        #expect(try parse(number) == decoded)
    }

    @Test func integralNumbersAreIntsAndTheRestDoubles() throws {
        #expect(try parse("1") == .int(1))
        #expect(try parse("1.0") == .int(1))
        #expect(try parse("1.5") == .double(1.5))
        #expect(try parse("-9223372036854775808") == .int(.min))
        #expect(try parse("9223372036854775808") == .double(9_223_372_036_854_775_808))
    }

    @Test(arguments: [
        ("", 0), (" ", 1), ("{bad", 1), ("[1,]", 3), ("[1 2]", 3), (#"{"a" 1}"#, 5), (#"{"a":1,}"#, 7), ("{,}", 1),
        ("[", 1), (#"{"a":"#, 5), ("01", 1), ("1.", 2), (".5", 0), ("+1", 0), ("-", 1), ("1e", 2), ("1e+", 3),
        ("-a", 1), ("NaN", 0), ("Infinity", 0), ("tru", 0), ("nul", 0), ("[1] x", 4), ("'a'", 0), ("{1:2}", 1),
        (#""abc"#, 0), (#""\x""#, 1), (#""\u12""#, 1), (#""\u12G4""#, 1), (#""\ud83d""#, 1), (#""\ude00x""#, 1),
        (#""\ud83d\u0041""#, 1), (#""\ud83dx""#, 1), ("\"a\tb\"", 2), ("\"a\nb\"", 2),
        (#"{"a":1,"a":2}"#, 7), ("1e400", 0), ("[-1e400]", 1),
    ])
    func refusesInvalidDocuments(json: String, offset: Int) {
        let error = failure(Array(json.utf8))
        #expect(error?.offset == offset, "\(json): \(String(describing: error))")
        #expect(error?.reason.isEmpty == false)
    }

    @Test func refusesInvalidUTF8() {
        #expect(failure([0x22, 0xFF, 0x22])?.reason == "invalid UTF-8 in a string")
        #expect(failure([0x22, 0xC3, 0x22])?.reason == "invalid UTF-8 in a string")  // a truncated sequence
        #expect(failure([0x22, 0x5C, 0x6E, 0xED, 0xA0, 0x80, 0x22])?.reason == "invalid UTF-8 in a string")  // an encoded surrogate
        #expect(failure([0x5B, 0xFF, 0x5D])?.offset == 1)
    }

    @Test func nestingIsBoundedAt512Levels() throws {
        func nested(_ depth: Int) -> String { String(repeating: "[", count: depth) + String(repeating: "]", count: depth) }
        #expect(try parse(nested(JSONParser.maxDepth)).jsonString == nested(JSONParser.maxDepth))
        #expect(failure(Array(nested(JSONParser.maxDepth + 1).utf8))?.offset == JSONParser.maxDepth)
        // Far too deep for the stack, were it not bounded.
        let deep = String(repeating: #"{"a":"#, count: 200_000)
        #expect(failure(Array(deep.utf8))?.reason == "nesting deeper than 512 levels")
    }

    @Test func aLargeObjectKeepsItsOrderAndItsKeysUnique() throws {
        let keys = (0..<5000).map { "k\(($0 * 7919) % 5000)" }
        let object = "{" + keys.map { "\"\($0)\":0" }.joined(separator: ",") + "}"
        guard case .object(let members) = try parse(object) else { Issue.record("not an object"); return }
        #expect(members.map(\.key) == keys)
        let repeated = "{" + keys.map { "\"\($0)\":0" }.joined(separator: ",") + #","k4999":1}"#
        #expect(failure(Array(repeated.utf8))?.reason == "the key 'k4999' appears twice in one object")
    }

    @Test func parsesData() throws {
        #expect(try JSONValue(parsing: Data(#"{"b":1,"a":2}"#.utf8)).jsonString == #"{"b":1,"a":2}"#)
    }
}
