import Synchronization

/// Files whose mapped pages were written back since their last close, so that the kernel's
/// page cache of the FUSE inode can be dropped when the last open of it is released.
///
/// Why: with `cache=direct`, a shared mapping still goes through the FUSE inode's page cache
/// (FUSE_DIRECT_IO_ALLOW_MMAP). After the writer unmaps and closes, those clean pages stay,
/// charged to the writer's cgroup, until reclaim. The next read-only open is a passthrough one
/// without FOPEN_KEEP_CACHE, so the kernel invalidates them inside that open
/// (`invalidate_inode_pages2`): measured 2026-12-06, a 1 GiB file written through mmap left
/// 1 GiB of page cache on the writer's cgroup, and the first read ran at 0.73 of tmpfs while
/// later reads did not. Dropping it at the last release moves that cost off the reader's path
/// and gives the writer's cgroup its page cache back at once.
///
/// Only writebacks mark a file (a mapping that only reads is left alone), and only
/// `cache=direct` asks for it (with `cache=page` the cache is the point).
///
/// Every last release asks (`take`), from whichever handling thread serves it: the marks are
/// spread over shards by inode number, each with its own lock and on its own cache line, so
/// that releases on many CPUs (real nodes have 32-256) do not all queue on one lock, and a
/// shard with nothing marked (the usual case: no shared mapping wrote) is answered by one
/// atomic load, with no lock and no write to a shared line.
final class PageCacheDrops: Sendable {
    /// Shards: a power of two, enough that 256 CPUs' handling threads rarely meet on one.
    static let shardCount = 256
    private let shards = InlineArray<256, Shard> { _ in Shard() }

    /// A writeback of mapped pages of `ino` arrived.
    func noteWriteback(_ ino: InodeNumber) {
        let i = Self.shard(of: ino)
        shards[i].marked.withLock { set in
            // Only a holder of the lock writes the count: a load and a store, no atomic add.
            if set.insert(ino).inserted { shards[i].count.store(set.count, ordering: .releasing) }
        }
    }

    /// Whether `ino` was marked; unmarks it.
    func take(_ ino: InodeNumber) -> Bool {
        let i = Self.shard(of: ino)
        // A writeback of this inode happens before its last release (the kernel writes a
        // mapping back before the release it sends), so a zero seen here is no lost mark.
        guard shards[i].count.load(ordering: .acquiring) > 0 else { return false }
        return shards[i].marked.withLock { set in
            guard set.remove(ino) != nil else { return false }
            shards[i].count.store(set.count, ordering: .releasing)
            return true
        }
    }

    /// Marked inodes in all shards (tests).
    var markedCount: Int {
        var n = 0
        for i in 0..<Self.shardCount { n += shards[i].count.load(ordering: .acquiring) }
        return n
    }

    private static func shard(of ino: InodeNumber) -> Int {
        // Fibonacci hashing: consecutive inode numbers land in different shards, and so do
        // numbers that differ by a multiple of the shard count.
        Int(truncatingIfNeeded: (ino.rawValue &* 0x9E37_79B9_7F4A_7C15) >> 56)
    }

    /// One lock and its marks, 256 bytes apart from the next (stored inline, no reference
    /// count to touch): two shards' words never share a cache line, nor a pair of lines (the
    /// adjacent-line prefetcher pulls 128 bytes).
    private struct Shard: ~Copyable, Sendable {
        let marked = Mutex<Set<InodeNumber>>([])
        let count = Atomic<Int>(0)
        private let padding: (SIMD16<UInt64>, SIMD8<UInt64>, SIMD4<UInt64>) = (.zero, .zero, .zero)
    }
}
