import CFuse
import Glibc
import Synchronization

/// A successor answers every request the kernel resent (FUSE_NOTIFY_RESEND, bit 63 of unique)
/// before it answers any other, then runs `drained` (the Bridge bumps the attribute version of
/// the files that lost a name in the last changes), then serves as usual.
///
/// Why: the kernel takes one off a file's cached link count when an UNLINK's reply arrives
/// (`fuse_entry_unlinked`), and sets the count from any reply that carries attributes unless
/// the inode's attribute version is newer than that request. A resent UNLINK the dead server
/// had applied answers late; a listing sent after the successor's first bump and answered
/// before that reply brings the count after the unlink (1), and the kernel's own decrement then
/// leaves 0: `ln` of the file's other name fails with ENOENT (docs/takeover.md, "Kill loops").
/// Answering resent requests first, then bumping again, leaves only the window any FUSE server
/// has (a request sent after the bump and answered before the unlinking caller runs).
///
/// How: the kernel puts resent requests at the head of its pending queue, so they are read
/// before any request queued later (FORGETs and INTERRUPTs come from queues of their own and
/// do not end the drain). While draining, reads are taken one at a time (a semaphore, which a
/// cancelled worker may hold without blocking the others' cancellation), so that the reader of
/// the first other request knows every resent one was counted; it waits for their replies, at
/// most `longestWait`, runs `drained`, and ends the drain. The bound is for a resent request
/// that cannot finish before a later one: a write waiting for a frozen cgroup's charge, or a
/// page-cache notification waiting on a page lock that a queued READ holds.
final class ResentFirst: @unchecked Sendable {
    private let draining = Atomic<Bool>(false)
    private let unanswered = Atomic<Int>(0)
    /// One reader at a time while draining.
    private let readToken: UnsafeMutablePointer<sem_t>
    private var drained: (() -> Void)?
    /// What the drain did, for the successor's log: resent requests answered first, and the wait.
    let answeredFirst = Atomic<Int>(0)
    let waitedMicroseconds = Atomic<UInt64>(0)
    let gaveUp = Atomic<Bool>(false)
    static let longestWait: UInt64 = 2_000_000  // µs

    init() {
        readToken = .allocate(capacity: 1)
        sem_init(readToken, 0, 1)
    }

    deinit {
        sem_destroy(readToken)
        readToken.deallocate()
    }

    /// Before the resend is asked and before any worker reads.
    func arm(drained: @escaping () -> Void) {
        self.drained = drained
        draining.store(true, ordering: .releasing)
    }

    /// The resend was not asked after all: serve as usual.
    func disarm() { draining.store(false, ordering: .releasing) }

    /// Wraps the read hook: `perform` reads one request into `buffer` and returns its length.
    /// Outside a drain, with no resent request unanswered, two loads and nothing else.
    func read(into buffer: UnsafeMutableRawPointer?, _ perform: () -> Int) -> Int {
        guard draining.load(ordering: .acquiring) || unanswered.load(ordering: .relaxed) > 0 else { return perform() }
        let thread = HandlingThread.current
        settle(thread)  // a resent request this thread handled without a reply (none should)
        guard draining.load(ordering: .acquiring) else { return perform() }
        while sem_wait(readToken) != 0 { if errno != EINTR { return perform() } }
        defer { sem_post(readToken) }
        guard draining.load(ordering: .acquiring) else { return perform() }
        let length = perform()
        guard length >= MemoryLayout<fuse_in_header>.size, let buffer else { return length }
        let header = buffer.loadUnaligned(as: fuse_in_header.self)
        if header.unique & FuseKernelFeatures.resentBit != 0 {
            unanswered.add(1, ordering: .acquiringAndReleasing)
            answeredFirst.add(1, ordering: .relaxed)
            thread?.awaitsResentReply = true
            return length
        }
        switch header.opcode {
        case FUSE_FORGET.rawValue, FUSE_BATCH_FORGET.rawValue, FUSE_INTERRUPT.rawValue: return length
        default: break
        }
        // The first request queued after every resent one: their replies first.
        let start = MonotonicClock.microseconds()
        var pause = timespec(tv_sec: 0, tv_nsec: 200_000)
        while unanswered.load(ordering: .acquiring) > 0 {
            if MonotonicClock.microseconds() - start > Self.longestWait { gaveUp.store(true, ordering: .relaxed); break }
            nanosleep(&pause, nil)
        }
        waitedMicroseconds.store(MonotonicClock.microseconds() - start, ordering: .relaxed)
        drained?()
        draining.store(false, ordering: .releasing)
        return length
    }

    /// From the writev hook, once a reply is written (`iov[0]` starts with its fuse_out_header):
    /// a resent request is answered. Nothing to look at while none is unanswered.
    func replied(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) {
        guard unanswered.load(ordering: .relaxed) > 0, let thread = HandlingThread.existing, thread.awaitsResentReply,
              count >= 1, iov[0].iov_len >= MemoryLayout<fuse_out_header>.size, let header = iov[0].iov_base,
              header.loadUnaligned(as: fuse_out_header.self).unique & FuseKernelFeatures.resentBit != 0 else { return }
        settle(thread)
    }

    private func settle(_ thread: HandlingThread?) {
        guard let thread, thread.awaitsResentReply else { return }
        thread.awaitsResentReply = false
        unanswered.subtract(1, ordering: .acquiringAndReleasing)
    }
}
