import CFuse
import CFuseTransport
import CKeeper
import Glibc
import Synchronization
import SystemPackage

/// When this process's own code began (main's first statement): a successor's log line of
/// phases splits its start into exec and runtime start (before) and its own work (after).
public enum ProcessStart {
    static let at = Atomic<UInt64>(0)
    public static func mark() { at.store(MonotonicClock.microseconds(), ordering: .relaxed) }
}

/// `-o takeover` (issue 21; docs/takeover.md): the daemon splits into the keeper (C,
/// chargefs-keeper, in the original process) and the server; the keeper holds every file a
/// successor needs and starts `chargefsd --takeover ARGS...` when the server dies. This type is
/// the daemon's side: starting the keeper, handing it the mount, and a successor's start.
enum Takeover {
    /// A successor that cannot take the mount over (no saved INIT, state it cannot read, a
    /// target gone) exits with this: the keeper then stops at once instead of retrying.
    static let cannotTakeOver: Int32 = 75
    static let keeperProgram = "chargefs-keeper"
    /// Test hook (scripts/tests/takeover.sh): every successor dies at its start, to check the
    /// keeper's crash-loop bound.
    static let testSuccessorDies = "CHARGEFS_TEST_SUCCESSOR_DIES"
    /// Test hook (scripts/tests/uring.sh, takeover_uring_kernel): a takeover mount serves over
    /// io_uring where the host allows it, and each successor registers new ring entries on the
    /// live connection; only to measure what the kernel does with a dead server's ring entries
    /// (docs/takeover.md, "io_uring"). Successors inherit it.
    static var testUring: Bool { UringWorker.takeoverTestHook }

    static func code(_ backing: Arena.Backing) -> UInt64 {
        switch backing {
        case .memfd: 0
        case .privateTmpfs(let noswap): noswap ? 2 : 1
        }
    }

    static func backing(_ code: UInt64) -> Arena.Backing {
        code == 0 ? .memfd : .privateTmpfs(noswap: code == 2)
    }

    /// The running executable's path (the keeper starts successors from it).
    static func executablePath() -> String? {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        let path = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // Replaced since this process started (an upgrade installed a new file there): the path
        // is what keepers start successors from, so it names the file installed there now.
        return path.hasSuffix(" (deleted)") ? String(path.dropLast(10)) : path
    }

    /// What came between the executable and the program in our command line: empty, unless a
    /// dynamic loader started us (the CSI host bundle: `DIR/chargefsd --library-path DIR/lib
    /// DIR/lib/chargefsd ARGS`, where /proc/self/exe is the loader). The loader moves argv past
    /// its own arguments for the program, while /proc/self/cmdline keeps them all: what
    /// CommandLine.arguments lacks is the loader's part, which ends with the program's path.
    static func launcherArguments() -> [String] {
        guard let text = try? cgReadFile("/proc/self/cmdline") else { return [] }
        // Split as bytes: a NUL followed by a combining mark would be one Character.
        let all = text.utf8.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        let given = all.last == "" ? Array(all.dropLast()) : all
        let own = CommandLine.arguments.count
        guard given.count > own, Array(given.suffix(own - 1)) == Array(CommandLine.arguments.dropFirst()) else { return [] }
        return Array(given[1...(given.count - own)])
    }

    /// Splits the daemon: the keeper execs in this process's place (its parent sees no change:
    /// same pid, and it exits when the mount ends), this function returns in the child, the
    /// server, with the keeper's socket. Call before any thread exists.
    /// The keeper's path (beside chargefsd) and its argv, its socket and server named by
    /// `sock` and `server`; `adopted`: started by a server whose keeper died.
    static func keeperCommand(_ options: MountOptions, sock: String, server: String, adopted: Bool) -> (path: String, argv: [String])? {
        guard let exe = executablePath(), let slash = exe.lastIndex(of: "/") else { return nil }
        let keeperPath = String(exe[...slash]) + keeperProgram
        var argv = [keeperPath, sock, server, String(options.takeoverMax)]
        if !options.foreground { argv.append("--detached") }
        if adopted { argv.append("--adopted") }
        // The first server's own arguments: what every successor is started with, after the
        // same launcher (a dynamic loader's own arguments, when one started us).
        argv += ["--", exe] + launcherArguments() + CommandLine.arguments.dropFirst().filter { $0 != "--takeover" }
        return (keeperPath, argv)
    }

    static func startKeeper(_ options: MountOptions) throws(Daemon.StartFailure) -> ProcessKeeper {
        guard let (keeperPath, argv) = keeperCommand(options, sock: "%SOCK%", server: "%PID%", adopted: false) else {
            throw Daemon.StartFailure("takeover: cannot find the running chargefsd (/proc/self/exe)")
        }
        guard access(keeperPath, X_OK) == 0 else {
            throw Daemon.StartFailure("takeover: the keeper \(keeperPath) is missing or not executable (install \(keeperProgram) next to chargefsd)")
        }
        var cArgs = argv.map { strdup($0) }
        cArgs.append(nil)
        defer { cArgs.forEach { free($0) } }
        let sock = cArgs.withUnsafeBufferPointer { ckeeper_become_keeper(keeperPath, $0.baseAddress) }
        guard sock >= 0 else {
            throw Daemon.StartFailure("takeover: cannot start the keeper \(keeperPath): \(Errno(rawValue: -sock))")
        }
        // The keeper is the process we were: our parent.
        return ProcessKeeper(socket: sock, pid: getppid())
    }

    /// What the first server hands the keeper once mounted.
    struct Handover {
        let keeper: ProcessKeeper
        let state: StateFiles
        let arenaBacking: UInt64

        /// Before the first request is read: INIT is saved once answered, the keeper gets
        /// /dev/fuse (the same open file), the connection's number and the arena's backing.
        func start(_ fuse: FuseSession, session: OpaquePointer, options: MountOptions) -> Bool {
            let mountpoint = options.mountpoint
            let state = self.state
            fuse.takeovers = 0
            fuse.initAnswered = { request in
                do throws(StateError) { try state.saveInit(request) } catch { Log.line("takeover: cannot save INIT: \(error)") }
            }
            guard keeper.keepDevFuse(fuse_session_fd(session)) == 0 else { return false }
            if let number = Takeover.connectionNumber(mountpoint) { keeper.set(CKEEPER_CONN_DEV, number) }
            keeper.set(CKEEPER_ARENA_BACKING, arenaBacking)
            keeper.serving(startMicroseconds: 0)
            fuse.keeperPid = { [keeper] in keeper.pid }
            Takeover.watchKeeper(keeper, options: options)
            // Checkpoints of its own (IdleCheckpoints): without them the first takeover
            // replayed every change since the mount.
            let fs = fuse.fileSystem
            runDetached { fs.watchForIdleCheckpoints() }
            return true
        }
    }

    /// The FUSE connection's number under /sys/fs/fuse/connections (the kernel's dev_t of the
    /// mount, major << 20 | minor), from mountinfo: no request to our own mount.
    static func connectionNumber(_ mountpoint: String) -> UInt64? {
        guard let want = absolutePath(mountpoint) else { return nil }
        guard let file = fopen("/proc/self/mountinfo", "r") else { return nil }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>? = nil
        var capacity = 0
        defer { free(line) }
        var found: UInt64?
        while getline(&line, &capacity, file) > 0, let line {
            let fields = String(cString: line).split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count >= 7, MountTable.unescape(fields[4]) == want,
                  let dash = fields[6...].firstIndex(of: "-"), dash + 1 < fields.count, fields[dash + 1] == "fuse.chargefsd" else { continue }
            let numbers = fields[2].split(separator: ":")
            if numbers.count == 2, let major = UInt64(numbers[0]), let minor = UInt64(numbers[1]) { found = major << 20 | minor }
        }
        return found
    }

    /// `path` made absolute through its parent only: nothing touches the mount itself, which
    /// may have nobody serving it (a stat there would wait for a server forever).
    static func absolutePath(_ path: String) -> String? {
        var trimmed = path
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        let slash = trimmed.lastIndex(of: "/")
        let parent = slash.map { $0 == trimmed.startIndex ? "/" : String(trimmed[..<$0]) } ?? "."
        let name = slash.map { String(trimmed[trimmed.index(after: $0)...]) } ?? trimmed
        guard !name.isEmpty, name != ".", name != "..", let resolved = realpath(parent, nil) else { return nil }
        defer { free(resolved) }
        let base = String(cString: resolved)
        return base == "/" ? "/" + name : base + "/" + name
    }

    /// A successor: takes the files from the keeper, the tree from the state, the connection
    /// from the /dev/fuse file (no new mount), replays INIT, asks the kernel to resend what the
    /// dead server had read and not answered, and serves. Returns the exit status.
    /// A successor's phases, as CLOCK_MONOTONIC µs, logged in one line once it serves:
    /// from the keeper's sight of the death (its fork and our exec follow) to serving.
    struct Phases {
        var marks: [(name: String, at: UInt64)] = []
        mutating func mark(_ name: String, _ at: UInt64 = MonotonicClock.microseconds()) { marks.append((name, at)) }
        /// "name +X.X" per phase, each from the one before, and the total from the first.
        var line: String {
            guard let first = marks.first else { return "" }
            var parts: [String] = []
            var previous = first.at
            for m in marks.dropFirst() {
                let d = m.at >= previous ? m.at - previous : 0
                parts.append("\(m.name) +\(d / 1000).\(d % 1000 / 100)")
                previous = max(previous, m.at)
            }
            let total = previous - first.at
            return parts.joined(separator: ", ") + " (ms; \(total / 1000).\(total % 1000 / 100) ms from \(first.name))"
        }
    }

    static func serveAsSuccessor(options: MountOptions, target: CgroupTarget?) -> Int32 {
        let started = MonotonicClock.microseconds()
        var phases = Phases()
        let mainAt = ProcessStart.at.load(ordering: .relaxed)
        ckeeper_name_server()
        let mountpoint = absolutePath(options.mountpoint) ?? options.mountpoint
        if getenv(testSuccessorDies) != nil { kill(getpid(), SIGKILL) }
        // The per-opcode kill hook kills the first server only (read once, at the first request).
        unsetenv(FuseKernelFeatures.killBeforeReplyVariable)
        unsetenv(MoveKillPoint.variable)
        if !options.foreground { Log.detach() }
        let keeper: ProcessKeeper
        do throws(StateError) {
            keeper = try ProcessKeeper.receive(socket: Int32(CKEEPER_SUCCESSOR_FD))
        } catch {
            Log.line("takeover: \(error)")
            return cannotTakeOver
        }
        guard let devFD = keeper.devFuse else {
            Log.line("takeover: the keeper holds no /dev/fuse file")
            return cannotTakeOver
        }
        let received = MonotonicClock.microseconds()
        if let died = keeper.values[UInt32(CKEEPER_DIED_AT)], died > 0, died <= started { phases.mark("death seen by the keeper", died) }
        else { phases.mark("start", mainAt > 0 ? mainAt : started) }
        if mainAt > 0, phases.marks.first?.at ?? 0 < mainAt { phases.mark("exec and runtime start", mainAt) }
        phases.mark("options parsed", started)
        phases.mark("files received", received)
        // The tree.
        let built: (FileSystem, StateFiles)
        do throws(Daemon.StartFailure) {
            built = try takeOverTree(options: options, target: target, keeper: keeper, phases: &phases)
        } catch {
            Log.line(error.message)
            return cannotTakeOver
        }
        let (fs, state) = built
        defer { fs.stopCharging() }
        let rebuilt = MonotonicClock.microseconds()
        guard let savedInit = state.savedInit else {
            Log.line("takeover: no INIT was saved (the first server died before it answered INIT)")
            return cannotTakeOver
        }

        // The session, on the inherited /dev/fuse file: the same open file the kernel's
        // processing list belongs to (a clone's close would fail its requests).
        if !options.debug { cfuse_silence_libfuse() }
        var arguments = ["chargefsd", "-o", options.fuseOptionList]
        if options.debug { arguments.append("-d") }
        let fuse = FuseSession(fileSystem: fs)
        // A first server claims io_uring only under the test hook (and the saved INIT request
        // says whether the kernel offered it): the replay then registers new ring entries.
        fuse.features.wantsIoUring = testUring
        fuse.features.wantsPassthrough = options.fileSystemConfig.passthroughMinBytes != nil
        fuse.features.offerDirectIOMmap = CacheModeChoice.mapsDirectIOShared(kernelRelease: CacheModeChoice.runningKernelRelease())
        fuse.adoptedPassthrough = fs.passthroughRegistrations
        fuse.takeovers = keeper.values[UInt32(CKEEPER_TAKEOVERS)] ?? 0
        fuse.keeperPid = { [keeper] in keeper.pid }
        fuse.upgrades = keeper.values[UInt32(CKEEPER_UPGRADES)] ?? 0
        fuse.upgradeFailures = keeper.values[UInt32(CKEEPER_UPGRADE_FAILURES)] ?? 0
        guard fuse.start(arguments: arguments), let session = fuse.handle else {
            Log.line("takeover: cannot start a FUSE session with options '\(options.fuseOptionList)'")
            return 1
        }
        defer { fuse_session_destroy(session) }
        phases.mark("session made")
        guard fuse_set_signal_handlers(session) == 0 else { return 1 }
        defer { fuse_remove_signal_handlers(session) }
        guard ckeeper_install_handover_handler() == 0 else { return 1 }
        guard FuseKernelFeatures.install(on: fuse, fd: devFD) else {
            Log.line("takeover: cannot set up the FUSE session's I/O")
            return 1
        }
        phases.mark("I/O installed")
        fuse.replayInit(savedInit)
        phases.mark("INIT replayed")
        let stateFiles = state
        fuse.initAnswered = { request in try? stateFiles.saveInit(request) }
        // Before anything is answered (resent or not): files that lost a name in the last changes
        // get their attribute version bumped, so that the kernel ignores the link count in
        // replies to requests sent before now (FileSystem.attributesToRefresh says why).
        let refreshed = fs.attributesToRefresh
        let bump = { [fuse] in for ino in refreshed { fuse.invalidateAttributes(fuse_ino_t(ino.rawValue)) } }
        bump()
        // Requests the dead server read and never answered go back on the pending queue (bit 63
        // of unique set); without FUSE_HAS_RESEND (before 6.9) their callers wait until abort.
        // Those are answered before any other request, then the same files get a second bump:
        // a reply to a request sent meanwhile cannot undo the kernel's own decrement at a resent
        // UNLINK's reply either (ResentFirst says why).
        var resent = "no resend (the kernel has no FUSE_HAS_RESEND)"
        if fuse.features.kernelOffersResend {
            let drain = fuse.features.resentFirst
            drain.arm {
                bump()
                Log.line("takeover: pid \(getpid()) answered \(drain.answeredFirst.load(ordering: .relaxed)) resent requests before any other, "
                         + "waited \(drain.waitedMicroseconds.load(ordering: .relaxed) / 1000) ms for their replies"
                         + (drain.gaveUp.load(ordering: .relaxed) ? " (gave up: one is still being handled)" : "")
                         + "; \(refreshed.count) inodes' attributes refreshed again")
            }
            let r = ckeeper_notify_resend(devFD)
            resent = r == 0 ? "resend asked" : "FUSE_NOTIFY_RESEND failed: \(Errno(rawValue: -r))"
            if r != 0 { drain.disarm() }
        }
        let serving = MonotonicClock.microseconds()
        phases.mark("resend asked", serving)
        keeper.serving(startMicroseconds: serving - started)
        // Started above the keeper's priority (CKEEPER_SUCCESSOR_BOOST: every caller was
        // waiting): the workers (created next, inheriting this thread's nice) answer the requests
        // that waited at that priority too, then every task goes back to the keeper's nice
        // (again a second later, with the checkpoint: a thread made meanwhile).
        let keeperPid = keeper.pid
        runDetached {
            var pause = timespec(tv_sec: 0, tv_nsec: 100_000_000)
            nanosleep(&pause, nil)
            _ = ckeeper_restore_priority(keeperPid)
        }
        // CPU time so far (this process: exec and the runtime's start included), beside the wall
        // time: on a loaded machine the two differ by the waits for a CPU.
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        let cpuMs = (Int(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1_000_000 + Int(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec)) / 1000
        let report = fs.takeover.map { "\($0.inodes) inodes, \($0.transactions) transactions after checkpoint \($0.checkpointSeq)" } ?? ""
        Log.line("takeover: pid \(getpid()) serves (takeover \(keeper.values[UInt32(CKEEPER_TAKEOVERS)] ?? 0)): \(report); "
                 + "tree rebuilt in \((rebuilt - started) / 1000) ms, serving \((serving - started) / 1000) ms after start (CPU \(cpuMs) ms); \(resent); "
                 + "\(refreshed.count) inodes' attributes refreshed")
        Log.line("takeover: pid \(getpid()) phases: \(phases.line)")
        // The next successor should not replay this one's journal again: a checkpoint, taken
        // while requests are served (under the shared lock: reads go on, changes wait for it),
        // a second after serving starts, so that the requests waiting now are answered first.
        runDetached {
            var pause = timespec(tv_sec: 1, tv_nsec: 0)
            nanosleep(&pause, nil)
            _ = ckeeper_restore_priority(keeperPid)
            fs.checkpointNow()
            // From then on, as the first server: when changes stop, or the journal grows.
            fs.watchForIdleCheckpoints()
        }
        watchKeeper(keeper, options: options)
        cfuse_pool_prefault_buffers(1)
        let status = cfuse_session_loop_pool(session, min(8, cfuse_affinity_cpu_count()), Daemon.maxWorkers, Daemon.stuckMs)
        if ckeeper_handover_requested() != 0 { handOver(fs, keeper: keeper) }
        fuse.stopUring()
        // The loop ends on an unmount (nothing left to do) or a stop signal: then unmount as the
        // first server would have (its libfuse knew the mountpoint; this session never mounted).
        // mountinfo, not a stat: nobody serves the mount now.
        let mounted = MountTable.current().contains { $0.mountPoint == mountpoint && $0.fileSystemType == "fuse.chargefsd" }
        if mounted, umount2(mountpoint, Int32(MNT_DETACH)) != 0 {
            Log.line("cannot unmount \(mountpoint): \(Errno(rawValue: errno))")
        }
        let clean = status == 0 || status == SIGTERM || status == SIGINT || status == SIGHUP
        if clean { keeper.bye() }
        return clean ? 0 : 1
    }

    /// An upgrade (the keeper sent CKEEPER_HANDOVER_SIGNAL): the session loop has stopped
    /// reading requests (workers waiting to receive were cancelled there; those with a request
    /// answered it), so the requests sent since wait in the kernel's queue for the successor.
    /// Exit at once, as a crash would, leaving the mount, the charge and every file to the keeper
    /// (no unmount, no DESTROY, no uncharge). No checkpoint here: the journal is always whole,
    /// and writing a checkpoint that the successor then reads took longer than the successor's
    /// replay of the journal (10,000 files, debug build: 535 ms to write, 184 ms CPU to read, vs
    /// 261 ms CPU to replay); the successor takes its own checkpoint a second after it serves.
    static func handOver(_ fs: FileSystem, keeper: ProcessKeeper) -> Never {
        keeper.handedOver()
        Log.line("upgrade: pid \(getpid()) hands the mount over")
        _exit(Int32(CKEEPER_EXIT_HANDED_OVER))
    }

    /// Watches the keeper (its pidfd) from a thread of its own; when it dies, starts a new one
    /// (not our parent: `--adopted`) and hands it everything, so that only the server and its
    /// keeper dying together loses the mount.
    static func watchKeeper(_ keeper: ProcessKeeper, options: MountOptions) {
        runDetached {
            while true {
                let pid = keeper.pid
                let watched = ckeeper_wait_for_exit(pid)
                if watched < 0 && watched != -ESRCH {
                    Log.line("takeover: cannot watch keeper \(pid) (\(Errno(rawValue: -watched))): it is not restarted if it dies")
                    return
                }
                guard let (path, argv) = keeperCommand(options, sock: String(CKEEPER_SUCCESSOR_FD), server: String(getpid()), adopted: true) else { return }
                var cArgs = argv.map { strdup($0) }
                cArgs.append(nil)
                var sock: Int32 = -1
                let newPid = cArgs.withUnsafeBufferPointer { ckeeper_spawn(path, $0.baseAddress, &sock) }
                cArgs.forEach { free($0) }
                guard newPid > 0 else {
                    Log.line("takeover: keeper \(pid) died and a new one cannot start (\(Errno(rawValue: errno))): no takeover from here on")
                    return
                }
                let handed = keeper.replace(socket: sock, pid: newPid)
                Log.line("takeover: keeper \(pid) died; keeper \(newPid) started and handed \(handed) files")
            }
        }
    }

    private final class Work: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    /// Runs `body` on a thread of its own (detached); runs it here if no thread can be made.
    static func runDetached(_ body: @escaping @Sendable () -> Void) {
        let work = Unmanaged.passRetained(Work(body)).toOpaque()
        var thread = pthread_t()
        let made = pthread_create(&thread, nil, { arg in
            guard let arg else { return nil }
            Unmanaged<Work>.fromOpaque(arg).takeRetainedValue().body()
            return nil
        }, work)
        if made == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<Work>.fromOpaque(work).takeRetainedValue().body()
        }
    }

    /// The tree a dead server kept, on its arena, with a new charger (a helper in the target:
    /// the old one died with its server) and the same charge targets.
    static func takeOverTree(options: MountOptions, target: CgroupTarget?, keeper: ProcessKeeper, phases: inout Phases)
        throws(Daemon.StartFailure) -> (FileSystem, StateFiles) {
        guard let journal = keeper.descriptor(.journal), let c0 = keeper.descriptor(.checkpoint(0)),
              let c1 = keeper.descriptor(.checkpoint(1)), let arenaFD = keeper.descriptor(.arena) else {
            throw Daemon.StartFailure("takeover: the keeper lacks the state or the arena")
        }
        do {
            let state = try StateFiles.adopt(journal: journal, checkpoints: [c0, c1])
            let backing = backing(keeper.values[UInt32(CKEEPER_ARENA_BACKING)] ?? 0)
            let arena = try Arena(adopting: arenaFD, tmpfsRoot: keeper.descriptor(.arenaRoot), backing: backing)
            phases.mark("state and arena mapped")
            let charger: PageCharger = try target.map { try CgroupCharger(target: $0, arena: arena.fileDescriptor) } ?? DaemonCharger(arena: arena.fileDescriptor)
            phases.mark("charger started")
            let key = target?.resolvedPath ?? ""
            let limitPolicy = options.memcgLimit
            let scope = options.memcgAuto ? target : nil
            let fs = try FileSystem(takingOver: state, keeper: keeper, config: options.fileSystemConfig) { inUse, backingPages in
                let store = PageStore(adopting: arena, charger: charger, key: key, inUse: inUse, backingPages: backingPages)
                store.targets = CgroupChargeTargets(limitPolicy: limitPolicy)
                if let scope { store.shares = CgroupSharedScope(scope: scope) }
                return store
            }
            for step in fs.takeover?.steps ?? [] { phases.mark(step.name, step.at) }
            return (fs, state)
        } catch {
            throw Daemon.StartFailure("takeover: \(error)")
        }
    }
}
