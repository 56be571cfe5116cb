/// Where an inode lives: a slot per inode number, numbers reused after the kernel forgets them.
///
/// An array beats a hash map here on both counts that matter at a million files: 8 bytes a
/// slot instead of ~32, and no hashing on every request. A reused number gets a new generation,
/// so the kernel (and NFS export) never confuses the new inode with the old.
struct InodeTable {
    private var slots: [Inode?] = [nil]  // number 0 is never an inode
    /// Numbers free for reuse, with the generation their last inode had.
    private var freeNumbers: [(ino: InodeNumber, generation: UInt32)] = []
    private(set) var count = 0

    subscript(ino: InodeNumber) -> Inode? {
        ino.rawValue < UInt64(slots.count) ? slots[Int(ino.rawValue)] : nil
    }

    /// Stores the inode `make` builds for the next free number.
    mutating func insert(_ make: (InodeNumber) -> Inode) -> Inode {
        let ino: InodeNumber
        var generation: UInt32 = 1
        if let reused = freeNumbers.popLast() {
            ino = reused.ino
            generation = reused.generation &+ 1
        } else {
            ino = InodeNumber(rawValue: UInt64(slots.count))
            slots.append(nil)
        }
        let inode = make(ino)
        inode.generation = generation
        slots[Int(ino.rawValue)] = inode
        count += 1
        return inode
    }

    mutating func remove(_ ino: InodeNumber) {
        guard ino.rawValue < UInt64(slots.count), let inode = slots[Int(ino.rawValue)] else { return }
        slots[Int(ino.rawValue)] = nil
        freeNumbers.append((ino, inode.generation))
        count -= 1
    }

    /// Puts `inode` at its own number (a takeover rebuilding the table): the slot may be new,
    /// free for reuse (it is not free any more), or held by an older version of it (replaced).
    mutating func restore(_ inode: Inode) {
        let index = Int(inode.ino.rawValue)
        if index >= slots.count { slots.append(contentsOf: repeatElement(nil, count: index + 1 - slots.count)) }
        if slots[index] == nil {
            count += 1
            if let free = freeNumbers.lastIndex(where: { $0.ino == inode.ino }) { freeNumbers.remove(at: free) }
        }
        slots[index] = inode
    }

    /// Slots (number 0 included) and the free numbers with their last generations, as a
    /// checkpoint keeps them, so that a reused number still gets a new generation.
    var slotCount: Int { slots.count }
    var freeList: [(ino: InodeNumber, generation: UInt32)] {
        get { freeNumbers }
        set { freeNumbers = newValue }
    }

    /// Makes room for `count` slots (a checkpoint's table size; numbers past the last inode
    /// were given out once and are on the free list).
    mutating func reserveSlots(_ total: Int) {
        if total > slots.count { slots.append(contentsOf: repeatElement(nil, count: total - slots.count)) }
    }

    var all: [Inode] { slots.compactMap { $0 } }

    /// Each inode in number order, without building `all`'s array (a checkpoint at 1M files).
    func forEach<E: Error>(_ body: (Inode) throws(E) -> Void) throws(E) {
        for slot in slots { if let inode = slot { try body(inode) } }
    }

    mutating func removeAll() {
        slots = [nil]
        freeNumbers = []
        count = 0
    }
}
