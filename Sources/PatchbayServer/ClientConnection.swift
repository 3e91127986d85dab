import Hummingbird
import NIOCore
import Synchronization

/// One client's TCP connection as a route sees it: whether the client has gone away, a
/// hook that runs when it does, and a way to cut it off.
///
/// A client that goes away while its request is in flight (it closed its socket, or the
/// connection dropped) must stop its run: otherwise the engine works on to `max_tokens`
/// for nobody. Streams also notice through a failed write, but a non-streaming request,
/// or a stream whose engine is still silent, writes nothing for a long time.
final class ClientConnection: Sendable {
    private struct State {
        var gone = false
        var hook: (token: UInt64, body: @Sendable () -> Void)?
        var nextToken: UInt64 = 0
    }

    private let channel: any Channel
    private let state = Mutex(State())

    init(channel: any Channel) {
        self.channel = channel
    }

    var isGone: Bool { state.withLock { $0.gone } }

    /// Runs `body` once when the client goes away, at once if it already has. One hook per
    /// connection (HTTP/1.1 serves one request at a time); it replaces an earlier one.
    /// Returns a token for `removeHook`.
    func onGone(_ body: @escaping @Sendable () -> Void) -> UInt64 {
        let (token, runNow) = state.withLock { state -> (UInt64, Bool) in
            state.nextToken += 1
            if state.gone { return (state.nextToken, true) }
            state.hook = (state.nextToken, body)
            return (state.nextToken, false)
        }
        if runNow { body() }
        return token
    }

    /// Removes the hook `token` installed, unless another replaced it since.
    func removeHook(_ token: UInt64) {
        state.withLock { state in
            if state.hook?.token == token { state.hook = nil }
        }
    }

    /// Closes the connection: a stalled write fails, the client sees the stream end.
    func close() {
        channel.close(promise: nil)
    }

    fileprivate func markGone() {
        let hook = state.withLock { state -> (@Sendable () -> Void)? in
            guard !state.gone else { return nil }
            state.gone = true
            defer { state.hook = nil }
            return state.hook?.body
        }
        hook?()
    }
}

/// The live connections by channel, so that a request's context can find its own.
final class ClientConnections: Sendable {
    static let shared = ClientConnections()
    private let connections = Mutex<[ObjectIdentifier: ClientConnection]>([:])

    func connection(for channel: any Channel) -> ClientConnection? {
        connections.withLock { $0[ObjectIdentifier(channel)] }
    }

    fileprivate func add(_ channel: any Channel) -> ClientConnection {
        let connection = ClientConnection(channel: channel)
        connections.withLock { $0[ObjectIdentifier(channel)] = connection }
        return connection
    }

    fileprivate func remove(_ channel: any Channel) {
        _ = connections.withLock { $0.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    var count: Int { connections.withLock { $0.count } }
}

/// Sits in each connection's pipeline and tells its `ClientConnection` when the client
/// left: the end of its input (the server allows half-closure, so a client's close shows
/// as that first) or the connection's end. Like nginx, a client that closes its side
/// while its request is in flight is taken to have given up on it.
final class ClientDepartureHandler: ChannelInboundHandler, RemovableChannelHandler {
    /// Requests pass through untouched.
    typealias InboundIn = Any

    private var connection: ClientConnection?

    func handlerAdded(context: ChannelHandlerContext) {
        connection = ClientConnections.shared.add(context.channel)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        ClientConnections.shared.remove(context.channel)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed { connection?.markGone() }
        context.fireUserInboundEventTriggered(event)
    }

    /// A request the HTTP parser refused (a head too large, broken framing) is answered
    /// with a 400 and the server's side shut; a client that still has bytes to send then
    /// never gets to close. Closing fully, once the 400 had a moment to go out, frees it.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let channel = context.channel
        channel.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection?.markGone()
        ClientConnections.shared.remove(context.channel)
        context.fireChannelInactive()
    }
}

/// The request context of every route: Hummingbird's basics plus the client's connection.
/// Which route it serves is filled in by the outermost middleware (`AccessLog`).
struct PatchbayRequestContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let connection: ClientConnection?
    var route = RouteTraits(dialect: .openAI, access: .inference, label: "unmatched")

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        connection = ClientConnections.shared.connection(for: source.channel)
    }
}
