import Dispatch
import Synchronization
import SystemPackage
@testable import ChargeFS

/// The charger the unit tests use instead of a cgroup: it charges in this process (as
/// `DaemonCharger` does) and can count its calls, keep a budget of pages and then refuse with
/// ENOSPC (a target at its limit), or hold every charge at a gate until `open` (a frozen
/// target's helper).
final class FakeCharger: PageCharger, @unchecked Sendable {
    private let inner: DaemonCharger
    private let calls_ = Atomic<Int>(0)
    private let waiting = Atomic<Int>(0)
    private let gate: DispatchSemaphore?
    /// Pages it will still charge; nil: no limit.
    var pagesLeft: Int?
    /// Runs at the start of every charge (what other writers do while a charge is under way).
    var duringCharge: (() -> Void)?

    init(arena: FileDescriptor, budget pages: Int? = nil, gated: Bool = false) {
        inner = DaemonCharger(arena: arena)
        pagesLeft = pages
        gate = gated ? DispatchSemaphore(value: 0) : nil
    }

    /// Charge calls so far (settable, to count from a point on).
    var calls: Int {
        get { calls_.load(ordering: .relaxed) }
        set { calls_.store(newValue, ordering: .relaxed) }
    }

    /// Charges waiting at the gate now.
    var chargesWaiting: Int { waiting.load(ordering: .relaxed) }

    /// Opens the gate for every charge from now on.
    func open() { gate?.signal() }

    func charge(offset: Int64, length: Int64) throws(Errno) {
        calls_.add(1, ordering: .relaxed)
        duringCharge?()
        if let gate {
            waiting.add(1, ordering: .relaxed)
            gate.wait()
            gate.signal()  // stays open for every later charge
            waiting.subtract(1, ordering: .relaxed)
        }
        let pages = Int(length) / PageSize.bytes
        if let left = pagesLeft, pages > left { throw .noSpace }
        try inner.charge(offset: offset, length: length)
        if let left = pagesLeft { pagesLeft = left - pages }
    }

    var summary: String { "fake" }
    func shutdown() {}
}
