import Glibc
import SystemPackage

// The values the file system API takes and returns.

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
    /// Smaller files pass through too when an open looks like a map or an exec (an exec open,
    /// an ELF file): FileSystemCore+Mapped. Off only in tests that measure without it.
    public var mappedPassthrough = true
    public init() {}
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
    /// The write took the file past `passthroughMinBytes`: it is due to move into a backing file
    /// of its own (the runs of pages to charge for that).
    var dueForBackingFile: [Range<Int>]? = nil
}

/// What an open gives the caller.
public struct OpenOutcome: Sendable {
    /// O_TRUNC cleared setuid/setgid.
    public var modeChanged: Bool
    /// The file the kernel may read for this open itself (FUSE passthrough), or nil.
    public var passthrough: PassthroughFile?
    /// The open may write: with `passthrough`, its reads and writes must still come here
    /// (direct I/O on top), only its mappings map the backing file.
    public var writes: Bool
}

/// A file the kernel may read for an open itself (FUSE passthrough): what the transport hands
/// the kernel. Holding it keeps the file open; the file system keeps it at least until the last
/// passthrough open is released (`FileSystem.release(_:passthrough:)`).
public struct PassthroughFile: Sendable {
    let backing: BackingFile
    public var fileDescriptor: FileDescriptor { backing.fileDescriptor }
    /// Whether two opens got the same file.
    public static func same(_ a: PassthroughFile, _ b: PassthroughFile) -> Bool { a.backing === b.backing }
}

/// Bytes read into a buffer of their own (a backing file's), to answer with after the tree's
/// lock is released; `send` hands them over once and frees the buffer when it is `owned` (a
/// heap allocation); otherwise it is the thread's scratch (`DumpExcluded.scratch`), reused by
/// the thread's next read.
struct CopiedRead {
    let buffer: UnsafeMutableRawPointer
    let count: Int
    var owned = true

    func send(_ body: (UnsafeBufferPointer<iovec>) -> Void) {
        var vector = iovec(iov_base: buffer, iov_len: count)
        withUnsafePointer(to: &vector) { body(UnsafeBufferPointer(start: $0, count: count > 0 ? 1 : 0)) }
        if owned { buffer.deallocate() }
    }
}
