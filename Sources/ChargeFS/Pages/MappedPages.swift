import CFuse
import Glibc

/// Which arena pages this process has in its page tables: a bit per page, set once a read has
/// mapped the page (`PageStore.mapForReply`), cleared when a punch unmaps it. With -o takeover a
/// reply must never be copied from a page with no page-table entry (`PageStore.mapsChargedPages`);
/// mapping a page only when a reply first reads from it, once its data is written, costs a write
/// nothing (mapping it when charged zero-filled it first: 6% of a server's CPU in 4 KiB creates).
/// Reserved address space, zero until touched: one page of bits covers 128 MiB of arena.
final class MappedPages: @unchecked Sendable {
    private let words: UnsafeMutablePointer<UInt64>
    private let bytes: Int
    private let pages: Int

    /// nil when the bits cannot be mapped (then pages are mapped when charged, as before).
    init?(capacityPages: Int) {
        pages = capacityPages + 1
        bytes = (pages + 63) / 64 * 8
        let mapped = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapped, mapped != MAP_FAILED else { return nil }
        words = mapped.bindMemory(to: UInt64.self, capacity: bytes / 8)
    }

    deinit { munmap(words, bytes) }

    /// Whether every page of `first..<first + count` is mapped (the caller holds the file
    /// system's lock, shared or exclusive: no punch runs meanwhile).
    func allMapped(first: Int, count: Int) -> Bool {
        var page = first
        let end = min(first + count, pages)
        while page < end {
            let bit = page & 63
            let n = min(64 - bit, end - page)
            let mask = n == 64 ? UInt64.max : ((1 << UInt64(n)) - 1) << UInt64(bit)
            if cfuse_load_acquire_u64(words + (page >> 6)) & mask != mask { return false }
            page += n
        }
        return true
    }

    /// Sets (a read that mapped the pages, under the shared lock: other readers may set bits of
    /// the same word) or clears (a punch, under the exclusive lock) the pages' bits.
    func set(first: Int, count: Int, mapped: Bool) {
        var page = first
        let end = min(first + count, pages)
        while page < end {
            let bit = page & 63
            let n = min(64 - bit, end - page)
            let mask = n == 64 ? UInt64.max : ((1 << UInt64(n)) - 1) << UInt64(bit)
            if mapped { cfuse_or_release_u64(words + (page >> 6), mask) } else { cfuse_and_release_u64(words + (page >> 6), ~mask) }
            page += n
        }
    }
}
