import CFuse
import Glibc

/// A bad command line or mount option: one line that names the problem.
public struct UsageError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = printable(description) }
}

/// `-o io_uring=`: FUSE over io_uring (per-CPU queues) or /dev/fuse.
public enum IoUringChoice: String, Sendable, Equatable {
    /// Where the kernel offers it (enable_uring on), else /dev/fuse.
    case auto
    /// Required: the mount fails where the kernel does not offer it.
    case on
    /// Never: /dev/fuse only.
    case off
}

/// What the command line asks for: `chargefsd [SOURCE] MOUNTPOINT [-o OPT[,OPT...]] [-f] [-d]`.
public struct MountOptions: Sendable, Equatable {
    public var source = "chargefs"
    public var mountpoint = ""
    public var foreground = false
    public var debug = false
    public var showHelp = false
    public var showVersion = false
    /// `--cleanup CGROUP`: remove what a killed daemon left in that cgroup, then exit.
    public var cleanupTarget: String?
    /// `--upgrade MOUNTPOINT`: hand that -o takeover mount to the chargefsd installed now, then exit.
    public var upgradeMountpoint: String?

    /// size=: bytes; 0 means unlimited, as tmpfs. Default: half of RAM.
    public var sizeBytes: Int64?
    /// nr_inodes=; 0 means unlimited. Default: half of RAM's pages, as tmpfs.
    public var maxInodes: Int64?
    public var rootMode: UInt32 = 0o1777
    public var rootUid: UInt32?
    public var rootGid: UInt32?
    public var memcg: String?
    /// memcg_scope=P, with memcg=auto only: the cgroup whose subtree shares charges.
    public var memcgScope: String?
    /// memcg=auto: each file charged to its users' cgroups inside memcg_scope (Tejun Heo's
    /// shared charging; FileSystemCore+Shares).
    public var memcgAuto: Bool { memcg == "auto" }
    /// The cgroup the mount's own charger (and its permission check) is for: memcg=PATH, or
    /// memcg_scope=P under memcg=auto.
    public var chargeTargetPath: String? { memcgAuto ? memcgScope : memcg }
    /// memcg_limit=high|max: which v2 limit ends the room (see CgroupLimitPolicy).
    public var memcgLimit = CgroupLimitPolicy.high
    public var noatime = false
    /// cache=direct|page (direct_io: cache=direct); see FileCaching.
    public var caching = FileCaching.automatic
    /// io_uring=auto|on|off: which transport serves requests (see IoUringChoice).
    public var ioUring = IoUringChoice.auto
    /// passthrough=auto|off: whether large files opened read-only may be read by the kernel
    /// itself (FUSE passthrough, where the kernel offers it).
    public var readPassthrough = true
    /// takeover: keep the metadata for a successor and run a keeper that starts one when the
    /// server dies (docs/takeover.md). Off by default: about 1 µs more per create or unlink.
    public var takeover = false
    /// takeover_max=N: successors the keeper starts in 60 s before it gives up (a crash loop).
    public var takeoverMax = 5
    /// `--takeover`: this process is a successor the keeper started (never typed by a user).
    public var isSuccessor = false
    /// Options handed to the kernel mount through libfuse, as given.
    public var passthrough: [String] = []

    public init() {}

    /// Options libfuse or the kernel mount understand, taken as they are.
    static let fuseFlags: Set<String> = [
        "allow_other", "allow_root", "default_permissions", "ro", "rw", "nosuid", "suid", "nodev",
        "dev", "noexec", "exec", "sync", "async", "dirsync", "atime", "relatime", "strictatime",
        "nodiratime", "diratime", "lazytime", "nolazytime", "auto_unmount",
    ]
    /// fstab words that mean something to mount(8), not to a file system.
    static let mountWords: Set<String> = ["auto", "noauto", "user", "nouser", "users", "owner", "nofail", "_netdev", "defaults"]

    public static func parse(_ arguments: [String]) throws(UsageError) -> MountOptions {
        var o = MountOptions()
        var positional: [String] = []
        var i = 0
        while i < arguments.count {
            let arg = arguments[i]
            i += 1
            switch arg {
            case "-f", "--foreground": o.foreground = true
            case "-d", "--debug": o.debug = true; o.foreground = true
            case "-h", "--help": o.showHelp = true
            case "-V", "--version": o.showVersion = true
            case "-s": break  // single-threaded: accepted for mount.fuse compatibility
            case "-o":
                guard i < arguments.count else { throw UsageError("-o needs a list of options") }
                try o.apply(arguments[i])
                i += 1
            case "--takeover": o.isSuccessor = true
            case "--upgrade":
                guard i < arguments.count else { throw UsageError("--upgrade needs a mountpoint") }
                o.upgradeMountpoint = arguments[i]
                i += 1
            case "--cleanup":
                guard i < arguments.count else { throw UsageError("--cleanup needs a cgroup path") }
                o.cleanupTarget = arguments[i]
                i += 1
            default:
                if arg.hasPrefix("-o") && arg.count > 2 {
                    try o.apply(String(arg.dropFirst(2)))
                } else if arg.hasPrefix("-") && arg != "-" {
                    throw UsageError("unknown argument '\(arg)' (see chargefsd -h)")
                } else {
                    positional.append(arg)
                }
            }
        }
        if o.showHelp || o.showVersion || o.cleanupTarget != nil || o.upgradeMountpoint != nil { return o }
        if let scope = o.memcgScope, !o.memcgAuto {
            throw UsageError("memcg_scope=\(scope): only with memcg=auto")
        }
        if o.memcgAuto && o.memcgScope == nil {
            throw UsageError("memcg=auto needs memcg_scope=/sys/fs/cgroup/... (the cgroup whose subtree shares charges)")
        }
        switch positional.count {
        case 1: o.mountpoint = positional[0]
        case 2: o.source = positional[0]; o.mountpoint = positional[1]
        case 0: throw UsageError("missing mountpoint (usage: chargefsd [SOURCE] MOUNTPOINT [-o OPTIONS])")
        default: throw UsageError("too many arguments: '\(positional[2])' (usage: chargefsd [SOURCE] MOUNTPOINT [-o OPTIONS])")
        }
        if o.mountpoint.isEmpty { throw UsageError("empty mountpoint") }
        return o
    }

    mutating func apply(_ list: String) throws(UsageError) {
        for option in list.split(separator: ",", omittingEmptySubsequences: true).map(String.init) {
            let parts = option.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0])
            let value = parts.count > 1 ? String(parts[1]) : nil
            func required() throws(UsageError) -> String {
                guard let value, !value.isEmpty else { throw UsageError("mount option '\(key)' needs a value") }
                return value
            }
            switch key {
            case "size": sizeBytes = try Self.parseSize(try required(), option: "size")
            case "nr_inodes": maxInodes = try Self.parseCount(try required(), option: "nr_inodes")
            case "mode":
                let v = try required()
                guard let mode = UInt32(v, radix: 8), mode <= 0o7777 else {
                    throw UsageError("mode=\(v): not an octal mode (0000 to 7777)")
                }
                rootMode = mode
            case "uid": rootUid = try Self.parseID(try required(), option: "uid")
            case "gid": rootGid = try Self.parseID(try required(), option: "gid")
            case "memcg":
                let v = try required()
                guard v.hasPrefix("/") || v == "auto" else { throw UsageError("memcg=\(v): must be an absolute path under /sys/fs/cgroup, or auto") }
                memcg = v
            case "memcg_scope":
                let v = try required()
                guard v.hasPrefix("/") else { throw UsageError("memcg_scope=\(v): must be an absolute path under /sys/fs/cgroup") }
                memcgScope = v
            case "memcg_limit":
                let v = try required()
                guard let policy = CgroupLimitPolicy(rawValue: v) else {
                    throw UsageError("memcg_limit=\(v): must be high or max")
                }
                memcgLimit = policy
            case "noatime" where value == nil:
                noatime = true
                passthrough.append(option)
            case "direct_io" where value == nil:
                caching = .direct
            case "cache":
                let v = try required()
                guard let c = FileCaching(rawValue: v), c != .automatic else {
                    throw UsageError("cache=\(v): must be direct or page")
                }
                caching = c
            case "io_uring":
                guard let v = value else { ioUring = .on; break }
                guard let choice = IoUringChoice(rawValue: v) else {
                    throw UsageError("io_uring=\(v): must be auto, on or off")
                }
                ioUring = choice
            case "passthrough":
                let v = try required()
                guard v == "auto" || v == "off" else { throw UsageError("passthrough=\(v): must be auto or off") }
                readPassthrough = v == "auto"
            case "takeover" where value == nil:
                takeover = true
            case "takeover_max":
                let v = try required()
                guard let n = Int(v), (1...1000).contains(n) else { throw UsageError("takeover_max=\(v): must be a number from 1 to 1000") }
                takeoverMax = n
            case "fsname", "subtype":
                break  // chargefsd sets these itself
            case _ where Self.fuseFlags.contains(key) && value == nil:
                passthrough.append(option)
            case "max_read":
                // libfuse 3.14 then fails its INIT against our 1 MiB requests, after the mount.
                throw UsageError("mount option 'max_read' is not supported (chargefsd sets 1 MiB requests)")
            case "blksize":
                throw UsageError("mount option 'blksize' applies only to block-device FUSE mounts")
            case _ where Self.mountWords.contains(key) && value == nil:
                break
            case _ where key.hasPrefix("x-") || key.hasPrefix("comment="):
                break  // fstab annotations for other tools
            default:
                throw UsageError("unknown mount option '\(option)'")
            }
        }
    }

    static func parseID(_ text: String, option: String) throws(UsageError) -> UInt32 {
        guard let id = UInt32(text), id != UInt32.max else { throw UsageError("\(option)=\(text): not a numeric id") }
        return id
    }

    /// A number with an optional k, m, g, t, p or e suffix (powers of 1024), as tmpfs reads it.
    static func parseCount(_ text: String, option: String) throws(UsageError) -> Int64 {
        var digits = Substring(text)
        var shift: Int64 = 0
        if let last = digits.last, let s = "kmgtpe".firstIndex(of: Character(last.lowercased())) {
            shift = Int64(10 * ("kmgtpe".distance(from: "kmgtpe".startIndex, to: s) + 1))
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int64(digits) else {
            throw UsageError("\(option)=\(text): not a number (use digits with an optional k, m or g suffix)")
        }
        let (value, overflow) = n.multipliedReportingOverflow(by: Int64(1) << shift)
        guard !overflow else { throw UsageError("\(option)=\(text): too large") }
        return value
    }

    /// size=: like parseCount, or N% of physical memory.
    static func parseSize(_ text: String, option: String) throws(UsageError) -> Int64 {
        if text.hasSuffix("%") {
            let digits = text.dropLast()
            guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let percent = Int64(digits),
                  percent <= 100_000 else {
                throw UsageError("\(option)=\(text): not a percentage of RAM")
            }
            // tmpfs's arithmetic (shmem_parse_one): bytes of RAM times percent / 100, rounded up
            // to whole pages.
            let pageSize = Int64(PageSize.bytes)
            let bytes = physicalPages * pageSize * percent / 100
            return (bytes + pageSize - 1) / pageSize * pageSize
        }
        return try parseCount(text, option: option)
    }

    /// RAM in pages, as tmpfs counts it (totalram_pages).
    public static var physicalPages: Int64 {
        cfuse_physical_memory() / Int64(PageSize.bytes)
    }

    /// size= as the file system takes it: nil for unlimited. The default is tmpfs's: half of
    /// RAM's pages (not half of its bytes, which differs by a page when the count is odd).
    public var effectiveMaxBytes: Int64? {
        let bytes = sizeBytes ?? Self.physicalPages / 2 * Int64(PageSize.bytes)
        return bytes == 0 ? nil : bytes
    }

    public var effectiveMaxInodes: Int64? {
        let count = maxInodes ?? Self.physicalPages / 2
        return count == 0 ? nil : count
    }

    public var fileSystemConfig: FileSystemConfig {
        var c = FileSystemConfig()
        c.maxBytes = effectiveMaxBytes
        c.maxInodes = effectiveMaxInodes
        c.rootMode = rootMode
        c.rootUid = rootUid ?? getuid()
        c.rootGid = rootGid ?? getgid()
        c.noatime = noatime
        c.caching = caching
        // memcg=auto: only files hosted by the scope itself pass through (a backing file's
        // pages cannot move, and those never move again: FileSystemCore+Shares).
        if !readPassthrough { c.passthroughMinBytes = nil }
        return c
    }

    /// The -o list libfuse gets: kernel-side options plus ours.
    public var fuseOptionList: String {
        var list = ["fsname=\(fsname.replacing("\\", with: "\\\\"))", "subtype=chargefsd", "default_permissions"]
        list += passthrough.filter { $0 != "default_permissions" }
        return list.joined(separator: ",")
    }

    /// The source column of /proc/mounts and findmnt: names the cgroup that pays.
    public var fsname: String {
        let base = String(source.map { $0 == "," ? "_" : $0 })
        guard let memcg = chargeTargetPath else { return base }
        if memcgAuto { return "\(base):memcg=auto:\(String(memcg.map { $0 == "," ? "_" : $0 }))" }
        return "\(base):memcg=\(String(memcg.map { $0 == "," ? "_" : $0 }))"
    }

    public static let usage = """
    usage: chargefsd [SOURCE] MOUNTPOINT [-o OPTION[,OPTION...]] [-f] [-d] [-h] [-V]
           chargefsd --cleanup CGROUP_PATH
           chargefsd --upgrade MOUNTPOINT   (a -o takeover mount: hand it to the chargefsd installed now)

    A RAM-backed file system like tmpfs, whose pages can be charged to a chosen memory cgroup.

    options (-o):
      size=BYTES        limit of data stored (k/m/g suffixes, or N% of RAM; 0: unlimited; default 50%)
      nr_inodes=N       limit of inodes (k/m/g suffixes; 0: unlimited; default: half of RAM's pages)
      mode=OCTAL        permissions of the root directory (default 1777)
      uid=N, gid=N      owner of the root directory (default: the caller's)
      memcg=PATH        charge every stored page to this memory cgroup (v1 or v2); writes that
                        would pass its memory limit (or an ancestor's) get ENOSPC
      memcg=auto,memcg_scope=PATH
                        charge each file to the cgroup (inside PATH) of the process that writes
                        it; once a process of another cgroup opens it, to their nearest common
                        ancestor (never above PATH), counted as shared by each: ENOSPC when a
                        cgroup's usage plus its shared bytes would pass its limit. Permission as
                        for memcg=PATH. getfattr -n user.chargefs.shares MOUNTPOINT shows it
      memcg_limit=high  (default) on cgroup v2, ENOSPC at the lower of memory.high and memory.max:
                        stored pages cannot be reclaimed, so above memory.high the kernel would
                        throttle the whole cgroup for as long as they are stored
      memcg_limit=max   ENOSPC at memory.max only (as the tmpfs memcg= patch); above memory.high
                        writes and the cgroup's processes are throttled by the kernel
      cache=direct      (default) read(2) and write(2) go to chargefsd, bypassing the kernel's page
                        cache, so no reader or writer is charged for a cached copy. Shared mmap
                        works on Linux 6.9+; before 6.9, mmap(MAP_SHARED) fails with ENODEV
                        (private maps, loaders and exec work). direct_io: the same
      cache=page        reads are served from the kernel's page cache, kept across opens: faster
                        re-reads and shared mmap on any kernel, but each reader's and writer's
                        cgroup is charged for its cached copy; before Linux 6.9 a writer inside the
                        target can then be OOM-killed at the limit
      io_uring=auto    (default) serve requests over FUSE's io_uring transport (Linux 6.14+) where
                        the kernel offers it (root enables it: /sys/module/fuse/parameters/
                        enable_uring = Y; chargefsd never sets it), else over /dev/fuse.
                        on: fail where it is not offered; off: always /dev/fuse
      passthrough=auto  (default) a file of 1 MiB or more, opened read-only while nothing else has it
                        open and holding no hole, is read by the kernel from a file of its own
                        (FUSE passthrough, Linux 6.9+, root), charged like every page; off: never
      takeover          a keeper (chargefs-keeper) holds the mount's files and starts a new chargefsd
                        when this one dies (kill -9, a crash): no file is lost and callers wait
                        instead of failing (docs/takeover.md). Costs about 1 µs per create/unlink
      takeover_max=N    successors allowed in 60 s (default 5); past that the keeper aborts the
                        mount (callers get ENOTCONN) instead of looping on a state that crashes
      allow_other, ro, noatime, nosuid, nodev, noexec, ...  as for any FUSE mount
    flags:
      -f  stay in the foreground     -d  foreground with FUSE debug output
      -h  this help                  -V  version
    """
}
