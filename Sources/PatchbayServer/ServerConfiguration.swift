/// Everything an operator can set on `patchbay serve`.
public struct ServerConfiguration: Sendable {
    public var host = "127.0.0.1"
    public var port = 8000
    /// Shared libraries in these folders are opened as plugins at start, and
    /// `/api/plugins/load` opens libraries from these folders only.
    public var pluginDirectories: [String] = []
    /// When set, every route but `/health` needs `Authorization: Bearer <key>` or `x-api-key: <key>`.
    public var apiKey: String?
    /// When set, the management routes (load, unload, validate, plugins) need this key
    /// instead of `apiKey`; it is accepted on every other route too.
    public var adminKey: String?
    /// Host names accepted in the `Host` header besides loopback names and the bound
    /// address: exact names, `*.example.com` for a domain's subdomains, or `*` for any.
    public var allowedHosts: [String] = []
    /// Web origins (`https://app.example.com`) whose pages may call the API, or `*` for
    /// any. Empty: cross-origin requests are refused.
    public var corsOrigins: [String] = []
    /// A response write the client does not take for this long cuts the connection
    /// (a client that stopped reading must not hold an engine).
    public var writeTimeout: Duration = .seconds(30)
    /// Request bodies larger than this are refused with 413.
    public var maxBodyBytes = 100 * 1024 * 1024
    /// An audio file for transcription larger than this is refused with 413 (OpenAI's limit).
    public var maxAudioBytes = 25 * 1024 * 1024
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
    /// Requests that may wait for a model's slots, per model; past it, 429.
    public var maxQueue = 64
    /// false: every request goes to its engine at once, which queues (or refuses) by itself.
    public var admissionQueue = true
    /// One log line per request.
    public var accessLog = true
    /// Model files here can be named in requests and load on first use, and `/v1/models`
    /// lists them.
    public var modelsDirectory: String?
    /// How long a model may sit idle before it is unloaded, unless its load says
    /// (`keep_alive`); nil keeps models loaded until unloaded by hand.
    public var modelKeepAlive: Duration?
    /// A request that waited this long for a slot gets 503.
    public var queueTimeout: Duration = .seconds(300)

    public init() {}
}
