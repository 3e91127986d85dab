import Foundation
import Testing

@testable import PatchbayCore

@Suite("Chat completion requests")
struct ChatCompletionRequestTests {
    func decode(_ json: String) throws(APIError) -> ChatCompletionRequest {
        let request = try RequestDecoding.decode(ChatCompletionRequest.self, from: Data(json.utf8))
        try request.validate()
        return request
    }

    func error(_ json: String) -> APIError? {
        do {
            _ = try decode(json)
            return nil
        } catch {
            return error
        }
    }

    @Test func acceptsAMinimalRequestAndIgnoresUnknownFields() throws {
        let request = try decode(#"{"messages":[{"role":"user","content":"hi"}],"some_future_field":{"x":1}}"#)
        #expect(request.messages.count == 1)
        #expect(request.isStreaming == false)
    }

    @Test func developerRoleBecomesSystem() throws {
        let request = try decode(#"{"messages":[{"role":"developer","content":"be brief"},{"role":"user","content":"hi"}]}"#)
        #expect(request.messages[0].role == .system)
    }

    @Test(arguments: [
        (#"{bad"#, nil as String?, "invalid_json"),
        (#""#, nil, nil),
        (#"{"messages":"x"}"#, "messages", "invalid_type"),
        (#"{}"#, "messages", "missing_required_parameter"),
        (#"{"messages":[]}"#, "messages", "invalid_value"),
        (#"{"messages":[{"role":"robot","content":"hi"}]}"#, "messages[0].role", "invalid_value"),
        (#"{"messages":[{"role":"user","content":""}]}"#, "messages[0].content", nil),
        (#"{"messages":[{"role":"user","content":"hi","tool_calls":[]}]}"#, "messages[0].tool_calls", nil),
        (#"{"messages":[{"role":"user","content":"hi"},{"role":"tool","content":"42"}]}"#, "messages[1].tool_call_id", nil),
        (#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant"}]}"#, "messages[1].content", nil),
        (#"{"messages":[{"role":"user","content":"hi","name":5}]}"#, "messages[0].name", "invalid_type"),
        (#"{"messages":[{"role":"system","content":"only system"}]}"#, "messages", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"temperature":3}"#, "temperature", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#, "temperature", "invalid_type"),
        (#"{"messages":[{"role":"user","content":"hi"}],"top_p":1.5}"#, "top_p", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#, "max_tokens", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"top_k":1000}"#, "top_k", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"min_p":-1}"#, "min_p", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"repetition_penalty":0.5}"#, "repetition_penalty", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#, "n", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"reasoning_effort":"extreme"}"#, "reasoning_effort", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#, "tools[0]", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"tool_choice":"sometimes"}"#, "tool_choice", "invalid_value"),
        (#"{"messages":[{"role":"user","content":"hi"}],"stop":5}"#, "stop", "invalid_type"),
        (#"{"messages":[{"role":"user","content":[{"type":"video","video":"x"}]}]}"#, "messages[0].content[0].type", "invalid_value"),
    ])
    func rejectsBadInputWithAParam(json: String, param: String?, code: String?) {
        let failure = error(json)
        #expect(failure?.status == 400)
        #expect(failure?.param == param)
        if let code { #expect(failure?.code == code) }
        #expect(failure?.message.isEmpty == false)
    }

    @Test func normalizedRequestCarriesDefaultsAndExtensions() throws {
        let request = try decode(#"""
            {"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stop":"END",
             "top_k":5,"enable_thinking":true,"reasoning_effort":"high","seed":7,
             "chat_template_kwargs":{"custom":1}}
            """#)
        let json = request.normalized(maxTokens: 4096, maxWallMilliseconds: 600_000).json
        #expect(json["kind"] == .string("chat"))
        #expect(json["max_tokens"] == .int(4096))
        #expect(json["max_wall_ms"] == .int(600_000))
        #expect(json["stop"] == .array([.string("END")]))
        #expect(json["top_k"] == .int(5))
        #expect(json["seed"] == .int(7))
        #expect(json["temperature"] == nil)
        #expect(json["chat_template_kwargs"]?["enable_thinking"] == .bool(true))
        #expect(json["chat_template_kwargs"]?["reasoning_effort"] == .string("high"))
        #expect(json["chat_template_kwargs"]?["custom"] == .int(1))
    }

    @Test func maxCompletionTokensWinsOverMaxTokens() throws {
        let request = try decode(#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":10,"max_completion_tokens":20}"#)
        #expect(request.normalized(maxTokens: 4096, maxWallMilliseconds: 1).maxTokens == 20)
    }
}

@Suite("Tool-call turns")
struct ToolCallTurnTests {
    @Test func assistantMayOmitContentWhenItCallsTools() throws {
        let json = #"""
            {"messages":[{"role":"user","content":"hi"},
              {"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
              {"role":"tool","tool_call_id":"c1","content":"42"}]}
            """#
        let request = try RequestDecoding.decode(ChatCompletionRequest.self, from: Data(json.utf8))
        try request.validate()
        #expect(request.messages[1].content == nil)
    }
}
