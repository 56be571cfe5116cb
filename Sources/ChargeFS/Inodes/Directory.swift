/// The entries of one directory, in insertion order, each with a cookie that never changes.
///
/// readdir resumes from a cookie, so an entry that stays in the directory is listed exactly once
/// however many entries are added or removed between two readdir calls. Removal leaves a tombstone
/// that a later compaction drops (cookies are kept, so positions found by binary search stay right).
final class Directory {
    struct Entry {
        var name: FileName
        var ino: InodeNumber
        var cookie: UInt64
    }

    private var entries: [Entry] = []
    private var index: [FileName: Int] = [:]
    private var tombstones = 0
    /// Cookies 0 and 1 are "." and ".." in readdir offsets.
    private var nextCookie: UInt64 = 2
    /// The parent directory's inode (itself for the root).
    var parent: InodeNumber

    init(parent: InodeNumber) { self.parent = parent }

    var isEmpty: Bool { index.isEmpty }

    func lookup(_ name: FileName) -> InodeNumber? {
        guard let i = index[name] else { return nil }
        return entries[i].ino
    }

    func insert(_ name: FileName, ino: InodeNumber) {
        index[name] = entries.count
        entries.append(Entry(name: name, ino: ino, cookie: nextCookie))
        nextCookie += 1
    }

    /// Points an existing name at another inode (rename over an existing entry). The entry
    /// keeps its cookie, as the name never left the directory.
    func replace(_ name: FileName, ino: InodeNumber) {
        guard let i = index[name] else { return insert(name, ino: ino) }
        entries[i].ino = ino
    }

    func remove(_ name: FileName) {
        guard let i = index.removeValue(forKey: name) else { return }
        entries[i].ino = 0
        entries[i].name = []
        tombstones += 1
        if tombstones > 32 && tombstones > index.count { compact() }
    }

    /// The inode `name` names and the cookie it is listed under (one lookup), nil when it is
    /// not in the directory.
    func entry(named name: FileName) -> (ino: InodeNumber, cookie: UInt64)? {
        guard let i = index[name] else { return nil }
        return (entries[i].ino, entries[i].cookie)
    }

    /// The entry added last (a tombstone if it was removed since): what a create just made, so
    /// that recording it needs no second lookup of its name.
    var newest: Entry? { entries.last }

    /// Puts `name` at `ino` with the cookie it had (a takeover replaying a change): replaced in
    /// place when the name is there, else appended (cookies only grow, so order is kept).
    func restore(_ name: FileName, ino: InodeNumber, cookie: UInt64) {
        if let i = index[name] {
            if entries[i].cookie == cookie {
                entries[i].ino = ino
                return
            }
            remove(name)  // removed and made again since: listed again, under its new cookie
        }
        index[name] = entries.count
        entries.append(Entry(name: name, ino: ino, cookie: cookie))
        nextCookie = max(nextCookie, cookie + 1)
    }

    /// The next cookie, for a checkpoint; and its restore.
    var cookieCounter: UInt64 {
        get { nextCookie }
        set { nextCookie = max(nextCookie, newValue) }
    }

    /// Live entries in cookie order.
    var liveEntries: [Entry] { entries.filter { $0.ino != 0 } }

    /// How many live entries there are (without `liveEntries`' copy).
    var liveCount: Int { index.count }

    private func compact() {
        entries.removeAll { $0.ino == 0 }
        tombstones = 0
        index.removeAll(keepingCapacity: true)
        for (i, e) in entries.enumerated() { index[e.name] = i }
    }

    /// Calls `body` with each live entry whose cookie is >= `cookie`, in cookie order, until it
    /// returns false. The offset to resume after an entry is its cookie + 1.
    func forEach(from cookie: UInt64, _ body: (Entry) -> Bool) {
        var lo = 0
        var hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].cookie < cookie { lo = mid + 1 } else { hi = mid }
        }
        var i = lo
        while i < entries.count {
            let e = entries[i]
            if e.ino != 0 && !body(e) { return }
            i += 1
        }
    }
}
