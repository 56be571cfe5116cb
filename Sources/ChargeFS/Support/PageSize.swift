/// The page every layer counts in: the arena's unit, the unit of a charge, statfs's block and
/// st_blksize, and the size FUSE's io_uring buffers round to. The arena refuses to start on a
/// kernel whose page differs (`ArenaError.pageSize`), so this constant is the kernel's too.
public enum PageSize {
    public static let bytes = 4096

    /// Pages that hold `bytes` from offset 0 (the page index just past them), rounding up; a
    /// value near 2^63 (tmpfs's size limit) must not overflow on the way.
    public static func covering(_ bytes: Int64) -> Int {
        Int(bytes / Int64(Self.bytes)) + (bytes % Int64(Self.bytes) == 0 ? 0 : 1)
    }
}
