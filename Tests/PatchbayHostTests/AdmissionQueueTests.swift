import Testing

@testable import PatchbayHost

@Suite("Admission queue")
struct AdmissionQueueTests {
    @Test func admitsAsManyAsItHasSlotsAndQueuesTheRest() async {
        let queue = AdmissionQueue(slots: 2, capacity: 1)
        let first = queue.enter(), second = queue.enter(), third = queue.enter()
        #expect(first?.isAdmitted == true)
        #expect(second?.isAdmitted == true)
        #expect(third?.isAdmitted == false)
        #expect(queue.enter() == nil, "the line holds one")
        #expect(queue.counts == (running: 2, waiting: 1))
        first?.release()
        #expect(await third?.wait(upTo: .seconds(5)) == .admitted, "a released slot passes to the first in line")
        #expect(queue.counts == (running: 2, waiting: 0))
    }

    @Test func firstComeFirstServed() async {
        let queue = AdmissionQueue(slots: 1, capacity: 3)
        let running = queue.enter()!
        let a = queue.enter()!, b = queue.enter()!
        running.release()
        #expect(a.isAdmitted)
        #expect(!b.isAdmitted)
        a.release()
        #expect(await b.wait(upTo: .seconds(5)) == .admitted)
    }

    @Test func aWithdrawnTicketLeavesTheLineAndIsSkipped() async {
        let queue = AdmissionQueue(slots: 1, capacity: 2)
        let running = queue.enter()!
        let gone = queue.enter()!, next = queue.enter()!
        #expect(gone.withdraw())
        #expect(await gone.wait(upTo: .seconds(1)) == .withdrawn)
        #expect(queue.counts.waiting == 1)
        running.release()
        #expect(next.isAdmitted)
        gone.release()  // never admitted: gives back nothing
        #expect(queue.counts == (running: 1, waiting: 0))
    }

    @Test func aWaitThatRunsOutLeavesTheTicketInLine() async {
        let queue = AdmissionQueue(slots: 1, capacity: 1)
        _ = queue.enter()
        let waiting = queue.enter()!
        #expect(await waiting.wait(upTo: .milliseconds(20)) == nil)
        #expect(queue.counts.waiting == 1)
    }

    @Test func anAdmittedTicketCannotBeWithdrawnAndReleasesOnce() {
        let queue = AdmissionQueue(slots: 1, capacity: 0)
        let ticket = queue.enter()!
        #expect(!ticket.withdraw())
        ticket.release()
        ticket.release()
        #expect(queue.counts == (running: 0, waiting: 0))
    }

    @Test func anEngineWithoutSlotsIsNotHeldBack() {
        let queue = AdmissionQueue(slots: nil, capacity: 0)
        let tickets = (0..<100).compactMap { _ in queue.enter() }
        #expect(tickets.count == 100)
        #expect(tickets.allSatisfy { $0.isAdmitted })
    }
}
