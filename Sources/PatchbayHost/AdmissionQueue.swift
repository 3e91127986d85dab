import Foundation
import Synchronization

/// The door in front of one model: as many runs at once as the engine has slots, a bounded
/// first-come-first-served line behind them, and nothing else. An engine that does not
/// say how many runs it serves at once (`slots` nil) is not held back: it decides itself,
/// and may answer busy.
///
/// A caller takes a `Ticket`. It is admitted at once when a slot is free, refused when the
/// line is full, and otherwise waits in line; `withdraw` (a cancel, a client that left, a
/// timeout) takes it out of the line at once. An admitted ticket holds its slot until
/// `release`, which hands the slot to the first ticket in line.
public final class AdmissionQueue: Sendable {
    public let slots: Int?
    /// How many may wait in line.
    public let capacity: Int

    private struct State {
        var running = 0
        var line: [Ticket] = []
    }

    private let state = Mutex(State())

    public init(slots: Int?, capacity: Int) {
        self.slots = slots.map { max(1, $0) }
        self.capacity = max(0, capacity)
    }

    /// Runs holding a slot, and tickets waiting in line.
    public var counts: (running: Int, waiting: Int) { state.withLock { ($0.running, $0.line.count) } }

    /// A ticket: admitted, or in line. Nil when the line is full.
    public func enter() -> Ticket? {
        state.withLock { state -> Ticket? in
            if state.running < slots ?? .max && state.line.isEmpty {
                state.running += 1
                return Ticket(queue: self, admitted: true)
            }
            guard state.line.count < capacity else { return nil }
            let ticket = Ticket(queue: self, admitted: false)
            state.line.append(ticket)
            return ticket
        }
    }

    /// An admitted ticket's run ended: its slot goes to the first in line.
    fileprivate func release() {
        state.withLock { state in
            while !state.line.isEmpty {
                if state.line.removeFirst().admit() { return }  // the slot passes on; `running` stays
            }
            state.running -= 1
        }
    }

    fileprivate func leaveLine(_ ticket: Ticket) {
        state.withLock { state in state.line.removeAll { $0 === ticket } }
    }

    /// One place in front of the model.
    public final class Ticket: Sendable {
        public enum Outcome: Sendable { case admitted, withdrawn }

        private struct State {
            var outcome: Outcome?
            /// The caller of `wait` now, and which wait it is (a timed-out wait must not
            /// resume a later one).
            var waiter: (id: UInt64, continuation: CheckedContinuation<Outcome?, Never>)?
            var waits: UInt64 = 0
            var released = false
        }

        private let queue: AdmissionQueue
        private let state: Mutex<State>

        fileprivate init(queue: AdmissionQueue, admitted: Bool) {
            self.queue = queue
            state = Mutex(State(outcome: admitted ? .admitted : nil))
        }

        public var isAdmitted: Bool { state.withLock { $0.outcome == .admitted } }

        /// Waits until admitted or withdrawn, for at most `patience`: nil when it is still
        /// in line (it stays there).
        public func wait(upTo patience: Duration) async -> Outcome? {
            let id = state.withLock { state -> UInt64 in
                state.waits += 1
                return state.waits
            }
            let timer = Task { [self] in
                guard (try? await Task.sleep(for: patience)) != nil else { return }
                let waiter = state.withLock { state -> CheckedContinuation<Outcome?, Never>? in
                    guard let waiter = state.waiter, waiter.id == id else { return nil }
                    state.waiter = nil
                    return waiter.continuation
                }
                waiter?.resume(returning: nil)
            }
            defer { timer.cancel() }
            return await withCheckedContinuation { continuation in
                let outcome = state.withLock { state -> Outcome? in
                    if state.outcome == nil { state.waiter = (id, continuation) }
                    return state.outcome
                }
                if let outcome { continuation.resume(returning: outcome) }
            }
        }

        /// Decides the ticket, resuming its waiter. False when it was decided already.
        private func decide(_ outcome: Outcome) -> Bool {
            let (decided, waiter) = state.withLock { state -> (Bool, CheckedContinuation<Outcome?, Never>?) in
                guard state.outcome == nil else { return (false, nil) }
                state.outcome = outcome
                defer { state.waiter = nil }
                return (true, state.waiter?.continuation)
            }
            waiter?.resume(returning: outcome)
            return decided
        }

        /// Called by the queue with its lock held: false when the ticket was withdrawn meanwhile.
        fileprivate func admit() -> Bool { decide(.admitted) }

        /// Takes a waiting ticket out of line (a cancel, a client gone, a timeout). Returns
        /// false when it was already admitted: then it holds a slot, to be released.
        @discardableResult
        public func withdraw() -> Bool {
            guard decide(.withdrawn) else { return false }
            queue.leaveLine(self)
            return true
        }

        /// Gives an admitted ticket's slot back; once only, and nothing for one never admitted.
        public func release() {
            let owes = state.withLock { state -> Bool in
                guard state.outcome == .admitted, !state.released else { return false }
                state.released = true
                return true
            }
            if owes { queue.release() }
        }
    }
}
