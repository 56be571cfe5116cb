// A test that overruns its time is killed and its mounts detached: a FUSE hang fails one test.

import Foundation
import Glibc

// MARK: - watchdog

func logStderr(_ msg: String) {
    let line = Array((msg + "\n").utf8)
    _ = line.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
}

/// SIGKILLs every live daemon when a test overruns its budget (aborting the FUSE connection so
/// blocked syscalls fail with ENOTCONN). If the test is still stuck `grace` seconds later, the
/// mounts are detached and the whole test process exits, so CI never hangs.
final class Watchdog: @unchecked Sendable {
    private let lock = NSLock()
    private var _fired = false
    private var cancelled = false
    let budget: Double
    let name: String

    init(name: String, budget: Double, grace: Double = 20) {
        self.name = name
        self.budget = budget
        let q = DispatchQueue.global()
        q.asyncAfter(deadline: .now() + budget) { [self] in
            let go = lock.withLock { () -> Bool in
                if cancelled { return false }
                _fired = true
                return true
            }
            guard go else { return }
            let live = Live.shared.snapshot
            logStderr("WATCHDOG: \(name) exceeded \(budget)s; SIGKILL daemons \(live.pids)")
            for pid in live.pids { kill(pid, SIGKILL) }
        }
        q.asyncAfter(deadline: .now() + budget + grace) { [self] in
            let go = lock.withLock { !cancelled }
            guard go else { return }
            let live = Live.shared.snapshot
            logStderr("WATCHDOG: \(name) still stuck \(grace)s after killing the daemon; detaching \(live.mounts) and exiting")
            for pid in live.pids { kill(pid, SIGKILL) }
            for m in live.mounts { umount2(m, Int32(MNT_DETACH)) }
            _exit(70)
        }
    }
    var fired: Bool { lock.withLock { _fired } }
    func cancel() { lock.withLock { cancelled = true } }
}
