import Testing

@testable import PatchbayServer

/// A run as the state machine sees it: something to tell apart.
final class FakeRun: Equatable, Sendable {
    static func == (a: FakeRun, b: FakeRun) -> Bool { a === b }
}

typealias State = GenerationState<FakeRun>

extension State.CancelAction {
    var stopsRun: FakeRun? { if case .cancelRun(let run) = self { run } else { nil } }
    var leavesQueue: Bool { if case .leaveQueue = self { true } else { false } }
    var isNone: Bool { if case .none = self { true } else { false } }
}

@Suite("Generation state: every phase, every way out")
struct GenerationStateTests {
    @Test func aGenerationWalksItsPhasesInOrder() {
        var state = State(waitingForModel: true)
        #expect(state.phase == .waitingForModel)
        state.modelArrived()
        #expect(state.phase == .queued)
        let run = FakeRun()
        #expect(state.started(run) == false)
        #expect(state.phase == .running)
        #expect(state.run == run)
        let ended = state.runEnded()
        #expect(state.phase == .draining)
        #expect(ended.releaseRun)
        #expect(!ended.releaseResponse)
        let done = state.end()
        #expect(state.phase == .ended)
        #expect(done.releaseResponse)
        #expect(!done.releaseRun, "the run's resources go back once only")
        #expect(done.cancel == nil, "a finished run is not cancelled")
    }

    @Test func aLoadedModelSkipsTheWait() {
        #expect(State(waitingForModel: false).phase == .queued)
    }

    @Test func aCancelWhileTheModelLoadsStartsTheRunCancelled() {
        var state = State(waitingForModel: true)
        let (first, action) = state.cancel()
        #expect(first)
        #expect(action.isNone, "nothing to stop yet; the load is shared with others")
        state.modelArrived()
        let cancelAtStart = state.started(FakeRun())
        #expect(cancelAtStart, "the engine is told to stop the moment the run exists")
    }

    @Test func aCancelInLineLeavesTheLine() {
        var state = State(waitingForModel: false)
        let (first, action) = state.cancel()
        #expect(first)
        #expect(action.leavesQueue)
        let cancelAtStart = state.started(FakeRun())
        #expect(cancelAtStart)
    }

    @Test func aCancelWhileRunningStopsTheEngineOnce() {
        var state = State(waitingForModel: false)
        let run = FakeRun()
        _ = state.started(run)
        let (first, action) = state.cancel()
        #expect(first)
        #expect(action.stopsRun == run)
        let (again, repeated) = state.cancel()
        #expect(!again, "a second cancel is not counted")
        #expect(repeated.stopsRun == run, "but asking the engine again is harmless")
    }

    @Test func aCancelAfterTheEngineEndedIsANoOp() {
        var state = State(waitingForModel: false)
        _ = state.started(FakeRun())
        _ = state.runEnded()
        let (first, action) = state.cancel()
        #expect(!first)
        #expect(action.isNone)
        _ = state.end()
        let late = state.cancel()
        #expect(!late.first)
    }

    @Test func aResponseDroppedWhileRunningCancelsTheRunAndLetsItsEndGiveBack() {
        var state = State(waitingForModel: false)
        let run = FakeRun()
        _ = state.started(run)
        let dropped = state.end()
        #expect(dropped.cancel == run)
        #expect(!dropped.releaseRun, "the slot stays taken until the engine returns")
        #expect(dropped.releaseResponse)
        #expect(state.phase == .ended)
        let engineDone = state.runEnded()
        #expect(engineDone.releaseRun)
        #expect(state.phase == .ended)
    }

    @Test(arguments: [true, false])
    func aGenerationThatFailsBeforeItsRunGivesEverythingBack(waitingForModel: Bool) {
        var state = State(waitingForModel: waitingForModel)
        let failed = state.end()
        #expect(failed.releaseRun)
        #expect(failed.releaseResponse)
        #expect(failed.cancel == nil)
        #expect(state.phase == .ended)
        let again = state.end()
        #expect(!again.releaseRun && !again.releaseResponse, "ending twice gives back nothing twice")
    }

    @Test func aRunCannotStartAfterTheEnd() {
        var state = State(waitingForModel: false)
        _ = state.end()
        let cancelAtStart = state.started(FakeRun())
        #expect(cancelAtStart, "a run started after the end is cancelled at once")
        #expect(state.phase == .ended)
        #expect(state.run == nil)
    }

    @Test func clientDepartureIsACancelInEveryPhase() {
        for phase in [State.Phase.waitingForModel, .queued, .running] {
            var state = State(waitingForModel: phase == .waitingForModel)
            if phase == .running { _ = state.started(FakeRun()) }
            let (first, _) = state.cancel()
            #expect(first, "\(phase)")
            #expect(state.isCancelled)
        }
    }

    @Test func aWriteStallsOnlyWhileItWaits() {
        var state = State(waitingForModel: false)
        let start = ContinuousClock.now
        #expect(!state.writeStalled(at: start + .seconds(100), limit: .seconds(1)), "no write in progress")
        state.writeBegan(at: start)
        #expect(!state.writeStalled(at: start + .milliseconds(500), limit: .seconds(1)))
        #expect(state.writeStalled(at: start + .seconds(1), limit: .seconds(1)))
        state.writeEnded()
        #expect(!state.writeStalled(at: start + .seconds(5), limit: .seconds(1)))
    }

    @Test func eachPhaseNamesItsSilence() {
        #expect(State.Phase.waitingForModel.silenceComment == "loading model")
        #expect(State.Phase.queued.silenceComment == "queued")
        #expect(State.Phase.running.silenceComment == "keep-alive")
    }
}

extension GenerationStateTests {
    @Test func endingTwiceWhileTheEngineFinishesGivesBackOnlyWhenItReturns() {
        var state = State(waitingForModel: false)
        _ = state.started(FakeRun())
        _ = state.end()  // the response is done
        let dropped = state.end()  // and its hold lets go
        #expect(!dropped.releaseRun, "the engine has not returned the run yet")
        #expect(state.runEnded().releaseRun)
    }
}
