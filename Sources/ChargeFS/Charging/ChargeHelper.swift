import CChargeHelper
import Glibc
import SystemPackage

/// The daemon's handle on one charge helper: the program chargefs-charge-helper (installed next
/// to chargefsd), started directly in the leaf cgroup with the arena and one end of a socket pair
/// (see CChargeHelper.h), which fallocates arena ranges on request so their pages are charged to
/// that cgroup. Its own memory is a few hundred KiB, charged to the target when it starts.
///
/// It ends when the daemon does: its socket reads EOF once the daemon's end closes (any exit of
/// the daemon closes it). Not thread-safe: the charger serialises all use.
struct ChargeHelper: Sendable {
    let pid: pid_t
    let socket: Int32

    static let programName = "chargefs-charge-helper"

    /// Where the helper program is: next to the running executable (chargefsd, or a test bundle).
    static func defaultPath() -> String {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return programName }
        let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let slash = exe.lastIndex(of: "/") else { return programName }
        return String(exe[...slash]) + programName
    }

    /// Opens the program and reads it once: its file pages are then in the page cache, charged
    /// to the daemon's cgroup, and stay there while the daemon holds the fd (some filesystems
    /// drop an inode's cache at its last close). A helper exec'd through this fd maps those
    /// cached pages, so the target is charged only with the helper's own memory (its stack,
    /// data and page tables: about 0.1 MiB).
    static func openProgram(_ path: String) -> Int32 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return -1 }
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        while let n = try? retryingInterrupts({ buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } }), n > 0 {}
        return fd
    }

    enum Death: Sendable, CustomStringConvertible {
        case exited(Int32), signaled(Int32), unknown(Int32)
        var description: String {
            switch self {
            case .exited(let c): return "exited with status \(c)"
            case .signaled(let s): return "was killed by signal \(s)"
            case .unknown(let e): return "ended (status unavailable: \(String(cString: strerror(e))))"
            }
        }
    }

    enum Outcome: Sendable {
        /// The helper's answer: 0 or an errno, and the file it sent back (CREATE_FILE), else -1.
        case done(Int32, file: Int32 = -1)
        case died(Death)
    }

    /// What the helper is asked to do.
    enum Request {
        /// Instantiate a range of the arena.
        case chargeArena(offset: Int64, length: Int64)
        /// Instantiate a range of another file of the arena's tmpfs (kept sized).
        case chargeFile(Int32, offset: Int64, length: Int64)
        /// Open a new unnamed file in a directory of the arena's tmpfs.
        case createFile(in: Int32)
    }

    /// What a wait for the helper may look at: whether its leaf is frozen (then it waits without a
    /// time limit, as any process of a frozen cgroup would), and whether to give up (unmount).
    struct Wait {
        var timeoutMs: Int
        var isFrozen: () -> Bool
        var cancelled: () -> Bool
    }

    /// Starts the helper in `leaf` and waits until it reports ready. Throws with it already gone
    /// on failure.
    static func start(executable: String, programFD: Int32, arena: Int32, leaf: CgroupLeaf, userPath: String,
                      wait: Wait) throws(CgroupError) -> ChargeHelper {
        let (dir, procs) = try leaf.openForSpawn(userPath: userPath)
        var sock: Int32 = -1
        var stage: Int32 = 0
        let pid = chargehelper_spawn(executable, programFD, arena, leaf.version == .v2 ? dir : -1, procs, &sock, &stage)
        let e = errno
        close(dir)
        close(procs)
        guard pid > 0 else {
            let reason = String(cString: strerror(e))
            switch stage {
            case 1:
                if e == ENOENT || e == ENODEV {
                    throw CgroupError(.gone, "memcg=\(userPath): the leaf cgroup \(leaf.path) was removed")
                }
                throw cgErrnoError(userPath, e, what: "starting the charge helper in \(leaf.path)")
            case 2:
                throw CgroupError(.io, "memcg=\(userPath): cannot run the charge helper \(executable): \(reason)")
            default:
                throw CgroupError(.io, "memcg=\(userPath): cannot start the charge helper: \(reason)")
            }
        }
        let helper = ChargeHelper(pid: pid, socket: sock)
        var ready: UInt8 = 0
        if case .died(let death) = helper.receive(&ready, count: 1, wait) {
            throw CgroupError(.io, "memcg=\(userPath): the charge helper \(death) before it was ready")
        }
        guard ready == UInt8(CHARGEHELPER_READY) else {
            helper.kill()
            throw CgroupError(.io, "memcg=\(userPath): the charge helper sent \(ready) instead of ready")
        }
        return helper
    }

    /// One round trip. After `.died` the helper is reaped and its socket closed.
    func request(_ what: Request, _ wait: Wait) -> Outcome {
        var rq: chargehelper_request
        var attached: Int32 = -1
        switch what {
        case .chargeArena(let offset, let length):
            rq = chargehelper_request(offset: offset, length: length, op: Int32(CHARGEHELPER_CHARGE_ARENA), reserved: 0)
        case .chargeFile(let fd, let offset, let length):
            rq = chargehelper_request(offset: offset, length: length, op: Int32(CHARGEHELPER_CHARGE_FILE), reserved: 0)
            attached = fd
        case .createFile(let directory):
            rq = chargehelper_request(offset: 0, length: 0, op: Int32(CHARGEHELPER_CREATE_FILE), reserved: 0)
            attached = directory
        }
        let size = MemoryLayout<chargehelper_request>.size
        let sent = try? retryingInterrupts { chargehelper_send_with_fd(socket, &rq, size, attached) }
        guard sent == size else { return .died(gone()) }
        var rp = chargehelper_reply(err: 0)
        var file: Int32 = -1
        if case .died(let death) = receive(&rp, count: MemoryLayout<chargehelper_reply>.size, wait, file: &file) {
            return .died(death)
        }
        return .done(rp.err, file: file)
    }

    /// Receives one message of `count` bytes into `value`. Waits in slices of a second: a frozen
    /// leaf waits for the thaw however long it takes; otherwise a helper silent for
    /// `wait.timeoutMs` is presumed stuck and killed; a cancelled wait kills it too.
    private func receive<T>(_ value: inout T, count: Int, _ wait: Wait) -> Outcome {
        var file: Int32 = -1
        let outcome = receive(&value, count: count, wait, file: &file)
        if file >= 0 { close(file) }
        return outcome
    }

    private func receive<T>(_ value: inout T, count: Int, _ wait: Wait, file: inout Int32) -> Outcome {
        var pfd = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
        var silentMs = 0
        while true {
            guard let r = try? retryingInterrupts({ poll(&pfd, 1, 1000) }) else { return .died(gone()) }
            if r > 0 { break }
            if wait.cancelled() { return .died(kill()) }
            if wait.isFrozen() { continue }
            silentMs += 1000
            if silentMs >= wait.timeoutMs {
                Log.line("charge helper pid \(pid) did not answer within \(silentMs / 1000) s; killing it")
                return .died(kill())
            }
        }
        var received: Int32 = -1
        let n = try? retryingInterrupts { withUnsafeMutableBytes(of: &value) { chargehelper_recv_with_fd(socket, $0.baseAddress, count, &received) } }
        file = received
        return n == count ? .done(0) : .died(gone())  // EOF: it is gone
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

    /// Waits for the helper (it is exiting, or is killed after `graceMs`).
    private func reap(graceMs: Int = 2000) -> Death {
        var st: Int32 = 0
        var waited = 0
        while true {
            let r: pid_t
            do throws(Errno) { r = try retryingInterrupts { waitpid(pid, &st, WNOHANG) } } catch {
                return .unknown(error.rawValue)  // someone else reaped it (a SIGCHLD handler)
            }
            if r == pid { break }
            if waited >= graceMs {
                _ = Glibc.kill(pid, SIGKILL)
                do throws(Errno) { _ = try retryingInterrupts { waitpid(pid, &st, 0) } } catch {
                    return .unknown(error.rawValue)
                }
                break
            }
            usleep(2000)
            waited += 2
        }
        if chargehelper_wifsignaled(st) != 0 { return .signaled(chargehelper_wtermsig(st)) }
        return .exited(chargehelper_wexitstatus(st))
    }
}
