import CFuse
import Glibc

// The flag words requests carry, as types: the bridge builds them from the kernel's raw values,
// the tree reads them by name. Unknown bits are kept, so the tree can refuse them as tmpfs does.

/// renameat2(2) flags.
public struct RenameFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let noReplace = RenameFlags(rawValue: UInt32(CFUSE_RENAME_NOREPLACE))
    public static let exchange = RenameFlags(rawValue: UInt32(CFUSE_RENAME_EXCHANGE))
}

/// fallocate(2) modes.
public struct FallocateMode: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    /// Allocate: every hole in the range.
    public static let allocate: FallocateMode = []
    public static let keepSize = FallocateMode(rawValue: Int32(CFUSE_FALLOC_KEEP_SIZE))
    public static let punchHole = FallocateMode(rawValue: Int32(CFUSE_FALLOC_PUNCH_HOLE))
}

/// setxattr(2) flags.
public struct XattrFlags: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let create = XattrFlags(rawValue: Int32(CFUSE_XATTR_CREATE))
    public static let replace = XattrFlags(rawValue: Int32(CFUSE_XATTR_REPLACE))
}

/// The lseek(2) requests that reach a file system (the kernel answers the others itself).
public enum SeekWhence: Sendable {
    case data
    case hole

    /// nil for anything but SEEK_DATA and SEEK_HOLE.
    public init?(rawValue: Int32) {
        switch rawValue {
        case Int32(CFUSE_SEEK_DATA): self = .data
        case Int32(CFUSE_SEEK_HOLE): self = .hole
        default: return nil
        }
    }
}

/// open(2) flags, as far as the tree cares: whether the open may write, and O_TRUNC.
public struct OpenFlags: Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let readWrite = OpenFlags(rawValue: O_RDWR)

    public var mayWrite: Bool { rawValue & O_ACCMODE != O_RDONLY }
    public var truncates: Bool { rawValue & O_TRUNC != 0 }
    public var noatime: Bool { rawValue & Int32(CFUSE_O_NOATIME) != 0 }
}

/// The mode a create asks for: file type and permission bits, as st_mode (the kernel has already
/// applied the caller's umask).
public struct FileMode: RawRepresentable, Sendable, ExpressibleByIntegerLiteral {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(integerLiteral value: UInt32) { rawValue = value }

    /// Permissions with setuid, setgid and sticky.
    public var permissions: UInt32 { rawValue & 0o7777 }
}
