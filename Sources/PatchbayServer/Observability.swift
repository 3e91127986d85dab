import Foundation
import HTTPTypes
import Hummingbird
import Logging
import Metrics
import PatchbayCore
import PatchbayHost
import Prometheus
import Synchronization

// ─── What one request did ─────────────────────────────────────────────────────────────

/// One request as its access-log line tells it: filled in by the route (the model) and by
/// its run (tokens, time to first token, finish), read when the response is written.
final class RequestRecord: Sendable {
    /// The record of the request this task serves (set by `AccessLog`).
    @TaskLocal static var current: RequestRecord?

    let id: String
    let started = ContinuousClock.now

    private struct State {
        var model: String?
        var promptTokens: Int?
        var completionTokens: Int?
        var timeToFirstToken: Duration?
        var finish: String?
    }

    private let state = Mutex(State())

    init(id: String) {
        self.id = id
    }

    var model: String? {
        get { state.withLock { $0.model } }
        set { state.withLock { $0.model = newValue } }
    }

    /// Notes what a run's event tells.
    func observe(_ event: GenerationEvent) {
        state.withLock { state in
            switch event {
            case .content, .reasoning, .toolCall, .segment:
                if state.timeToFirstToken == nil { state.timeToFirstToken = .now - started }
            case .usage(let usage):
                state.promptTokens = usage.promptTokens
                state.completionTokens = usage.completionTokens
            case .finish(let reason):
                state.finish = reason.logName
            case .error(let error):
                state.finish = "error:\(error.code ?? String(APIError(error).status))"
            default: break
            }
        }
    }

    /// The run's figures to the metrics, once, at its end.
    func reportRun(to metrics: ServerMetrics) {
        let (model, usage, ttft, decodeTime) = state.withLock { state -> (String?, Usage?, Duration?, Duration?) in
            let usage = state.completionTokens.map { Usage(promptTokens: state.promptTokens ?? 0, completionTokens: $0) }
            return (state.model, usage, state.timeToFirstToken, state.timeToFirstToken.map { ContinuousClock.now - started - $0 })
        }
        if let model { metrics.run(model: model, usage: usage, timeToFirstToken: ttft, decodeTime: decodeTime) }
    }

    fileprivate var snapshot: (model: String?, prompt: Int?, completion: Int?, ttft: Duration?, finish: String?) {
        state.withLock { ($0.model, $0.promptTokens, $0.completionTokens, $0.timeToFirstToken, $0.finish) }
    }
}

extension FinishReason {
    var logName: String {
        switch self {
        case .stop: "stop"
        case .length: "length"
        case .toolCalls: "tool_calls"
        case .cancelled: "cancelled"
        case .timeLimit: "time_limit"
        case .stopSequence: "stop_sequence"
        }
    }
}

// ─── Metrics ──────────────────────────────────────────────────────────────────────────

/// The server's metrics, through swift-metrics; `GET /metrics` shows them in Prometheus's
/// text format through swift-prometheus. Without a registry (unit tests) they go nowhere.
public struct ServerMetrics: Sendable {
    let registry: PrometheusCollectorRegistry?

    /// A factory with buckets that suit inference: milliseconds to minutes, and tokens/s.
    public static func factory(registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
            .seconds(30), .seconds(60), .seconds(120), .seconds(300),
        ]
        factory.defaultValueHistogramBuckets = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
        return factory
    }

    /// Why a run was stopped before it finished on its own.
    enum CancelSource: String {
        case api, clientDisconnect = "client_disconnect", wallClock = "wall_clock", writeTimeout = "write_timeout"
        case shutdown, unload
    }

    func request(route: String, dialect: String, status: Int, duration: Duration) {
        let (requests, durations) = Self.requestMetrics.withLock { cache in
            let key = "\(route) \(dialect) \(status)"
            if let made = cache[key] { return made }
            let made = (Metrics.Counter(label: "patchbay_http_requests_total", dimensions: [("route", route), ("dialect", dialect), ("status", String(status))]),
                        Metrics.Timer(label: "patchbay_http_request_duration_seconds", dimensions: [("route", route)]))
            cache[key] = made
            return made
        }
        requests.increment()
        durations.record(duration: duration)
    }

    /// The per-request metrics, made once per label set: making one goes through the
    /// registry's lock and name checks, too dear for every request.
    private static let requestMetrics = Mutex<[String: (Metrics.Counter, Metrics.Timer)]>([:])

    /// A run's end: its time to first token, its tokens and its speed.
    func run(model: String, usage: Usage?, timeToFirstToken: Duration?, decodeTime: Duration?) {
        let dimensions = [("model", model)]
        if let timeToFirstToken {
            Metrics.Timer(label: "patchbay_time_to_first_token_seconds", dimensions: dimensions).record(duration: timeToFirstToken)
        }
        guard let usage else { return }
        Counter(label: "patchbay_prompt_tokens_total", dimensions: dimensions).increment(by: usage.promptTokens)
        Counter(label: "patchbay_generated_tokens_total", dimensions: dimensions).increment(by: usage.completionTokens)
        if let decodeTime, usage.completionTokens > 1, decodeTime > .zero {
            let seconds = Double(decodeTime.components.seconds) + Double(decodeTime.components.attoseconds) / 1e18
            Recorder(label: "patchbay_generation_tokens_per_second", dimensions: dimensions)
                .record(Double(usage.completionTokens - 1) / seconds)
        }
    }

    func cancelled(_ source: CancelSource, count: Int = 1) {
        guard count > 0 else { return }
        Counter(label: "patchbay_cancels_total", dimensions: [("source", source.rawValue)]).increment(by: count)
    }

    func modelLoad(backend: String, succeeded: Bool, duration: Duration) {
        Counter(label: "patchbay_model_loads_total", dimensions: [("backend", backend), ("outcome", succeeded ? "loaded" : "failed")])
            .increment()
        if succeeded {
            Metrics.Timer(label: "patchbay_model_load_duration_seconds", dimensions: [("backend", backend)]).record(duration: duration)
        }
    }

    func pluginRefused(count: Int = 1) {
        Counter(label: "patchbay_plugin_refusals_total").increment(by: count)
    }

    /// The Prometheus text, with the per-model gauges (runs, queue) read as of now.
    func exposition(models: [LoadedModel], gone: [String]) -> [UInt8] {
        for model in models {
            let (running, waiting) = model.admission.counts
            Gauge(label: "patchbay_active_runs", dimensions: [("model", model.id)]).record(model.activeRunCount)
            Gauge(label: "patchbay_queue_depth", dimensions: [("model", model.id)]).record(waiting)
            _ = running
        }
        for id in gone {
            Gauge(label: "patchbay_active_runs", dimensions: [("model", id)]).record(0)
            Gauge(label: "patchbay_queue_depth", dimensions: [("model", id)]).record(0)
        }
        var out: [UInt8] = []
        registry?.emit(into: &out)
        return out
    }
}

// ─── The access log ───────────────────────────────────────────────────────────────────

/// One log line and one request metric per request, written when the response has been
/// written (a stream's tokens are known only then). `x-request-id` is taken from the
/// client when it is sane, generated otherwise, echoed in the response, and handed to the
/// plugin with the run, which names it in its own log lines.
///
/// It is the outermost middleware, and tells the others which route they serve: the traits
/// the route declared (`RouteTable`), found by the path the router matched.
struct AccessLog: RouterMiddleware {
    typealias Context = PatchbayRequestContext
    /// nil: no log lines (--no-access-log), the id and the metrics still.
    let logger: Logger?
    let metrics: ServerMetrics
    let routes: RouteTable

    static var requestIDHeader: HTTPField.Name { HTTPField.Name("x-request-id")! }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        context.route = routes.traits(endpointPath: context.endpointPath, path: request.uri.path)
        let record = RequestRecord(id: Self.requestID(from: request.headers[Self.requestIDHeader]))
        var response = try await RequestRecord.$current.withValue(record) { try await next(request, context) }
        response.headers[Self.requestIDHeader] = record.id
        let status = Int(response.status.code)
        let body = response.body
        let (logger, metrics) = (logger, metrics)
        let route = context.route.label
        let method = request.method.rawValue
        let dialect = context.route.dialect.metricLabel
        let done: @Sendable () -> Void = {
            let duration = ContinuousClock.now - record.started
            metrics.request(route: route, dialect: dialect, status: status, duration: duration)
            if let logger { Self.log(record, method: method, route: route, status: status, duration: duration, to: logger) }
        }
        // A body of known length is complete already; a streamed one is logged once written.
        guard body.contentLength == nil else {
            done()
            return response
        }
        response.body = ResponseBody { writer in
            defer { done() }
            try await body.write(writer)
        }
        return response
    }

    /// The client's id when it is 1 to 128 visible ASCII characters; a fresh one otherwise.
    static func requestID(from header: String?) -> String {
        if let header, (1...128).contains(header.utf8.count), header.utf8.allSatisfy({ $0 > 32 && $0 < 127 }) { return header }
        return "req_\(randomHex(16))"
    }

    static func log(_ record: RequestRecord, method: String, route: String, status: Int, duration: Duration, to logger: Logger) {
        let (model, prompt, completion, ttft, finish) = record.snapshot
        var metadata: Logger.Metadata = [
            "request_id": .string(record.id), "route": .string("\(method) \(route)"), "status": .stringConvertible(status),
            "duration_ms": .string(milliseconds(duration)),
        ]
        if let model { metadata["model"] = .string(model) }
        if let prompt { metadata["prompt_tokens"] = .stringConvertible(prompt) }
        if let completion { metadata["completion_tokens"] = .stringConvertible(completion) }
        if let ttft { metadata["ttft_ms"] = .string(milliseconds(ttft)) }
        if let finish { metadata["finish"] = .string(finish) }
        logger.info("request", metadata: metadata)
    }

    static func milliseconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        return String(format: "%.1f", Double(seconds) * 1000 + Double(attoseconds) / 1e15)
    }
}

// ─── Log formats ──────────────────────────────────────────────────────────────────────

/// `--log-format json`: one JSON object per line on stderr, for log collectors.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    private let label: String

    public init(label: String) {
        self.label = label
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var members: [(key: String, value: JSONValue)] = [
            ("ts", .string(Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true)))),
            ("level", .string(event.level.rawValue)), ("logger", .string(label)),
            ("message", .string(event.message.description)),
        ]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }).sorted(by: { $0.key < $1.key }) {
            members.append((key, Self.json(value)))
        }
        var bytes = JSONValue.object(members).jsonBytes
        bytes.append(UInt8(ascii: "\n"))
        FileHandle.standardError.write(Data(bytes))
    }

    static func json(_ value: Logger.Metadata.Value) -> JSONValue {
        switch value {
        case .string(let text): .string(text)
        case .stringConvertible(let convertible):
            if let number = Int64(convertible.description) { .int(number) } else { .string(convertible.description) }
        case .array(let values): .array(values.map(json))
        case .dictionary(let dictionary): .object(dictionary.sorted { $0.key < $1.key }.map { ($0.key, json($0.value)) })
        }
    }
}
