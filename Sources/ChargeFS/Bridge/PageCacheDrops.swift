import CFuse
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
final class PageCacheDrops: Sendable {
    private let marked = Mutex<Set<InodeNumber>>([])

    /// A writeback of mapped pages of `ino` arrived.
    func noteWriteback(_ ino: InodeNumber) {
        _ = marked.withLock { $0.insert(ino) }
    }

    /// Whether `ino` was marked; unmarks it.
    func take(_ ino: InodeNumber) -> Bool {
        marked.withLock { $0.remove(ino) != nil }
    }
}
