/// What a generation streams back, in the host's terms (the Swift mirror of `pb_event`).
public enum GenerationEvent: Sendable, Equatable {
    case content(String)
    case reasoning(String)
    case toolCall(ToolCallDelta)
    case usage(Usage)
    case timings(Timings)
    /// Terminal.
    case finish(FinishReason)
    /// Terminal.
    case error(APIError)

    public var isTerminal: Bool {
        switch self {
        case .finish, .error: true
        default: false
        }
    }
}

public enum FinishReason: Sendable, Equatable {
    case stop, length, toolCalls, cancelled, timeLimit

    /// OpenAI's `finish_reason`. A cancelled run ends as "stop", as the reference does;
    /// the wall-clock cap truncates, so it reads as "length".
    public var openAIName: String {
        switch self {
        case .stop, .cancelled: "stop"
        case .length, .timeLimit: "length"
        case .toolCalls: "tool_calls"
        }
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
}
