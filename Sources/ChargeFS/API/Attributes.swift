import Glibc

/// A file name: any bytes but '/' and NUL, not necessarily UTF-8.
public typealias FileName = [UInt8]

/// What stat shows of an inode.
public struct Attributes: Sendable, Equatable {
    public var ino: InodeNumber
    public var generation: UInt32
    public var mode: UInt32
    public var nlink: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var rdev: UInt64
    public var size: Int64
    public var blocks: Int64
    public var atime: timespec
    public var mtime: timespec
    public var ctime: timespec

    public var stat: stat {
        var st = Glibc.stat()
        st.st_ino = UInt(ino.rawValue)
        st.st_mode = mode
        st.st_nlink = UInt(nlink)
        st.st_uid = uid
        st.st_gid = gid
        st.st_rdev = UInt(rdev)
        st.st_size = Int(size)
        st.st_blocks = Int(blocks)
        st.st_blksize = PageSize.bytes
        st.st_atim = atime
        st.st_mtim = mtime
        st.st_ctim = ctime
        return st
    }
}

extension timespec: @retroactive Equatable {
    public static func == (a: timespec, b: timespec) -> Bool { a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec }
    static func < (a: timespec, b: timespec) -> Bool {
        a.tv_sec < b.tv_sec || (a.tv_sec == b.tv_sec && a.tv_nsec < b.tv_nsec)
    }
    static func <= (a: timespec, b: timespec) -> Bool { !(b < a) }

    static var now: timespec {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return ts
    }
}

/// st_mode bits, spelled once (Glibc's and the kernel headers' macros clash in Swift).
enum ModeBits {
    static let typeMask: UInt32 = 0o170000
    static let directory: UInt32 = 0o040000
    static let regular: UInt32 = 0o100000
    static let symlink: UInt32 = 0o120000
    static let setuid: UInt32 = 0o4000
    static let setgid: UInt32 = 0o2000
    static let groupExecute: UInt32 = 0o0010
}
