/// Everything an operator can set on `patchbay serve`.
public struct ServerConfiguration: Sendable {
    public var host = "127.0.0.1"
    public var port = 8000
    /// Shared libraries in this folder are opened as plugins at start.
    public var pluginDirectory: String?
    /// When set, every route but `/health` needs `Authorization: Bearer <key>` or `x-api-key: <key>`.
    public var apiKey: String?
    /// Request bodies larger than this are refused with 413.
    public var maxBodyBytes = 100 * 1024 * 1024
    /// The wall-clock cap on one generation, the second line of defence after `max_tokens`.
    public var maxGenerationDuration: Duration = .seconds(600)
    /// On SIGTERM/SIGINT, in-flight generations get this long to finish before they are cancelled.
    public var shutdownGracePeriod: Duration = .seconds(10)
    /// When a request sets no `max_tokens` and the model's context length is unknown.
    public var fallbackMaxTokens = 32768
    /// Plugin names in order of preference, for a model file several plugins can load
    /// (otherwise: the highest probe score, then the plugin's name).
    public var backendPreference: [String] = []
    /// A stream whose engine is still silent (prompt processing) commits to 200 after this
    /// long, then gets an SSE comment at this interval, which also reveals a client that left.
    public var keepAliveInterval: Duration = .seconds(1)

    public init() {}
}
