import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// chargefsd as a separate program: starting one for a volume, finding it, unmounting it, and
/// reading a mount's figures. Blocking calls; VolumeManager runs them off the async executor.
struct Chargefsd: Sendable {
    /// The chargefsd executable, as the daemon's mount namespace names it.
    let binary: String
    /// cgroup.procs of the node-level cgroups the daemons run in, one per hierarchy the plugin
    /// has a cgroup of its own on (DaemonCgroups): their own memory (code, FUSE buffers) is the
    /// driver's, not the plugin container's (whose stop kills what is in its cgroups) and not
    /// the pod's (which pays only for the volume's pages, through memcg=).
    let daemonCgroupProcs: [String]
    /// Where the daemons start: in the plugin's own mount namespace, or in the host's, from a
    /// copy of the daemon on the host's disk (HostDaemon).
    var host: HostDaemon? = nil

    /// Finds chargefsd: an explicit path, else next to this executable, else on PATH.
    static func locate(explicit: String?) -> String? {
        let fm = FileManager.default
        if let e = explicit { return fm.isExecutableFile(atPath: e) ? e : nil }
        let own = URL(fileURLWithPath: CommandLine.arguments.first ?? "chargefs-csi").resolvingSymlinksInPath()
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            let sibling = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("chargefsd").path
            if fm.isExecutableFile(atPath: sibling) { return sibling }
        }
        let sibling = own.deletingLastPathComponent().appendingPathComponent("chargefsd").path
        if fm.isExecutableFile(atPath: sibling) { return sibling }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
            let p = String(dir) + "/chargefsd"
            if fm.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// Mounts chargefsd at `target` with `options` and returns once it is mounted (chargefsd
    /// itself detaches after mounting). The daemon starts in a new session inside the daemon
    /// cgroups, so neither a signal to the plugin's process group nor the end of the plugin's
    /// container cgroups reaches it; with `host`, in the host's mount namespace and root too,
    /// so that the container's own go with the container. The target directory is made
    /// immutable first (Guard). Returns nil on success, else chargefsd's own error.
    func mount(target: String, options: [String], logFile: String, timeout: Double = 60) -> String? {
        if let err = Guard.set(target) { return err }
        guard let err = start(target: target, options: options, logFile: logFile, timeout: timeout) else { return nil }
        if !Self.isChargefsMount(target) { _ = Guard.clear(target) }  // the caller may remove it
        return err
    }

    private func start(target: String, options: [String], logFile: String, timeout: Double) -> String? {
        // sh moves itself into every daemon cgroup, then becomes chargefsd: every process of
        // the daemon is born there (moving it afterwards would race with its own fork).
        let script = "for f; do shift; [ \"$f\" = -- ] && break; echo $$ > \"$f\" || exit 125; done; exec \"$@\""
        var argv = ["/bin/sh", "-c", script, "chargefsd-start"] + daemonCgroupProcs + ["--"]
        if let host {
            argv = [host.nsenter, "--target", String(host.namespacePid), "--mount", "--"] + argv + host.command
        } else {
            argv += [binary]
        }
        argv += [target, "-o", options.joined(separator: ",")]
        var pid: pid_t = 0
        var actions = posix_spawn_file_actions_t()
        var attr = posix_spawnattr_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawnattr_init(&attr)
        defer {
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attr)
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logFile, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // a new session; default signal handling and an empty mask whatever the plugin set
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attr, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGPIPE, SIGHUP, SIGINT, SIGTERM, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        // POSIX_SPAWN_SETSID (glibc 2.26+) is a macro Swift does not import: its value is 0x80.
        let setsid: Int32 = 0x80
        posix_spawnattr_setflags(&attr, Int16(setsid | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let cArgs = argv.map { strdup($0) } + [nil]
        defer { for a in cArgs { free(a) } }
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, cArgs, environ)
        if rc != 0 { return "cannot start \(argv[0]) for \(binary): \(String(cString: strerror(rc)))" }

        // Wait for chargefsd's foreground part; it exits once the mount is up (or failed).
        var status: Int32 = 0
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let w = waitpid(pid, &status, WNOHANG)
            if w == pid { break }
            if w < 0 && errno != EINTR { return "waitpid: \(String(cString: strerror(errno)))" }
            if Date() > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                return "chargefsd did not mount \(target) within \(Int(timeout)) s (killed)"
            }
            usleep(20_000)
        }
        let output = ((try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines)
        unlink(logFile)
        let exited = (status & 0x7f) == 0
        let code = (status >> 8) & 0xff
        if exited && code == 125 {
            return "cannot move chargefsd into its cgroups (\(daemonCgroupProcs.joined(separator: ", ")))" + (output.isEmpty ? "" : ": " + output)
        }
        if !exited || code != 0 {
            let how = exited ? "exit \(code)" : "signal \(status & 0x7f)"
            return "chargefsd failed (\(how))" + (output.isEmpty ? "" : ": " + output.replacingOccurrences(of: "\n", with: "; "))
        }
        guard Self.isChargefsMount(target) else {
            return "chargefsd exited 0 but \(target) is not a chargefsd mount" + (output.isEmpty ? "" : ": " + output)
        }
        return nil
    }

    /// True when `path` is the mount point of a chargefsd filesystem (/proc/self/mountinfo).
    static func isChargefsMount(_ path: String) -> Bool {
        mountType(path) == "fuse.chargefsd"
    }

    enum MountState: Sendable { case serving, dead, absent }

    /// Whether a chargefsd mount is at `path` and its daemon answers (a bounded probe); a mount
    /// whose daemon died answers ENOTCONN, one aborted ECONNABORTED. One that does not answer
    /// in time counts as serving: it is not known dead, and mounting over it would hide it.
    static func mountState(_ path: String) -> MountState {
        switch probe(path, timeout: 5) {
        case .notChargefs: return .absent
        case .failed(let e) where e == ENOTCONN || e == ECONNABORTED: return .dead
        default: return .serving
        }
    }

    /// The filesystem type mounted at `path` (the last mount there), nil when none.
    static func mountType(_ path: String) -> String? {
        guard let text = readKernelFile("/proc/self/mountinfo") else { return nil }
        var found: String?
        for line in text.split(separator: "\n") {
            let halves = line.components(separatedBy: " - ")
            guard halves.count >= 2 else { continue }
            let left = halves[0].split(separator: " ")
            guard left.count >= 5, unescapeMountinfo(String(left[4])) == path else { continue }
            found = halves[1].split(separator: " ").first.map(String.init)
        }
        return found
    }

    /// Pids of chargefsd processes serving `target` (their argv is "chargefsd TARGET -o ...").
    static func daemonPids(target: String) -> [pid_t] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        var out: [pid_t] = []
        for n in names {
            guard let pid = pid_t(n), let data = FileManager.default.contents(atPath: "/proc/\(n)/cmdline") else { continue }
            let args = data.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            guard args.count >= 2, args[0].hasSuffix("chargefsd"), args.contains(target) else { continue }
            out.append(pid)
        }
        return out
    }

    /// Unmounts `target` (the daemon then exits and its charge goes back) and waits up to
    /// `timeout` seconds for the daemon to go. A mount still busy after a few tries is detached:
    /// the kubelet unpublishes only after the pod's containers are gone. Nil on success.
    static func unmount(target: String, timeout: Double = 10) -> String? {
        let pids = daemonPids(target: target)
        var tries = 0
        while mountType(target) != nil {
            if umount2(target, 0) == 0 { continue }
            let e = errno
            if e == EINVAL || e == ENOENT { break }  // not (or no longer) a mount point
            if e == EBUSY && tries < 20 {
                tries += 1
                usleep(100_000)
                continue
            }
            if e == EBUSY {
                if umount2(target, Int32(MNT_DETACH)) == 0 { continue }
            }
            return "cannot unmount \(target): \(String(cString: strerror(errno)))"
        }
        // the bare directory may go now (the caller removes it)
        if let err = Guard.clear(target) { return err }
        let deadline = Date().addingTimeInterval(timeout)
        for pid in pids {
            while isRunning(pid) {
                if Date() > deadline { return "unmounted \(target), but chargefsd \(pid) is still running" }
                usleep(20_000)
            }
        }
        return nil
    }

    /// True while `pid` exists and is not a zombie: an exited daemon is not our child but the
    /// nearest subreaper's (a container runtime's monitor may be one), which may reap it late.
    static func isRunning(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = readKernelFile("/proc/\(pid)/stat"),
              let close = stat.lastIndex(of: ")") else { return true }
        return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first != "Z"
    }

    struct Usage: Sendable {
        var totalBytes, usedBytes, availableBytes, totalInodes, usedInodes, availableInodes: Int64
    }

    /// What `df` shows for a mount: chargefsd's statfs already counts the pod's headroom in
    /// the total and the available bytes.
    static func usage(_ path: String) -> Result<Usage, CSIError> {
        var s = statvfs()
        guard statvfs(path, &s) == 0 else {
            let e = errno
            if e == ENOTCONN {
                return .failure(CSIError(.internal, "volume at \(path) is not served: its chargefsd is gone (\(String(cString: strerror(e))))"))
            }
            return .failure(CSIError(.internal, "statvfs \(path): \(String(cString: strerror(e)))"))
        }
        // Saturating: the figures come from a FUSE daemon, and "unlimited" may be huge.
        func n(_ v: UInt) -> Int64 { Int64(clamping: v) }
        func bytes(_ blocks: UInt) -> Int64 {
            let (r, o) = n(blocks).multipliedReportingOverflow(by: n(s.f_frsize))
            return o ? Int64.max : r
        }
        let free = min(s.f_bfree, s.f_blocks)
        return .success(Usage(
            totalBytes: bytes(s.f_blocks),
            usedBytes: bytes(s.f_blocks - free),
            availableBytes: bytes(s.f_bavail),
            totalInodes: n(s.f_files),
            usedInodes: n(s.f_files - min(s.f_ffree, s.f_files)),
            availableInodes: n(s.f_favail)))
    }
}

/// A published volume's target directory is immutable (FS_IMMUTABLE_FL) while the volume is
/// published. Covered by the mount, the flag is never seen; uncovered (the daemon gone, and its
/// mount with it), nothing can be created in the directory, not even by root, so a container
/// that binds it gets EPERM instead of writing to the node's disk uncharged.
enum Guard {
    private static let getFlags: UInt = 0x8008_6601  // FS_IOC_GETFLAGS
    private static let setFlags: UInt = 0x4008_6602  // FS_IOC_SETFLAGS
    private static let immutable: Int32 = 0x10       // FS_IMMUTABLE_FL

    static func set(_ dir: String) -> String? { change(dir, immutable: true) }
    static func clear(_ dir: String) -> String? { change(dir, immutable: false) }

    /// True when `dir` (itself, not a mount over it) carries the flag.
    static func isSet(_ dir: String) -> Bool {
        let fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var flags: Int32 = 0
        return withUnsafeMutablePointer(to: &flags) { ioctl(fd, getFlags, UnsafeMutableRawPointer($0)) } == 0
            && flags & immutable != 0
    }

    private static func change(_ dir: String, immutable on: Bool) -> String? {
        let fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
        if fd < 0 {
            if errno == ENOENT && !on { return nil }
            return "cannot open \(dir): \(String(cString: strerror(errno)))"
        }
        defer { close(fd) }
        var flags: Int32 = 0
        var rc = withUnsafeMutablePointer(to: &flags) { ioctl(fd, getFlags, UnsafeMutableRawPointer($0)) }
        if rc == 0 {
            if (flags & immutable != 0) == on { return nil }
            flags = on ? flags | immutable : flags & ~immutable
            rc = withUnsafeMutablePointer(to: &flags) { ioctl(fd, setFlags, UnsafeMutableRawPointer($0)) }
        }
        guard rc != 0 else { return nil }
        let e = errno
        if !on && (e == ENOTTY || e == EOPNOTSUPP || e == EINVAL) { return nil }  // never set there
        if e == ENOTTY || e == EOPNOTSUPP || e == EINVAL {
            return "target_path \(dir) is on a filesystem without the immutable attribute (\(String(cString: strerror(e)))): were its daemon gone, containers would write to a plain directory there uncharged"
        }
        return "cannot \(on ? "set" : "clear") the immutable attribute of \(dir): \(String(cString: strerror(e)))"
    }
}

/// Daemons started outside the plugin's container: in the host's mount namespace (so neither
/// the container's mount namespace nor its root filesystem is theirs to lose), from a copy of
/// the daemon's files on the host's disk. The host's namespace is that of the nearest ancestor
/// of the plugin outside its mount namespace: with hostPID, the runtime's container monitor
/// (conmon, containerd-shim), which lives in the host's. PID 1 would be the obvious choice, but
/// its namespaces are not always open to the plugin (on this development machine PID 1 is a VM
/// agent outside the session's sandbox: opening /proc/1/ns/* gives EACCES even to root).
struct HostDaemon: Sendable {
    /// A process in the host's mount namespace.
    let namespacePid: pid_t
    /// nsenter in the plugin's mount namespace.
    let nsenter: String
    /// The daemon's command in the host's namespace: the bundle's dynamic loader (named
    /// chargefsd, so that ps and /proc/PID/comm say chargefsd), its libraries, the daemon.
    let command: [String]
    /// The bundle's folder on the host.
    let dir: String

    /// The nearest ancestor in another mount namespace whose namespace this process may enter,
    /// nil when every ancestor shares the plugin's (a plain process on the host).
    static func runtimeAncestor() -> pid_t? {
        guard let own = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/mnt") else { return nil }
        var pid = getppid()
        var seen = 0
        while pid > 1 && seen < 64 {
            seen += 1
            if let ns = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/mnt"), ns != own {
                return pid
            }
            guard let status = readKernelFile("/proc/\(pid)/status"),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("PPid:") }),
                  let ppid = pid_t(line.dropFirst(5).trimmingCharacters(in: .whitespaces)) else { return nil }
            pid = ppid
        }
        return nil
    }

    /// Copies the bundle (a folder: `chargefsd` the dynamic loader, `lib/` the libraries and
    /// the daemon `lib/chargefsd`, `chargefs-charge-helper` static) into `hostDir`/ID on the
    /// host, where ID is a hash of its content: each plugin version has its own copy, which
    /// the daemons it starts keep using after an upgrade. Written through /proc/PID/root, the
    /// host's root as the ancestor sees it, so no hostPath is needed for it.
    static func install(bundle: String, hostPid: pid_t, hostDir: String) -> Result<HostDaemon, CSIError> {
        let fm = FileManager.default
        let files = ["chargefsd", "chargefs-charge-helper", "chargefs-keeper"] + ((try? fm.contentsOfDirectory(atPath: bundle + "/lib")) ?? []).sorted().map { "lib/" + $0 }
        guard files.contains("lib/chargefsd") else {
            return .failure(CSIError(.failedPrecondition, "--daemon-bundle \(bundle) has no lib/chargefsd (see deploy/build-image.sh)"))
        }
        var h: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a: stable across runs and builds
        for f in files {
            guard let data = fm.contents(atPath: bundle + "/" + f) else {
                return .failure(CSIError(.failedPrecondition, "--daemon-bundle \(bundle): cannot read \(f)"))
            }
            for b in f.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
            data.withUnsafeBytes { raw in for b in raw { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 } }
        }
        let dir = hostDir + "/" + String(h, radix: 16)
        let root = "/proc/\(hostPid)/root"
        let done = root + dir + "/.complete"
        if !fm.fileExists(atPath: done) {
            let tmp = root + dir + ".tmp-\(getpid())"
            do {
                try? fm.removeItem(atPath: tmp)
                try fm.createDirectory(atPath: tmp + "/lib", withIntermediateDirectories: true)
                for f in files {
                    try fm.copyItem(atPath: bundle + "/" + f, toPath: tmp + "/" + f)
                    chmod(tmp + "/" + f, f.hasSuffix(".so") || f.contains(".so.") ? 0o644 : 0o755)
                }
                try Data().write(to: URL(fileURLWithPath: tmp + "/.complete"))
                try? fm.removeItem(atPath: root + dir)
                try fm.moveItem(atPath: tmp, toPath: root + dir)
            } catch {
                try? fm.removeItem(atPath: tmp)
                return .failure(CSIError(.internal, "cannot copy the daemon bundle \(bundle) to \(dir) on the host: \(error.localizedDescription)"))
            }
        }
        guard let nsenter = ["/usr/bin/nsenter", "/bin/nsenter", "/usr/sbin/nsenter"].first(where: { fm.isExecutableFile(atPath: $0) }) else {
            return .failure(CSIError(.failedPrecondition, "nsenter (util-linux) not found: needed to start daemons in the host's mount namespace"))
        }
        return .success(HostDaemon(namespacePid: hostPid, nsenter: nsenter,
                                   command: [dir + "/chargefsd", "--library-path", dir + "/lib", dir + "/lib/chargefsd"],
                                   dir: dir))
    }
}
