/// Which arena page holds each page of one file: a sparse two-level table.
///
/// Chunks of 512 slots (2 MiB of file) are created only where data exists, so a file truncated
/// to 2^62 bytes costs nothing, and a dense file costs 4 bytes per 4 KiB page (0.1%).
/// Slot value 0 is a hole.
struct PageMap {
    /// The slot value of a page held in the file's own backing file (never an arena page: the
    /// arena has at most UInt32.max - 1 of them).
    static let inBackingFile = UInt32.max
    static let chunkShift = 9
    static let chunkSlots = 1 << chunkShift

    final class Chunk {
        var slots = [UInt32](repeating: 0, count: PageMap.chunkSlots)
        var used = 0
    }

    private(set) var chunks: [Int: Chunk] = [:]
    /// Pages held, for st_blocks. 32 bits, as a page number (every inode carries a map: with the
    /// span below, 20 bytes, so that the inode's next 32-bit field fills the last 4 of 24).
    private var held: UInt32 = 0
    var count: Int { Int(held) }
    /// The span of indexes changed since `takeChanged` (the kept state records it; two compares
    /// per change when no state is kept). 32 bits each, as a page number: every inode carries
    /// them. An index past them widens the span to the end (`UInt32.max`), which records more,
    /// never less.
    private var changedFrom = UInt32.max
    private var changedTo: UInt32 = 0

    @inline(__always)
    private mutating func noteChanged(_ from: Int, _ to: Int) {
        let from = UInt32(clamping: min(from, Int(UInt32.max) - 1)), to = UInt32(clamping: to)
        if from < changedFrom { changedFrom = from }
        if to > changedTo { changedTo = to }
    }

    /// The span changed since the last call, nil when none; starts a new span.
    mutating func takeChanged() -> Range<Int>? {
        defer { changedFrom = .max; changedTo = 0 }
        guard changedFrom < changedTo else { return nil }
        return Int(changedFrom)..<(changedTo == .max ? Int.max >> 1 : Int(changedTo))
    }

    @inline(__always)
    func page(at index: Int) -> UInt32 {
        guard let chunk = chunks[index >> Self.chunkShift] else { return 0 }
        return chunk.slots[index & (Self.chunkSlots - 1)]
    }

    /// Stores `page` at a slot that must be a hole.
    mutating func set(_ page: UInt32, at index: Int) {
        let key = index >> Self.chunkShift
        let chunk: Chunk
        if let existing = chunks[key] {
            chunk = existing
        } else {
            chunk = Chunk()
            chunks[key] = chunk
        }
        chunk.slots[index & (Self.chunkSlots - 1)] = page
        chunk.used += 1
        held += 1
        noteChanged(index, index + 1)
    }

    /// Puts `page` in place of the page held at `index` (a move between targets).
    mutating func replace(at index: Int, with page: UInt32) {
        noteChanged(index, index + 1)
        chunks[index >> Self.chunkShift]?.slots[index & (Self.chunkSlots - 1)] = page
    }

    /// Every page held, with its index, in no particular order. Each chunk only up to its last
    /// used slot (as `removeAll`): a successor lists every file's pages, and scanning all 512
    /// slots of a one-page file's chunk was 40% of its CPU at 10,000 files (perf, 2026-12-06).
    func forEach(_ body: (_ index: Int, _ page: UInt32) -> Void) {
        for (key, chunk) in chunks {
            var left = chunk.used
            var slot = 0
            while left > 0 && slot < Self.chunkSlots {
                let page = chunk.slots[slot]
                if page != 0 {
                    body((key << Self.chunkShift) + slot, page)
                    left -= 1
                }
                slot += 1
            }
        }
    }

    /// Empties slots [from, to) and returns the pages they held.
    mutating func remove(from: Int, to: Int, into freed: inout [UInt32]) {
        guard from < to, count > 0 else { return }
        noteChanged(from, to)
        let firstKey = from >> Self.chunkShift
        let lastKey = (to - 1) >> Self.chunkShift
        // Visit only existing chunks when the range is wider than the map.
        let keys: [Int] = (lastKey - firstKey) > chunks.count
            ? chunks.keys.filter { $0 >= firstKey && $0 <= lastKey }
            : Array(firstKey...lastKey)
        for key in keys {
            guard let chunk = chunks[key] else { continue }
            let lo = max(from, key << Self.chunkShift) & (Self.chunkSlots - 1)
            let hiIndex = min(to, (key + 1) << Self.chunkShift)
            let hi = hiIndex - (key << Self.chunkShift)
            for slot in lo..<hi where chunk.slots[slot] != 0 {
                freed.append(chunk.slots[slot])
                chunk.slots[slot] = 0
                chunk.used -= 1
                held -= 1
            }
            if chunk.used == 0 { chunks[key] = nil }
        }
    }

    /// Empties the whole map and returns the pages it held (a file's last close or eviction):
    /// visits only existing chunks, and each only up to its last used slot.
    mutating func removeAll(into freed: inout [UInt32]) {
        guard count > 0 else { return }
        noteChanged(0, Int.max >> 1)
        freed.reserveCapacity(freed.count + count)
        for chunk in chunks.values {
            var left = chunk.used
            var slot = 0
            while left > 0 {
                let page = chunk.slots[slot]
                if page != 0 {
                    freed.append(page)
                    left -= 1
                }
                slot += 1
            }
        }
        chunks.removeAll()
        held = 0
    }

    /// First page index >= `index` that holds data, if any.
    func nextData(from index: Int) -> Int? {
        let startKey = index >> Self.chunkShift
        var best: Int?
        for (key, chunk) in chunks where key >= startKey {
            let lo = key == startKey ? index & (Self.chunkSlots - 1) : 0
            for slot in lo..<Self.chunkSlots where chunk.slots[slot] != 0 {
                let found = (key << Self.chunkShift) + slot
                if best.map({ found < $0 }) ?? true { best = found }
                break
            }
        }
        return best
    }

    /// First page index >= `index` that is a hole, or `limit` when none is below it: the walk
    /// stops there, and skips full chunks whole. (Unbounded, the check of a 4 KiB write's own
    /// page walked a dense file to its end: 77% of the daemon's CPU in 4 KiB overwrites of a
    /// 256 MiB file, 2026-12-06.)
    func nextHole(from index: Int, before limit: Int = Int.max) -> Int {
        var i = index
        while i < limit {
            guard let chunk = chunks[i >> Self.chunkShift] else { return i }
            let chunkStart = (i >> Self.chunkShift) << Self.chunkShift
            if chunk.used < Self.chunkSlots {
                var slot = i & (Self.chunkSlots - 1)
                while slot < Self.chunkSlots {
                    if chunk.slots[slot] == 0 { return min(chunkStart + slot, limit) }
                    slot += 1
                }
            }
            i = chunkStart + Self.chunkSlots
        }
        return limit
    }
}
