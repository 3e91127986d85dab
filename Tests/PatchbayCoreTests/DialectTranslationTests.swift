import Foundation
import Testing

@testable import PatchbayCore

/// Anthropic Messages and OpenAI Responses requests become the one normalized (OpenAI chat)
/// shape every plugin receives; these pin the translation, block by block.
@Suite("Dialect translation")
struct DialectTranslationTests {
    func anthropic(_ json: String) throws -> NormalizedRequest {
        let request = try RequestDecoding.decode(AnthropicMessagesRequest.self, from: Data(json.utf8))
        try request.validate()
        return try request.normalized(maxWallMilliseconds: 1000)
    }

    func responses(_ json: String) throws -> NormalizedRequest {
        let request = try RequestDecoding.decode(ResponsesRequest.self, from: Data(json.utf8))
        try request.validate()
        return try request.normalized(maxTokens: 99, maxWallMilliseconds: 1000)
    }

    @Test func anthropicToolUseAndResultBecomeToolCallsAndToolMessages() throws {
        let request = try anthropic(#"""
        {"max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
         "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
         "tool_choice": {"type": "any"},
         "messages": [
           {"role": "user", "content": "Weather?"},
           {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"},
                                             {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                                        {"type": "text", "text": "Thanks"}]}]}
        """#)
        let roles = request.messages.compactMap { $0["role"]?.stringValue }
        #expect(roles == ["system", "user", "assistant", "tool", "user"])
        #expect(request.messages[0]["content"] == .string("Be brief."))
        let assistant = request.messages[2]
        #expect(assistant["content"] == .null)
        #expect(assistant["reasoning_content"] == .string("hmm"))
        let call = assistant["tool_calls"]?.arrayValue?.first
        #expect(call?["function"]?["arguments"] == .string(#"{"city":"Paris"}"#))
        #expect(request.messages[3]["tool_call_id"] == .string("toolu_1"))
        #expect(request.messages[3]["content"] == .string("sunny"))
        #expect(request.toolChoice == .string("required"))
        #expect(request.tools?.first?["function"]?["parameters"] == .object([("type", .string("object"))]))
        #expect(request.maxTokens == 50)
    }

    @Test func anthropicImagesBecomeDataURIs() throws {
        let request = try anthropic(#"""
        {"max_tokens": 5, "messages": [{"role": "user", "content": [
          {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
          {"type": "text", "text": "What is it?"}]}]}
        """#)
        #expect(request.hasImage)
        let image = request.messages[0]["content"]?.arrayValue?.first
        #expect(image?["image_url"]?["url"] == .string("data:image/png;base64,AAAA"))
    }

    @Test(arguments: [
        (#"{"messages": [{"role": "user", "content": "hi"}]}"#, "max_tokens"),
        (#"{"max_tokens": 5, "messages": []}"#, "messages"),
        (#"{"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}"#, "messages[0].role"),
        (#"{"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b"}]}]}"#, "messages[0].content[0].type"),
        (#"{"max_tokens": 5, "tool_choice": {"type": "sometimes"}, "messages": [{"role": "user", "content": "x"}]}"#, "tool_choice"),
    ])
    func anthropicBadInputNamesTheField(json: String, param: String) {
        #expect(throws: APIError.self) { _ = try anthropic(json) }
        do { _ = try anthropic(json) } catch let error as APIError {
            #expect(error.status == 400)
            #expect(error.param == param)
        } catch {}
    }

    @Test func thinkingPrecedence() throws {
        let on = try anthropic(#"{"max_tokens": 5, "thinking": {"type": "enabled"}, "messages": [{"role": "user", "content": "x"}]}"#)
        #expect(on.chatTemplateKwargs?["enable_thinking"] == .bool(true))
        let off = try anthropic(#"{"max_tokens": 5, "thinking": {"type": "enabled"}, "enable_thinking": false, "messages": [{"role": "user", "content": "x"}]}"#)
        #expect(off.chatTemplateKwargs?["enable_thinking"] == .bool(false))
    }

    @Test func responsesItemsCorrelateFunctionCallsByCallID() throws {
        let request = try responses(#"""
        {"instructions": "Be brief.", "max_output_tokens": 7,
         "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}, {"type": "web_search"}],
         "tool_choice": {"type": "function", "name": "get_weather"},
         "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
         "reasoning": {"effort": "low"},
         "input": [
           {"role": "developer", "content": "Use tools."},
           {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
           {"type": "reasoning", "id": "rs_1", "summary": []},
           {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
           {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
           {"type": "something_new"}]}
        """#)
        let roles = request.messages.compactMap { $0["role"]?.stringValue }
        #expect(roles == ["system", "system", "user", "assistant", "tool"])
        #expect(request.messages[3]["tool_calls"]?.arrayValue?.first?["id"] == .string("call_1"))
        #expect(request.messages[4]["tool_call_id"] == .string("call_1"))
        #expect(request.tools?.count == 1)
        #expect(request.toolChoice?["function"]?["name"] == .string("get_weather"))
        #expect(request.responseFormat?["json_schema"]?["name"] == .string("w"))
        #expect(request.chatTemplateKwargs?["reasoning_effort"] == .string("low"))
        #expect(request.maxTokens == 7)
    }

    @Test func responsesStreamNumbersItsEventsAndClosesItems() {
        var encoder = ResponsesStreamEncoder(state: ResponseState(id: "resp_1", model: "m", createdAt: 0))
        var out: [UInt8] = []
        for event: GenerationEvent in [.reasoning("hm"), .content("Hi"), .content("!"),
                                       .toolCall(ToolCallDelta(index: 0, id: "call_1", name: "f", arguments: "{}")),
                                       .usage(Usage(promptTokens: 3, completionTokens: 4)), .finish(.toolCalls)] {
            encoder.encode(event, into: &out)
        }
        let frames = String(decoding: out, as: UTF8.self).components(separatedBy: "\n\n").filter { !$0.isEmpty }
        let types = frames.map { $0.split(separator: "\n")[0].dropFirst("event: ".count) }
        #expect(types == ["response.created", "response.in_progress",
                          "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done", "response.output_item.done",
                          "response.output_item.added", "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                          "response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"])
        for (number, frame) in frames.enumerated() {
            #expect(frame.contains("\"sequence_number\":\(number),"))
        }
        // The final response carries every item, complete.
        #expect(frames.last?.contains(#""type":"output_text","text":"Hi!""#) == true)
        #expect(frames.last?.contains(#""call_id":"call_1","name":"f","arguments":"{}","status":"completed""#) == true)
    }

    @Test func anthropicStreamOpensAndClosesBlocksInOrder() {
        var encoder = AnthropicStreamEncoder(id: "msg_1", model: "m")
        var out: [UInt8] = []
        for event: GenerationEvent in [.reasoning("hm"), .content("Hi"),
                                       .toolCall(ToolCallDelta(index: 0, id: "abc", name: "f", arguments: "{\"a\":")),
                                       .toolCall(ToolCallDelta(index: 0, id: nil, name: nil, arguments: "1}")),
                                       .usage(Usage(promptTokens: 3, completionTokens: 4)), .finish(.toolCalls)] {
            encoder.encode(event, into: &out)
        }
        let text = String(decoding: out, as: UTF8.self)
        let types = text.components(separatedBy: "\n\n").filter { !$0.isEmpty }.map { $0.split(separator: "\n")[0].dropFirst("event: ".count) }
        #expect(types == ["message_start", "ping",
                          "content_block_start", "content_block_delta", "content_block_stop",
                          "content_block_start", "content_block_delta", "content_block_stop",
                          "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                          "message_delta", "message_stop"])
        #expect(text.contains(#""id":"toolu_abc""#))
        #expect(text.contains(#""stop_reason":"tool_use""#))
        #expect(text.contains(#""usage":{"input_tokens":3,"output_tokens":4}"#))
    }
}

@Suite("ABI 1.1 in the dialects")
struct ABI11DialectTests {
    @Test func aStopSequenceFinishNamesItsStringInAnthropicOnly() throws {
        var anthropic = AnthropicStreamEncoder(id: "msg_1", model: "m")
        var out: [UInt8] = []
        anthropic.encode(.content("Hello"), into: &out)
        anthropic.encode(.finish(.stopSequence("STOP")), into: &out)
        let text = String(decoding: out, as: UTF8.self)
        #expect(text.contains("\"stop_reason\":\"stop_sequence\",\"stop_sequence\":\"STOP\""))
        #expect(FinishReason.stopSequence("STOP").openAIName == "stop")
        #expect(FinishReason.timeLimit.anthropicName == "max_tokens")
    }

    @Test func progressIsForwardedOnlyWhenAskedFor() {
        var quiet = ChatCompletionStreamEncoder(id: "c", created: 0, model: "m", includeUsage: false)
        var out: [UInt8] = []
        quiet.encode(.progress(PromptProgress(processed: 5, total: 10)), into: &out)
        #expect(out.isEmpty)
        var loud = ChatCompletionStreamEncoder(id: "c", created: 0, model: "m", includeUsage: false, includeProgress: true)
        loud.encode(.progress(PromptProgress(processed: 5, total: 10, cached: 2, elapsedMilliseconds: 7)), into: &out)
        #expect(String(decoding: out, as: UTF8.self).contains("\"choices\":[],\"prompt_progress\":{\"total\":10,\"cache\":2,\"processed\":5,\"time_ms\":7}"))
    }

    @Test func dataURLImagesBecomeByteInputs() throws {
        var request = NormalizedRequest(kind: .chat, maxTokens: 1, maxWallMilliseconds: 0)
        request.messages = [.object([("role", .string("user")), ("content", .array([
            .object([("type", .string("text")), ("text", .string("see"))]),
            .object([("type", .string("image_url")), ("image_url", .object([("url", .string("data:image/png;base64,AAEC"))]))]),
            .object([("type", .string("image_url")), ("image_url", .object([("url", .string("https://example.com/a.png"))]))]),
        ]))])]
        try request.moveImagesToByteInputs()
        #expect(request.inputs == [ByteInput(name: "image-0", mediaType: "image/png", bytes: [0, 1, 2])])
        let parts = try #require(request.messages[0]["content"]?.arrayValue)
        #expect(parts[1]["image"]?["input"]?.stringValue == "image-0")
        #expect(parts[2]["image_url"]?["url"]?.stringValue == "https://example.com/a.png")
        #expect(request.hasImage)

        var broken = NormalizedRequest(kind: .chat, maxTokens: 1, maxWallMilliseconds: 0)
        broken.messages = [.object([("role", .string("user")), ("content", .array([
            .object([("type", .string("image_url")), ("image_url", .object([("url", .string("data:image/png,rawbytes"))]))]),
        ]))])]
        #expect(throws: APIError.self) { try broken.moveImagesToByteInputs() }
    }
}
