import CFuse
import Glibc

/// One charge helper process: a fork of the daemon (see cfuse_spawn_charge_helper in shim.h) that
/// sits in the leaf cgroup and fallocates arena ranges on request, so their pages are charged to
/// that cgroup. Not thread-safe: the charger serialises all use under its lock.
///
/// It ends when the daemon does: its socket reads EOF once the daemon's end closes (process exit
/// closes it). PR_SET_PDEATHSIG is only a second line: it fires when the *thread* that forked
/// exits, so a helper (re)spawned from a FUSE worker thread that later ends is killed; the next
/// charge then sees it gone, respawns it and retries (one log line).
/// v1 caveat: with memory.move_charge_at_immigrate set on the target, moving the helper in could
/// move charges of pages mapped in the address space it inherited; v2 has no such thing.
struct ChargeHelper: Sendable {
    let pid: pid_t
    let socket: Int32

    enum Death: Sendable, CustomStringConvertible {
        case exited(Int32), signaled(Int32), unknown(Int32)
        var description: String {
            switch self {
            case .exited(let c): return "exited with status \(c)"
            case .signaled(let s): return "killed by signal \(s)"
            case .unknown(let e): return "ended (status unavailable: \(String(cString: strerror(e))))"
            }
        }
    }

    enum Outcome: Sendable {
        /// fallocate's result: 0 or an errno.
        case done(Int32)
        case died(Death)
    }

    /// Forks a helper, moves it into `leaf`, makes it the OOM killer's first choice, then lets it
    /// run. Throws with the helper already gone on failure.
    static func spawn(arena: Int32, leaf: CgroupLeaf, userPath: String) throws(CgroupError) -> ChargeHelper {
        var sock: Int32 = -1
        let pid = cfuse_spawn_charge_helper(arena, &sock)
        guard pid > 0 else {
            throw CgroupError(.io, "memcg=\(userPath): cannot fork the charge helper: \(String(cString: strerror(errno)))")
        }
        let helper = ChargeHelper(pid: pid, socket: sock)
        // Into the leaf before it touches anything: every page it instantiates is then the target's.
        let e = cgWriteFile(leaf.procsPath, "\(pid)\n")
        if e != 0 {
            helper.kill()
            throw e == ENOENT || e == ENODEV
                ? CgroupError(.gone, "memcg=\(userPath): the leaf cgroup \(leaf.path) was removed")
                : cgErrnoError(userPath, e, what: "moving the charge helper into \(leaf.procsPath)")
        }
        // If the kernel ever OOM-kills in the target despite our headroom check, the helper must
        // be the victim, never a workload.
        let o = cgWriteFile("/proc/\(pid)/oom_score_adj", "1000\n")
        if o != 0 {
            helper.kill()
            throw cgErrnoError(userPath, o, what: "setting oom_score_adj of the charge helper")
        }
        var go: UInt8 = UInt8(ascii: "g")
        guard send(sock, &go, 1, Int32(MSG_NOSIGNAL)) == 1 else {
            let death = helper.kill()
            throw CgroupError(.io, "memcg=\(userPath): the charge helper \(death) before starting")
        }
        return helper
    }

    /// One fallocate round trip. After `.died` the helper is reaped and its socket closed. A helper that does not answer within `timeoutMs` is killed.
    func request(offset: Int64, length: Int64, timeoutMs: Int32) -> Outcome {
        var rq = cfuse_charge_request(offset: offset, length: length)
        while true {
            let n = send(socket, &rq, MemoryLayout<cfuse_charge_request>.size, Int32(MSG_NOSIGNAL))
            if n == MemoryLayout<cfuse_charge_request>.size { break }
            if n < 0 && errno == EINTR { continue }
            return .died(gone())
        }
        var pfd = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&pfd, 1, timeoutMs)
            if r > 0 { break }
            if r < 0 && errno == EINTR { continue }
            if r == 0 {
                Log.line("charge helper pid \(pid) did not answer within \(timeoutMs / 1000) s; killing it")
                return .died(kill())
            }
            return .died(gone())
        }
        var rp = cfuse_charge_reply(err: 0)
        while true {
            let n = recv(socket, &rp, MemoryLayout<cfuse_charge_reply>.size, 0)
            if n == MemoryLayout<cfuse_charge_reply>.size { return .done(rp.err) }
            if n < 0 && errno == EINTR { continue }
            return .died(gone())  // EOF: it is gone
        }
    }

    /// Ends the helper: closing our end gives it EOF, after which it exits; SIGKILL after ~1 s.
    @discardableResult
    func stop() -> Death {
        close(socket)
        return reap(graceMs: 1000)
    }

    @discardableResult
    func kill() -> Death {
        _ = Glibc.kill(pid, SIGKILL)
        close(socket)
        return reap()
    }

    /// After EOF/EPIPE: the helper is exiting; close our end and collect its status.
    private func gone() -> Death {
        close(socket)
        return reap()
    }

    /// Waits for the helper (it is exiting, or about to be killed after `graceMs`).
    private func reap(graceMs: Int = 2000) -> Death {
        var st: Int32 = 0
        var waited = 0
        while true {
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid { break }
            if r < 0 {
                if errno == EINTR { continue }
                return .unknown(errno)  // someone else reaped it (a SIGCHLD handler)
            }
            if waited >= graceMs {
                _ = Glibc.kill(pid, SIGKILL)
                while waitpid(pid, &st, 0) < 0 {
                    if errno != EINTR { return .unknown(errno) }
                }
                break
            }
            usleep(2000)
            waited += 2
        }
        if cfuse_wifsignaled(st) != 0 { return .signaled(cfuse_wtermsig(st)) }
        return .exited(cfuse_wexitstatus(st))
    }

    // Raw access for tests (which cannot import CFuse next to Foundation).

    /// Forks a helper that waits for "go" (never sent here); nil on failure.
    static func forkUnstarted(arena: Int32) -> (pid: pid_t, socket: Int32)? {
        var sock: Int32 = -1
        let pid = cfuse_spawn_charge_helper(arena, &sock)
        return pid > 0 ? (pid, sock) : nil
    }

    /// The signal that ended a process, from a waitpid status; nil if it exited.
    static func terminationSignal(_ status: Int32) -> Int32? {
        cfuse_wifsignaled(status) != 0 ? cfuse_wtermsig(status) : nil
    }
}
