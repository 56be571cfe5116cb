import Glibc
import SystemPackage

// The values the file system API takes and returns.

/// Who asks: the kernel tells us the uid/gid of the process behind each request.
public struct Caller: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups, asked for only when needed (reading them costs a /proc read).
    public var supplementaryGroups: @Sendable () -> [UInt32]
    public init(uid: UInt32, gid: UInt32, supplementaryGroups: @escaping @Sendable () -> [UInt32] = { [] }) {
        self.uid = uid
        self.gid = gid
        self.supplementaryGroups = supplementaryGroups
    }
    /// Root (tests, and the daemon's own setup); a request always names its real caller.
    public static let root = Caller(uid: 0, gid: 0)

    func isMember(_ group: UInt32) -> Bool {
        gid == group || supplementaryGroups().contains(group)
    }
}

/// tmpfs's mount-time settings.
public struct FileSystemConfig: Sendable {
    /// size=: bytes of data, nil for unlimited.
    public var maxBytes: Int64?
    /// nr_inodes=, nil for unlimited.
    public var maxInodes: Int64?
    public var rootMode: UInt32 = 0o1777
    public var rootUid: UInt32 = 0
    public var rootGid: UInt32 = 0
    /// noatime: reads never update atime.
    public var noatime = false
    public var caching = FileCaching.automatic
    /// Files at least this large get a backing file of their own when opened read-only, so that
    /// the kernel can read them without the daemon (FUSE passthrough); nil: never.
    public var passthroughMinBytes: Int64? = FileSystemConfig.defaultPassthroughMinBytes
    /// 1 MiB: below it a file's reads are few and short, and its own file would cost more
    /// kernel memory (about 2 KiB) than its pages in the arena save in round trips.
    public static let defaultPassthroughMinBytes: Int64 = 1 << 20
    public init() {}
}

/// How read(2) and write(2) reach a file's data.
public enum FileCaching: String, Sendable {
    /// Straight to chargefsd (FOPEN_DIRECT_IO): no FUSE page cache, whose pages the kernel would
    /// charge to whichever cgroup reads or writes, and one round trip fewer per cached write (the
    /// kernel's getxattr before it). Mappings still go through the page cache, kept coherent.
    case direct
    /// Through the kernel's page cache, kept across opens: re-reads cost no round trip.
    case page
    /// `direct`, on every kernel (see the Bridge's CacheModeChoice for why). The default.
    case automatic
}

/// Attribute changes asked by setattr; nil fields stay.
public struct AttributeChanges: Sendable {
    public enum Time: Sendable {
        case now
        case set(timespec)
    }
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: Int64?
    public var atime: Time?
    public var mtime: Time?
    public var ctime: timespec?
    public init() {}
}

/// Figures for statfs.
public struct FileSystemUsage: Sendable {
    public var totalPages: Int64
    public var freePages: Int64
    public var totalInodes: Int64
    public var freeInodes: Int64
}

/// One readdir entry.
public struct DirectoryEntry {
    public var name: FileName
    public var ino: InodeNumber
    public var type: UInt8
    /// Offset to pass to resume after this entry.
    public var nextOffset: Int64
    /// Full attributes, for readdirplus (which counts as a lookup).
    public var attributes: Attributes?
}

/// Where an operation that needs new pages takes them from.
enum PageSupply {
    /// The charged reserve only; when it is short, the operation stops before changing anything
    /// and asks for a charge (`NeedingPages.charge`), which runs outside the tree's lock.
    case askForMore
    /// Whatever the reserve holds: the charger refused more (or the arena is full).
    case useWhatIsCharged
}

/// An operation's result, or the charge it needs first.
enum NeedingPages<Result> {
    case done(Result)
    case charge(PendingCharge)
}

/// What a write did.
public struct WriteResult: Sendable, Equatable {
    /// Bytes stored: fewer than given when only part fits (never fewer for a writeback).
    public var written: Int
    /// The write cleared setuid/setgid: the kernel's cached mode is stale.
    public var modeChanged: Bool
    /// The write took the file past `passthroughMinBytes` with no hole in it: it is due to move
    /// into a backing file of its own (pages to charge for that).
    var dueForBackingFile: Int? = nil
}

/// What an open gives the caller.
public struct OpenOutcome: Sendable {
    /// O_TRUNC cleared setuid/setgid.
    public var modeChanged: Bool
    /// The file the kernel may read for this open itself (FUSE passthrough), or nil.
    public var passthrough: BackingFile?
    /// The open may write: with `passthrough`, its reads and writes must still come here
    /// (direct I/O on top), only its mappings map the backing file.
    public var writes: Bool
}
