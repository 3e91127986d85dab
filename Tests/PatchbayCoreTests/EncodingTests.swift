import Foundation
import Testing

@testable import PatchbayCore

@Suite("Wire encoding")
struct EncodingTests {
    /// The JSON objects of each `data:` frame, and whether the stream ended with [DONE].
    func frames(_ bytes: [UInt8]) throws -> (objects: [[String: Any]], done: Bool) {
        let text = String(decoding: bytes, as: UTF8.self)
        var objects: [[String: Any]] = []
        var done = false
        for frame in text.components(separatedBy: "\n\n") where frame.hasPrefix("data: ") {
            let payload = String(frame.dropFirst(6))
            if payload == "[DONE]" { done = true; continue }
            objects.append(try #require(JSONSerialization.jsonObject(with: Data(payload.utf8)) as? [String: Any]))
        }
        return (objects, done)
    }

    @Test func escapesEveryCharacterJSONRequires() throws {
        var writer = JSONWriter()
        let nasty = "quote\" backslash\\ newline\n tab\t bell\u{07} emoji😀 é"
        writer.string(nasty)
        let decoded = try JSONSerialization.jsonObject(with: Data(writer.bytes), options: .fragmentsAllowed) as? String
        #expect(decoded == nasty)
    }

    @Test func streamHasRoleFirstThenDeltasFinishUsageAndDone() throws {
        var encoder = ChatCompletionStreamEncoder(id: "chatcmpl-1", created: 1, model: "m", includeUsage: true)
        var out: [UInt8] = []
        for event: GenerationEvent in [
            .reasoning("hmm"), .content("Hel"), .content("lo"),
            .usage(Usage(promptTokens: 3, completionTokens: 2)), .finish(.stop),
        ] {
            encoder.encode(event, into: &out)
        }
        let (objects, done) = try frames(out)
        #expect(done)
        #expect(objects.count == 5)
        let deltas = objects.compactMap { (($0["choices"] as? [[String: Any]])?.first?["delta"]) as? [String: Any] }
        #expect(deltas[0]["role"] as? String == "assistant")
        #expect(deltas[0]["reasoning_content"] as? String == "hmm")
        #expect(deltas[1]["content"] as? String == "Hel")
        #expect(deltas[1]["role"] == nil)
        let finish = (objects[3]["choices"] as? [[String: Any]])?.first?["finish_reason"] as? String
        #expect(finish == "stop")
        let usage = objects[4]["usage"] as? [String: Any]
        #expect(usage?["total_tokens"] as? Int == 5)
        #expect((objects[4]["choices"] as? [Any])?.isEmpty == true)
    }

    @Test func toolCallDeltasNameTheCallOnceThenStreamArguments() throws {
        var encoder = ChatCompletionStreamEncoder(id: "c", created: 1, model: "m", includeUsage: false)
        var out: [UInt8] = []
        encoder.encode(.toolCall(ToolCallDelta(index: 0, id: "call_1", name: "get_weather", arguments: "")), into: &out)
        encoder.encode(.toolCall(ToolCallDelta(index: 0, id: nil, name: nil, arguments: "{\"a\":")), into: &out)
        encoder.encode(.finish(.toolCalls), into: &out)
        let (objects, _) = try frames(out)
        let calls = objects.prefix(2).map {
            ((($0["choices"] as? [[String: Any]])?.first?["delta"] as? [String: Any])?["tool_calls"] as? [[String: Any]])?.first
        }
        #expect(calls[0]?["id"] as? String == "call_1")
        #expect((calls[0]?["function"] as? [String: Any])?["name"] as? String == "get_weather")
        #expect(calls[1]?["id"] == nil)
        #expect((calls[1]?["function"] as? [String: Any])?["arguments"] as? String == "{\"a\":")
        #expect((objects[2]["choices"] as? [[String: Any]])?.first?["finish_reason"] as? String == "tool_calls")
    }

    @Test func cancelledRunsFinishAsStopAndTimeLimitAsLength() {
        #expect(FinishReason.cancelled.openAIName == "stop")
        #expect(FinishReason.timeLimit.openAIName == "length")
    }

    @Test func midStreamErrorIsInBandThenDone() throws {
        var encoder = ChatCompletionStreamEncoder(id: "c", created: 1, model: "m", includeUsage: false)
        var out: [UInt8] = []
        encoder.encode(.error(HostError(.engineFailed, "lost connection to the model server", code: "engine_unavailable")), into: &out)
        let (objects, done) = try frames(out)
        #expect(done)
        #expect((objects[0]["error"] as? [String: Any])?["message"] as? String == "lost connection to the model server")
    }

    @Test func accumulatorBuildsOneCompletion() throws {
        var result = ChatCompletionAccumulator()
        for event: GenerationEvent in [
            .toolCall(ToolCallDelta(index: 0, id: "call_9", name: "f", arguments: "{\"x\"")),
            .toolCall(ToolCallDelta(index: 0, id: nil, name: nil, arguments: ":1}")),
            .usage(Usage(promptTokens: 1, completionTokens: 2)), .finish(.toolCalls),
        ] {
            result.add(event)
        }
        let json = try #require(JSONSerialization.jsonObject(with: Data(result.response(id: "x", created: 1, model: "m"))) as? [String: Any])
        let choice = try #require((json["choices"] as? [[String: Any]])?.first)
        let message = try #require(choice["message"] as? [String: Any])
        #expect(message["content"] is NSNull)
        let call = try #require((message["tool_calls"] as? [[String: Any]])?.first)
        #expect((call["function"] as? [String: Any])?["arguments"] as? String == "{\"x\":1}")
        #expect(choice["finish_reason"] as? String == "tool_calls")
    }

    @Test func envelopesHaveEachDialectsShape() throws {
        let error = APIError.invalidRequest("bad", param: "messages", code: "invalid_value")
        let openAI = try #require(JSONSerialization.jsonObject(with: Data(error.openAIEnvelope)) as? [String: [String: Any]])
        #expect(openAI["error"]?["type"] as? String == "invalid_request_error")
        #expect(openAI["error"]?["param"] as? String == "messages")
        let anthropic = try #require(JSONSerialization.jsonObject(with: Data(error.anthropicEnvelope)) as? [String: Any])
        #expect(anthropic["type"] as? String == "error")
        #expect((anthropic["error"] as? [String: Any])?["message"] as? String == "bad")
    }
}
