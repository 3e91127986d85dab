/// What a generation streams back, in the host's terms (the Swift mirror of `pb_event`).
public enum GenerationEvent: Sendable, Equatable {
    case content(String)
    case reasoning(String)
    case toolCall(ToolCallDelta)
    case usage(Usage)
    case timings(Timings)
    /// Prompt processing is under way (no output yet); keeps the client's connection alive.
    case progress(PromptProgress)
    /// A transcribed piece of audio.
    case segment(TranscriptSegment)
    /// The language a transcription used or detected, with the detector's confidence (0 when not said).
    case language(String, probability: Double)
    /// Terminal.
    case finish(FinishReason)
    /// Terminal.
    case error(HostError)

    public var isTerminal: Bool {
        switch self {
        case .finish, .error: true
        default: false
        }
    }

    /// Progress says the engine is alive, but nothing a client is waiting for.
    public var isProgress: Bool {
        if case .progress = self { true } else { false }
    }
}

public enum FinishReason: Sendable, Equatable {
    case stop, length, toolCalls, cancelled, timeLimit
    /// A stop string matched; the string.
    case stopSequence(String)

    /// OpenAI's `finish_reason`. A cancelled run ends as "stop", as the reference does;
    /// the wall-clock cap truncates, so it reads as "length"; OpenAI has no name of its
    /// own for a stop sequence.
    public var openAIName: String {
        switch self {
        case .stop, .cancelled, .stopSequence: "stop"
        case .length, .timeLimit: "length"
        case .toolCalls: "tool_calls"
        }
    }

    /// The stop string that ended the generation, if one did.
    public var stopSequence: String? {
        if case .stopSequence(let text) = self { text } else { nil }
    }
}

/// How far prompt processing has come, in tokens (llama-server's `prompt_progress`).
public struct PromptProgress: Sendable, Equatable {
    public var processed: Int
    public var total: Int
    /// Tokens reused from a cache rather than processed.
    public var cached: Int
    /// Milliseconds since the run started, stamped by the host.
    public var elapsedMilliseconds: Int

    public init(processed: Int, total: Int, cached: Int = 0, elapsedMilliseconds: Int = 0) {
        self.processed = processed
        self.total = total
        self.cached = cached
        self.elapsedMilliseconds = elapsedMilliseconds
    }
}

/// One timed piece of a transcription.
public struct TranscriptSegment: Sendable, Equatable {
    public var startMilliseconds: Int
    public var endMilliseconds: Int
    public var text: String

    public init(startMilliseconds: Int, endMilliseconds: Int, text: String) {
        self.startMilliseconds = startMilliseconds
        self.endMilliseconds = endMilliseconds
        self.text = text
    }
}

public struct ToolCallDelta: Sendable, Equatable {
    public var index: Int
    /// Set on the first delta of a call.
    public var id: String?
    /// Set on the first delta of a call.
    public var name: String?
    public var arguments: String

    public init(index: Int, id: String?, name: String?, arguments: String) {
        self.index = index
        self.id = id
        self.name = name
        self.arguments = arguments
    }
}

public struct Usage: Sendable, Equatable {
    public var promptTokens: Int
    public var completionTokens: Int
    public var cachedTokens: Int

    public init(promptTokens: Int, completionTokens: Int, cachedTokens: Int = 0) {
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.cachedTokens = cachedTokens
    }
}

public struct Timings: Sendable, Equatable {
    public var promptMilliseconds: Double
    public var predictedMilliseconds: Double
    public var promptPerSecond: Double
    public var predictedPerSecond: Double

    public init(promptMilliseconds: Double, predictedMilliseconds: Double, promptPerSecond: Double, predictedPerSecond: Double) {
        self.promptMilliseconds = promptMilliseconds
        self.predictedMilliseconds = predictedMilliseconds
        self.promptPerSecond = promptPerSecond
        self.predictedPerSecond = predictedPerSecond
    }
}

/// Turns generation events into one dialect's streamed frames.
public protocol EventStreamEncoder: Sendable {
    mutating func encode(_ event: GenerationEvent, into out: inout [UInt8])
    /// An error after the stream began: the engine's (an `.error` event) or the server's
    /// (a queue timeout), as the stream's last frame.
    mutating func encode(error: APIError, into out: inout [UInt8])
}
