import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// chargefsd as a separate program: starting one for a volume, finding it, unmounting it, and
/// reading a mount's figures. Blocking calls; VolumeManager runs them off the async executor.
struct Chargefsd: Sendable {
    /// The chargefsd executable.
    let binary: String
    /// cgroup.procs of the node-level cgroup the daemons run in: their own memory (code, FUSE
    /// buffers) is the driver's, not the plugin container's (whose restart must not take them
    /// along) and not the pod's (which pays only for the volume's pages, through memcg=).
    let daemonCgroupProcs: String

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
    /// cgroup, so neither a signal to the plugin's process group nor the end of the plugin's
    /// container cgroup reaches it. Returns nil on success, else chargefsd's own error.
    func mount(target: String, options: [String], logFile: String, timeout: Double = 60) -> String? {
        // sh moves itself into the daemon cgroup, then becomes chargefsd: every process of the
        // daemon is born there (moving it afterwards would race with its own fork).
        let argv = ["/bin/sh", "-c", "echo $$ > \"$0\" && exec \"$@\"", daemonCgroupProcs,
                    binary, target, "-o", options.joined(separator: ",")]
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
        let rc = posix_spawn(&pid, "/bin/sh", &actions, &attr, cArgs, environ)
        if rc != 0 { return "cannot start /bin/sh for \(binary): \(String(cString: strerror(rc)))" }

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

    /// Whether a chargefsd mount is at `path` and its daemon answers (statfs); a mount whose
    /// daemon died answers ENOTCONN.
    static func mountState(_ path: String) -> MountState {
        guard isChargefsMount(path) else { return .absent }
        var s = statvfs()
        if statvfs(path, &s) != 0 && errno == ENOTCONN { return .dead }
        return .serving
    }

    /// The filesystem type mounted at `path` (the last mount there), nil when none.
    static func mountType(_ path: String) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
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
        let deadline = Date().addingTimeInterval(timeout)
        for pid in pids {
            while kill(pid, 0) == 0 || errno == EPERM {
                // a zombie of ours cannot exist (it is not our child); stop when it is gone
                if Date() > deadline { return "unmounted \(target), but chargefsd \(pid) is still running" }
                usleep(20_000)
            }
        }
        return nil
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
