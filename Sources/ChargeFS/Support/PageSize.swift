/// The page every layer counts in: the arena's unit, the unit of a charge, statfs's block and
/// st_blksize, and the size FUSE's io_uring buffers round to. The arena refuses to start on a
/// kernel whose page differs (`ArenaError.pageSize`), so this constant is the kernel's too.
public enum PageSize {
    public static let bytes = 4096
}
