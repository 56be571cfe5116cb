import CFuse
import CFuseTransport
import CKeeper
import Glibc
import SystemPackage

public let chargefsVersion = "0.1.0"

/// The daemon's lifecycle: detach, build store and charger, mount, serve, tear down.
public enum Daemon {
    /// Workers at most, rescue workers included: as many requests can wait on a charge (a frozen
    /// target) at once while the others are still served.
    static let maxWorkers: UInt32 = 64
    /// How long every worker must have been busy without finishing a request before a rescue
    /// worker starts: far above any request's own time, far below what a caller notices.
    static let stuckMs: UInt32 = 50

    /// One line on stderr, prefixed with the program's name.
    public static func printError(_ message: String) {
        let line = "chargefsd: \(printable(message))\n"
        _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
    }

    /// A mountpoint must be an existing directory that is not already a chargefs mount.
    public static func checkMountpoint(_ path: String) throws(UsageError) {
        var st = stat()
        if stat(path, &st) != 0 {
            let err = Errno(rawValue: errno)
            if err == .socketNotConnected {
                throw UsageError("mountpoint \(path): a dead FUSE mount is still there; run fusermount3 -u \(path)")
            }
            throw UsageError("mountpoint \(path): \(err == .noSuchFileOrDirectory ? "does not exist" : "\(err)")")
        }
        if st.st_mode & 0o170000 != 0o040000 { throw UsageError("mountpoint \(path): not a directory") }
        if isChargefsMount(path) { throw UsageError("mountpoint \(path): busy (chargefs is already mounted there)") }
    }

    static func isChargefsMount(_ path: String) -> Bool {
        guard let resolved = realpath(path, nil) else { return false }
        defer { free(resolved) }
        let want = String(cString: resolved)
        return MountTable.current().contains { $0.mountPoint == want && $0.fileSystemType == "fuse.chargefsd" }
    }

    /// Background mode: the parent waits until the child reports the mount ready (exit 0) or an
    /// error (printed, exit 1), so `chargefsd ... && ls MOUNTPOINT` works. Returns, in the child,
    /// the pipe to report on.
    public static func detach() -> Int32 {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0, fcntl(fds[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(fds[1], F_SETFD, FD_CLOEXEC) == 0 else {
            printError("cannot create a pipe: \(Errno(rawValue: errno))")
            exit(1)
        }
        let pid = fork()
        if pid < 0 {
            printError("cannot fork: \(Errno(rawValue: errno))")
            exit(1)
        }
        if pid > 0 {
            close(fds[1])
            var message: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 512)
            while let n = try? retryingInterrupts({ read(fds[0], &buffer, buffer.count) }), n > 0 {
                message += buffer[0..<n]
            }
            let text = String(decoding: message, as: UTF8.self)
            if text == "ready" { exit(0) }
            if text.isEmpty {
                // The child died before saying anything; reap it so its status shows.
                var status: Int32 = 0
                waitpid(pid, &status, 0)
                printError("the daemon exited during startup")
            } else {
                printError("\(text)")
            }
            exit(1)
        }
        close(fds[0])
        setsid()
        return fds[1]
    }

    static func report(_ readiness: Int32?, _ message: String) {
        guard let readiness else {
            if message != "ready" { printError("\(message)") }
            return
        }
        _ = message.withCString { write(readiness, $0, strlen($0)) }
        close(readiness)
        if message == "ready" {
            // Detached from the terminal: stdio to /dev/null, the log to syslog, and out of the
            // directory we were started from, which would otherwise stay busy (unmountable).
            Log.detach()
            _ = chdir("/")
            let null = open("/dev/null", O_RDWR)
            if null >= 0 {
                dup2(null, 0)
                dup2(null, 1)
                dup2(null, 2)
                if null > 2 { close(null) }
            }
        }
    }

    /// Mounts and serves until unmounted or signalled; returns the exit status.
    public static func run(options: MountOptions, target: CgroupTarget?, readiness: Int32?) -> Int32 {
        if options.isSuccessor { return Takeover.serveAsSuccessor(options: options, target: target) }
        do throws(StartFailure) {
            // First, while this process has no thread: the keeper takes the parent's place.
            let keeper = options.takeover ? try Takeover.startKeeper(options) : nil
            let transport = try chooseTransport(options)
            let (fs, state, arenaBacking) = try makeFileSystem(options, target: target, keeper: keeper)
            defer { fs.stopCharging() }
            let handover = keeper.flatMap { k in state.map { Takeover.Handover(keeper: k, state: $0, arenaBacking: arenaBacking) } }
            let status = try serve(fs, options: options, transport: transport, readiness: readiness, handover: handover)
            if status == 0 { keeper?.bye() }
            return status
        } catch {
            report(readiness, error.message)
            return 1
        }
    }

    /// Why the daemon could not start: the one line the user sees.
    struct StartFailure: Error {
        let message: String
        init(_ message: String) { self.message = message }
    }

    /// Whether requests come over io_uring, and if not why not (for the log).
    struct TransportChoice {
        var wantsUring: Bool
        var devFuseReason: String
    }

    /// Whether chargefsd serves over io_uring is the host's choice (enable_uring), never ours:
    /// the knob opens a kernel interface to every FUSE daemon on the host.
    static func chooseTransport(_ options: MountOptions) throws(StartFailure) -> TransportChoice {
        if (options.takeover || options.isSuccessor) && !Takeover.testUring {
            // Measured on 6.18 (uring.sh takeover_uring_kernel; docs/takeover.md, "io_uring"): a
            // successor can register new ring entries, but FUSE_NOTIFY_RESEND walks only the
            // /dev/fuse processing lists, so a request the dead server held in a ring entry is
            // never resent and its caller hangs, unkillable, until the mount is aborted. A takeover
            // mount serves /dev/fuse, where every such request is resent.
            if options.ioUring == .on && !options.isSuccessor {
                Log.line("warning: io_uring=on with takeover: serving over /dev/fuse. On this kernel a request a killed server held in an io_uring entry is not resent to its successor (FUSE_NOTIFY_RESEND covers /dev/fuse only): its caller would hang, unkillable, until the mount is aborted")
            }
            return TransportChoice(wantsUring: false, devFuseReason: "takeover")
        }
        let uringSupport = UringTransport.hostSupport()
        if options.ioUring == .on && uringSupport != .enabled {
            throw StartFailure(uringSupport == .absent
                ? "io_uring=on: this kernel has no FUSE over io_uring (needs Linux 6.14+ with CONFIG_FUSE_IO_URING)"
                : "io_uring=on: FUSE over io_uring is disabled on this host (\(UringTransport.enableKnob) is N; root may set it to Y)")
        }
        var choice = TransportChoice(
            wantsUring: options.ioUring != .off && uringSupport == .enabled,
            devFuseReason: options.ioUring == .off ? "io_uring=off"
                : uringSupport == .absent ? "this kernel has no FUSE over io_uring" : "\(UringTransport.enableKnob) is N")
        if choice.wantsUring, let error = UringTransport.probe() {
            if options.ioUring == .on {
                throw StartFailure("io_uring=on: chargefsd may not use io_uring here (\(error); see the sysctl kernel.io_uring_disabled)")
            }
            choice = TransportChoice(wantsUring: false, devFuseReason: "io_uring is not available to chargefsd: \(error)")
        }
        return choice
    }

    /// The arena, the charger for `target` (the daemon's own cgroup without one), and the tree.
    static func makeFileSystem(_ options: MountOptions, target: CgroupTarget?, keeper: ProcessKeeper? = nil)
        throws(StartFailure) -> (FileSystem, StateFiles?, UInt64) {
        let config = options.fileSystemConfig
        let capacity = config.maxBytes.map { Int($0 / Int64(PageSize.bytes)) + PageStore.reserveLimit + 1024 }
        let arena: Arena
        do {
            // Huge pages are refused only where they would break a target's charge.
            arena = try Arena(capacityPages: capacity ?? Int(UInt32.max) - 1, allowHugePages: target == nil)
        } catch {
            throw StartFailure("\(error)")
        }
        do {
            let charger: PageCharger = try target.map { try CgroupCharger(target: $0, arena: arena.fileDescriptor) } ?? DaemonCharger(arena: arena.fileDescriptor)
            let store = PageStore(arena: arena, charger: charger, key: target?.resolvedPath ?? "")
            // Directories' own targets (user.chargefs.memcg), each with its helper when first set.
            store.targets = CgroupChargeTargets(limitPolicy: options.memcgLimit)
            // memcg=auto: the mount's target is the scope P, each file charged to its users' cgroups.
            if options.memcgAuto, let target { store.shares = CgroupSharedScope(scope: target) }
            let backing = Takeover.code(arena.backing)
            guard let keeper else { return (FileSystem(config: config, store: store), nil, backing) }
            // -o takeover: the metadata kept in memfds, each descriptor handed to the keeper.
            let state = try StateFiles.create()
            return (try FileSystem(config: config, store: store, state: state, keeper: keeper), state, backing)
        } catch let error as StateError {
            throw StartFailure("takeover: \(error)")
        } catch {
            // A CgroupError names the target itself.
            throw StartFailure(error is CgroupError ? "\(error)" : "\(options.chargeTargetPath.map { "memcg=\($0): " } ?? "")\(error)")
        }
    }

    /// Mounts `fs`, serves it until unmounted or stopped, and tears down in reverse order;
    /// returns the exit status.
    static func serve(_ fs: FileSystem, options: MountOptions, transport: TransportChoice, readiness: Int32?,
                      handover: Takeover.Handover? = nil) throws(StartFailure) -> Int32 {
        if !options.debug { cfuse_silence_libfuse() }
        var arguments = ["chargefsd", "-o", options.fuseOptionList]
        if options.debug { arguments.append("-d") }
        let fuse = FuseSession(fileSystem: fs)
        fuse.features.wantsIoUring = transport.wantsUring
        fuse.features.wantsPassthrough = options.fileSystemConfig.passthroughMinBytes != nil
        fuse.features.offerDirectIOMmap = CacheModeChoice.mapsDirectIOShared(kernelRelease: CacheModeChoice.runningKernelRelease())
        guard fuse.start(arguments: arguments), let session = fuse.handle else {
            throw StartFailure("cannot start a FUSE session with options '\(options.fuseOptionList)'")
        }
        defer { fuse_session_destroy(session) }
        guard fuse_set_signal_handlers(session) == 0 else { throw StartFailure("cannot install signal handlers") }
        defer { fuse_remove_signal_handlers(session) }
        if handover != nil && ckeeper_install_handover_handler() != 0 { throw StartFailure("cannot install signal handlers") }
        guard fuse_session_mount(session, options.mountpoint) == 0 else {
            throw StartFailure("cannot mount on \(options.mountpoint) (is /dev/fuse available, and may you mount there?)")
        }
        // Protocol features libfuse 3.14 cannot negotiate (FuseKernelFeatures): our own clearing of
        // setuid/setgid, and shared mmap of direct-I/O files.
        guard FuseKernelFeatures.install(on: fuse) else {
            fuse_session_unmount(session)
            throw StartFailure("cannot set up the FUSE session's I/O")
        }
        if let handover {
            // Before the first request is read: INIT is saved once answered, and the keeper holds
            // /dev/fuse from here on.
            guard handover.start(fuse, session: session, options: options) else {
                fuse_session_unmount(session)
                throw StartFailure("takeover: cannot hand the mount to the keeper")
            }
        }
        report(readiness, "ready")
        if !transport.wantsUring { Log.line("serving over /dev/fuse (\(transport.devFuseReason))") }
        // One worker per CPU we may run on (up to 8): requests wake the longest-waiting worker,
        // so spare workers only rotate cold stacks and buffers (8 workers on one CPU made 4 KiB
        // creates 25-35% slower than one). A rescue worker starts only when every worker has been
        // busy for `stuckMs` without finishing anything (writes waiting for a frozen target's
        // charge), so that they never leave other requests unserved (cfuse_session_loop_pool).
        cfuse_pool_prefault_buffers(options.takeover ? 1 : 0)
        let status = cfuse_session_loop_pool(session, min(8, cfuse_affinity_cpu_count()), Self.maxWorkers, Self.stuckMs)
        // An upgrade: the keeper asked this server to hand the mount over (no unmount).
        if let handover, ckeeper_handover_requested() != 0 { Takeover.handOver(fs, keeper: handover.keeper) }
        // Unmounted: the kernel has ended every ring entry; otherwise (a signal) stop the waits.
        fuse.stopUring()
        fuse_session_unmount(session)
        // libfuse returns the number of the signal that ended the loop: a requested stop.
        return status == 0 || status == SIGTERM || status == SIGINT || status == SIGHUP ? 0 : 1
    }
}
