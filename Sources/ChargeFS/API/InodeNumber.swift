/// An inode's number, as the kernel names it in requests (FUSE's nodeid, also st_ino).
/// Its own type, so that an offset, a count or a cookie can never be passed where an inode is
/// meant.
public struct InodeNumber: RawRepresentable, Hashable, Comparable, Sendable, ExpressibleByIntegerLiteral,
    CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(integerLiteral value: UInt64) { rawValue = value }

    /// FUSE_ROOT_ID.
    public static let root: InodeNumber = 1

    public var description: String { String(rawValue) }
    public static func < (a: InodeNumber, b: InodeNumber) -> Bool { a.rawValue < b.rawValue }
}
