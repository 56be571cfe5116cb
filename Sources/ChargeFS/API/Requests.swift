import Glibc

// What requests carry and what the file system answers, beside attributes and flags.

/// Who asks: the kernel tells us the uid/gid of the process behind each request.
public struct Caller: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    /// The calling process (its thread group), as the kernel names it in the caller's pid
    /// namespace as the daemon sees it; 0 when unknown (in-process callers).
    public var pid: Int32 = 0
    /// Supplementary groups, asked for only when needed (reading them costs a /proc read).
    public var supplementaryGroups: @Sendable () -> [UInt32]
    public init(uid: UInt32, gid: UInt32, pid: Int32 = 0, supplementaryGroups: @escaping @Sendable () -> [UInt32] = { [] }) {
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.supplementaryGroups = supplementaryGroups
    }
    /// Root (tests, and the daemon's own setup); a request always names its real caller.
    public static let root = Caller(uid: 0, gid: 0)

    func isMember(_ group: UInt32) -> Bool {
        gid == group || supplementaryGroups().contains(group)
    }
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
