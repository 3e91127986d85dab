import Foundation
import Testing

@testable import PatchbayCore

/// What a client sends reaches the plugin as sent: object members in the client's order
/// (templates render schemas in that order, and a stable prompt keeps the engine's prompt
/// cache warm), message names, and a max_tokens a C plugin can hold.
@Suite("Request fidelity")
struct RequestFidelityTests {
    /// Keys in no sorted order, nested, so a decoder that reorders them is caught.
    static let schema = #"{"type":"object","properties":{"zeta":{"type":"string","description":"z first"},"alpha":{"type":"integer","minimum":1,"maximum":9},"mid":{"type":"array","items":{"type":"number","multipleOf":0.5}},"beta":{"enum":["b","a"],"default":"b"}},"required":["zeta","alpha"],"additionalProperties":false,"$defs":{"y":{},"x":{}}}"#
    static let arguments = #"{"zulu":1,"alpha":{"yankee":2,"bravo":[{"quebec":true,"charlie":null}]},"mike":"m"}"#

    func normalizedJSON<T: Decodable>(_ type: T.Type, _ body: String, _ normalize: (T) throws -> NormalizedRequest) throws -> String {
        try normalize(RequestDecoding.decode(type, from: Data(body.utf8))).json.jsonString
    }

    @Test func openAIToolsResponseFormatAndToolCallsKeepTheirOrder() throws {
        let tools = #"[{"type":"function","function":{"name":"lookup","description":"d","parameters":\#(Self.schema),"strict":true}}]"#
        let responseFormat = #"{"type":"json_schema","json_schema":{"name":"out","strict":true,"schema":\#(Self.schema)}}"#
        let toolCalls = #"[{"id":"c1","type":"function","function":{"name":"lookup","arguments":"{\"zulu\":1,\"alpha\":2}"}}]"#
        let kwargs = #"{"zz":1,"aa":{"y":1,"b":2}}"#
        let json = try normalizedJSON(ChatCompletionRequest.self, #"""
            {"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":\#(toolCalls)},
             {"role":"tool","tool_call_id":"c1","content":"42"}],
             "tools":\#(tools),"tool_choice":{"type":"function","function":{"name":"lookup"}},
             "response_format":\#(responseFormat),"chat_template_kwargs":\#(kwargs)}
            """#) { request in
            try request.validate()
            return request.normalized(maxTokens: 10, maxWallMilliseconds: 1)
        }
        #expect(json.contains(#""tools":\#(tools)"#))
        #expect(json.contains(#""response_format":\#(responseFormat)"#))
        #expect(json.contains(#""tool_calls":\#(toolCalls)"#))
        #expect(json.contains(#""chat_template_kwargs":\#(kwargs)"#))
    }

    @Test func anthropicInputSchemaAndToolUseInputKeepTheirOrder() throws {
        let json = try normalizedJSON(AnthropicMessagesRequest.self, #"""
            {"max_tokens":5,"tools":[{"name":"lookup","description":"d","input_schema":\#(Self.schema)}],
             "messages":[{"role":"user","content":"hi"},
               {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"lookup","input":\#(Self.arguments)}]},
               {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]}
            """#) { request in
            try request.validate()
            return try request.normalized(maxWallMilliseconds: 1)
        }
        #expect(json.contains(#""parameters":\#(Self.schema)"#))
        #expect(json.contains(#""arguments":\#(JSONValue.string(Self.arguments).jsonString)"#))
    }

    @Test func responsesToolsAndTextFormatKeepTheirOrder() throws {
        let json = try normalizedJSON(ResponsesRequest.self, #"""
            {"input":"hi","tools":[{"type":"function","name":"lookup","parameters":\#(Self.schema)}],
             "text":{"format":{"type":"json_schema","name":"out","schema":\#(Self.schema)}}}
            """#) { request in
            try request.validate()
            return try request.normalized(maxTokens: 10, maxWallMilliseconds: 1)
        }
        #expect(json.contains(#""parameters":\#(Self.schema)"#))
        #expect(json.contains(#""schema":\#(Self.schema)"#))
    }

    @Test func aWholeBodyDecodedAsJSONValueKeepsItsOrder() throws {
        let body = #"{"model_path":"/m.ref","zz":{"b":1,"a":2},"aa":[{"d":1,"c":2}]}"#
        #expect(try RequestDecoding.decode(JSONValue.self, from: Data(body.utf8)).jsonString == body)
    }

    @Test func anthropicToolUseInputInTheResponseKeepsTheModelsOrder() throws {
        var result = ChatCompletionAccumulator()
        result.add(.toolCall(ToolCallDelta(index: 0, id: "call_1", name: "lookup", arguments: Self.arguments)))
        result.add(.finish(.toolCalls))
        let response = String(decoding: result.anthropicResponse(id: "msg_1", model: "m"), as: UTF8.self)
        #expect(response.contains(#""input":\#(Self.arguments)"#))
    }

    @Test func malformedOrTooDeepBodiesAre400sNamingTheByte() {
        for body in [#"{"messages":[1,]}"#, String(repeating: "[", count: 100_000), #"{"a":1,"a":2}"#] {
            do {
                _ = try RequestDecoding.decode(ChatCompletionRequest.self, from: Data(body.utf8))
                Issue.record("accepted \(body.prefix(20))")
            } catch {
                #expect(error.status == 400)
                #expect(error.code == "invalid_json")
                #expect(error.message.hasPrefix("The request body is not valid JSON: "))
                #expect(error.message.contains(" at byte "))
            }
        }
    }

    /// OpenAI allows `name` on every role; chat templates may render it.
    @Test(arguments: ["user", "system", "assistant", "developer", "tool"])
    func messagesMayCarryAName(role: String) throws {
        let extra = role == "tool" ? #","tool_call_id":"c1""# : ""
        let body = #"{"messages":[{"role":"\#(role)","content":"hi","name":"Ada"\#(extra)},{"role":"user","content":"go"}]}"#
        let request = try RequestDecoding.decode(ChatCompletionRequest.self, from: Data(body.utf8))
        try request.validate()
        let message = request.normalized(maxTokens: 10, maxWallMilliseconds: 1).json["messages"]?.arrayValue?.first
        #expect(message?["name"] == .string("Ada"))
    }

    static let huge = "9223372036854775807"

    @Test func maxTokensIsClampedToWhatACIntHolds() throws {
        func chat(_ field: String) throws -> NormalizedRequest {
            let request = try RequestDecoding.decode(
                ChatCompletionRequest.self, from: Data(#"{"messages":[{"role":"user","content":"hi"}],"\#(field)":\#(Self.huge)}"#.utf8))
            try request.validate()
            return request.normalized(maxTokens: 4096, maxWallMilliseconds: 1)
        }
        let completion = try RequestDecoding.decode(CompletionRequest.self, from: Data(#"{"prompt":"hi","max_tokens":\#(Self.huge)}"#.utf8))
        try completion.validate()
        let anthropic = try RequestDecoding.decode(
            AnthropicMessagesRequest.self, from: Data(#"{"max_tokens":\#(Self.huge),"messages":[{"role":"user","content":"hi"}]}"#.utf8))
        try anthropic.validate()
        let responses = try RequestDecoding.decode(ResponsesRequest.self, from: Data(#"{"input":"hi","max_output_tokens":\#(Self.huge)}"#.utf8))
        try responses.validate()
        let requests = [
            try chat("max_tokens"), try chat("max_completion_tokens"),
            completion.normalized(maxTokens: 4096, maxWallMilliseconds: 1),
            try anthropic.normalized(maxWallMilliseconds: 1),
            try responses.normalized(maxTokens: 4096, maxWallMilliseconds: 1),
            // A default as large (a model that reports no usable context length) is held to the same bound.
            NormalizedRequest(kind: .chat, maxTokens: .max, maxWallMilliseconds: 1),
        ]
        for request in requests {
            #expect(request.maxTokens == 2_147_483_647)
            #expect(request.json["max_tokens"] == .int(2_147_483_647))
        }
        #expect(NormalizedRequest(kind: .chat, maxTokens: 2_147_483_646, maxWallMilliseconds: 1).maxTokens == 2_147_483_646)
    }

    @Test func maxTokensBelowOneIsStillA400() throws {
        let anthropic = try RequestDecoding.decode(
            AnthropicMessagesRequest.self, from: Data(#"{"max_tokens":0,"messages":[{"role":"user","content":"hi"}]}"#.utf8))
        #expect(throws: APIError.self) { try anthropic.validate() }
        let responses = try RequestDecoding.decode(ResponsesRequest.self, from: Data(#"{"input":"hi","max_output_tokens":-1}"#.utf8))
        #expect(throws: APIError.self) { try responses.validate() }
        let completion = try RequestDecoding.decode(CompletionRequest.self, from: Data(#"{"prompt":"hi","max_tokens":0}"#.utf8))
        #expect(throws: APIError.self) { try completion.validate() }
    }
}
