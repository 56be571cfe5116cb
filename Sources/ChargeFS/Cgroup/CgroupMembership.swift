import Glibc
import SystemPackage

/// Which memory cgroup a process is in (memcg=auto charges a file to its writer's cgroup).
public enum CgroupMembership {
    /// The top of the cgroup hierarchy that holds `path` (as this process sees it: the daemon's
    /// cgroup namespace), which /proc/PID/cgroup's paths are relative to.
    public static func hierarchyRoot(of path: String) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else { return path }
        var level = path
        while level != "/" && !cgIsMountRoot(level, dev: st.st_dev) { level = cgParentPath(level) }
        return level
    }

    /// The memory cgroup named in /proc/PID/cgroup's `text`, relative to the hierarchy's root
    /// ("/" for the root): v1's line whose controllers include memory, v2's "0::" line.
    public static func memoryCgroup(procText text: String, version: CgroupVersion) -> String? {
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            let matches = version == .v2
                ? fields[0] == "0" && fields[1].isEmpty
                : fields[1].split(separator: ",").contains("memory")
            if matches { return String(fields[2]) }
        }
        return nil
    }

    /// The memory cgroup of process `pid` as a path under `root` (hierarchyRoot's answer); nil
    /// when the process is gone or /proc says nothing of it.
    public static func memoryCgroup(ofProcess pid: Int32, root: String, version: CgroupVersion) -> String? {
        guard pid > 0, let text = try? cgReadFile("/proc/\(pid)/cgroup"),
              let relative = memoryCgroup(procText: text, version: version) else { return nil }
        // A cgroup removed under a running process shows " (deleted)"; such a path opens nothing.
        if relative == "/" { return root }
        return root == "/" ? relative : root + relative
    }
}
