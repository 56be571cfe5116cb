import CFuse
import Glibc
import SystemPackage

/// The tree itself: inode table, names, links, rename rules. Only `FileSystem` calls it, under
/// its lock. Errors are the errno tmpfs gives in the same case.
final class FileSystemCore {
    let config: FileSystemConfig
    let store: PageStore
    var inodes = InodeTable()
    /// Inode slots in use, counted as tmpfs does: one per inode plus one per extra hard link.
    var inodeSlots: Int64 = 1
    let maxPages: Int?
    /// Files with a backing file of their own (for the status attribute).
    var backingFiles = 0
    /// The state kept for a successor (docs/takeover.md); nil unless the mount asked for it.
    var keeping: StateKeeping?
    /// memcg=auto: files used by more than one cgroup, or hosted above their one user (the
    /// shared-charge check walks these only).
    var sharedInodes = Set<InodeNumber>()
    /// Files whose backing file has an ahead range (`BackingFile.aheadEnd`): few (appended to
    /// since their last close), walked by statfs to leave those pages out of the used blocks.
    var filesAhead = Set<InodeNumber>()

    /// size= in pages, rounded up (nil: no size=).
    private static func pageLimit(_ config: FileSystemConfig) -> Int? {
        config.maxBytes.map { Int(($0 + Int64(PageSize.bytes) - 1) / Int64(PageSize.bytes)) }
    }

    init(config: FileSystemConfig, store: PageStore) {
        self.config = config
        self.store = store
        maxPages = Self.pageLimit(config)
        let root = inodes.insert { ino in
            Inode(ino: ino, mode: ModeBits.directory | (config.rootMode & 0o7777),
                  uid: config.rootUid, gid: config.rootGid, now: .now)
        }
        root.nlink = 2
        root.payload = .directory(Directory(parent: root.ino))
        root.lookups = 1  // the kernel's reference to the root, never forgotten
    }

    /// A core over a tree rebuilt from kept state (a takeover): the counts that follow from the
    /// tree are computed again, the kernel's lookup counts are unknown and set high (FORGETs
    /// sent to the dead server are lost: an unlinked inode may then stay until unmount).
    init(config: FileSystemConfig, store: PageStore, restoring table: InodeTable) {
        self.config = config
        self.store = store
        maxPages = Self.pageLimit(config)
        inodes = table
        var slots: Int64 = 0
        var backed = 0
        var shared: [InodeNumber] = []
        var ahead: [InodeNumber] = []
        // In place, not through `all` (an array of every inode: at 1M files a pass cost ~60 ms).
        table.forEach { inode in
            inode.lookups = Self.lookupsAfterTakeover
            if inode.backing != nil { backed += 1 }
            if (inode.backing?.aheadEnd ?? 0) > 0 { ahead.append(inode.ino) }
            if inode.isDirectory { slots += 1 } else if inode.nlink > 0 { slots += Int64(inode.nlink) } else if inode.openCount > 0 { slots += 1 }
            // memcg=auto: as noteUser marks them (after the store's targets are adopted).
            if let first = inode.users.first, inode.users.count > 1 || store.targetKey(inode.chargeTarget) != first {
                shared.append(inode.ino)
            }
        }
        backingFiles += backed
        for ino in shared { sharedInodes.insert(ino) }
        for ino in ahead { filesAhead.insert(ino) }
        inodeSlots = slots
    }

    static let lookupsAfterTakeover: UInt64 = 1 << 40

    // MARK: lookup and lifetime

    func inode(_ ino: InodeNumber) throws(Errno) -> Inode {
        guard let inode = inodes[ino] else { throw .noSuchFileOrDirectory }
        return inode
    }

    func directory(_ ino: InodeNumber) throws(Errno) -> (Inode, Directory) {
        let inode = try inode(ino)
        guard let dir = inode.directory else { throw .notDirectory }
        return (inode, dir)
    }

    static func validate(_ name: FileName) throws(Errno) {
        if name.count > FileSystem.nameMax { throw .fileNameTooLong }
        if name.isEmpty || name.contains(0) || name.contains(UInt8(ascii: "/")) { throw .invalidArgument }
    }

    func lookup(parent: InodeNumber, name: FileName) throws(Errno) -> Attributes {
        let (dirInode, dir) = try directory(parent)
        if name.count > FileSystem.nameMax { throw .fileNameTooLong }
        let ino: InodeNumber
        if name == [UInt8(ascii: ".")] {
            ino = dirInode.ino
        } else if name == [UInt8(ascii: "."), UInt8(ascii: ".")] {
            ino = dir.parent
        } else {
            guard let found = dir.lookup(name) else { throw .noSuchFileOrDirectory }
            ino = found
        }
        let target = try inode(ino)
        target.lookups += 1
        return target.attributes
    }

    func forget(_ ino: InodeNumber, count: UInt64) {
        guard let inode = inodes[ino] else { return }
        // The kernel never forgets more than it looked up. If it claims to, the count is wrong
        // somewhere: say so, and drop what we have rather than wrap around and keep the inode
        // forever (stopping would lose every file of the mount).
        if count > inode.lookups {
            Log.line("forget of inode \(ino) by \(count) exceeds its \(inode.lookups) lookups")
        }
        inode.lookups -= min(count, inode.lookups)
        evictIfUnused(inode)
    }

    /// Frees an inode once no name and no kernel reference is left (an unlinked file stays
    /// readable through open handles until then).
    func evictIfUnused(_ inode: Inode) {
        guard inode.nlink == 0, inode.lookups == 0, inode.ino != FileSystem.rootIno else { return }
        inodes.remove(inode.ino)
        sharedInodes.remove(inode.ino)
        if inode.openCount > 0 { inodeSlots -= 1 }  // no release will come for it now
        releaseAllPages(of: inode)
        if inode.ownsTarget {
            inode.ownsTarget = false
            releaseIfUnused(inode.chargeTarget)
        }
    }

    func releaseAllPages(of inode: Inode) {
        if inode.backing != nil {
            dropBacking(of: inode)
        } else {
            guard inode.pages.count > 0 else { return }
            var freed: [UInt32] = []
            inode.pages.removeAll(into: &freed)
            store.activeTarget = inode.chargeTarget
            store.free(freed)
        }
        if inode.chargeTarget != 0 && store.pagesInUse(target: inode.chargeTarget) == 0 && !targetNamed(inode.chargeTarget) {
            store.releaseTarget(inode.chargeTarget)
        }
    }

    /// Bytes of data held by files, and bytes charged (data plus the store's reserve).
    func storedBytes() -> (used: Int64, charged: Int64) {
        (Int64((store.pagesInUse - pagesAhead) * PageSize.bytes), Int64(store.pagesCharged * PageSize.bytes))
    }

    func destroy() {
        for inode in inodes.all { releaseAllPages(of: inode) }
        store.trimReserve()
        store.deferPunches = false
        store.punchDeferred()
        inodes.removeAll()
    }

    // MARK: creating names

    private func reserveInodeSlot() throws(Errno) {
        if let max = config.maxInodes, inodeSlots >= max { throw .noSpace }
        inodeSlots += 1
    }

    func create(parent: InodeNumber, name: FileName, mode: FileMode, rdev: UInt64, target: [UInt8]?,
                caller: Caller) throws(Errno) -> Attributes {
        let (dirInode, dir) = try directory(parent)
        try Self.validate(name)
        if dirInode.nlink == 0 { throw .noSuchFileOrDirectory }  // parent was removed
        if dir.lookup(name) != nil { throw .fileExists }
        try reserveInodeSlot()
        let now = timespec.now
        var gid = caller.gid
        var newMode = mode.rawValue
        // A setgid directory hands its group down, and its setgid bit to subdirectories.
        if dirInode.mode & ModeBits.setgid != 0 {
            gid = dirInode.gid
            if newMode & ModeBits.typeMask == ModeBits.directory { newMode |= ModeBits.setgid }
        }
        let inode = inodes.insert { Inode(ino: $0, mode: newMode, uid: caller.uid, gid: gid, now: now) }
        inode.rdev = rdev
        inode.chargeTarget = dirInode.chargeTarget
        if inode.isDirectory {
            inode.nlink = 2
            inode.payload = .directory(Directory(parent: dirInode.ino))
            dirInode.nlink += 1
        } else if let target {
            inode.payload = .symlink(target)
            inode.size = Int64(target.count)
        }
        dir.insert(name, ino: inode.ino)
        dirInode.mtime = now
        dirInode.ctime = now
        inode.lookups += 1
        return inode.attributes
    }

    func mkdir(parent: InodeNumber, name: FileName, mode: FileMode, caller: Caller) throws(Errno) -> Attributes {
        try create(parent: parent, name: name, mode: FileMode(rawValue: mode.permissions | ModeBits.directory), rdev: 0,
                   target: nil, caller: caller)
    }

    func symlink(target: [UInt8], parent: InodeNumber, name: FileName, caller: Caller) throws(Errno) -> Attributes {
        try create(parent: parent, name: name, mode: FileMode(rawValue: ModeBits.symlink | 0o777), rdev: 0, target: target,
                   caller: caller)
    }

    /// create(2) with O_CREAT: a new regular file, opened.
    func createAndOpen(parent: InodeNumber, name: FileName, mode: FileMode, caller: Caller) throws(Errno) -> Attributes {
        let attributes = try create(parent: parent, name: name, mode: mode, rdev: 0, target: nil, caller: caller)
        try open(attributes.ino, flags: .readWrite, caller: caller, clearSetIDAsked: false)
        return attributes
    }

    func link(_ ino: InodeNumber, newParent: InodeNumber, newName: FileName) throws(Errno) -> Attributes {
        let inode = try inode(ino)
        let (dirInode, dir) = try directory(newParent)
        try Self.validate(newName)
        if inode.isDirectory { throw .notPermitted }
        if dirInode.nlink == 0 || inode.nlink == 0 { throw .noSuchFileOrDirectory }
        if dir.lookup(newName) != nil { throw .fileExists }
        try reserveInodeSlot()
        let now = timespec.now
        inode.nlink += 1
        inode.ctime = now
        dir.insert(newName, ino: inode.ino)
        dirInode.mtime = now
        dirInode.ctime = now
        inode.lookups += 1
        return inode.attributes
    }

    func readlink(_ ino: InodeNumber) throws(Errno) -> [UInt8] {
        let inode = try inode(ino)
        guard let target = inode.symlinkTarget else { throw .invalidArgument }
        return target
    }

    // MARK: removing names

    /// Drops one name of `victim` (the entry itself is removed by the caller).
    private func dropLink(_ victim: Inode, from dirInode: Inode, _ dir: Directory, now: timespec) {
        if victim.isDirectory {
            victim.nlink = 0
            dirInode.nlink -= 1
        } else {
            victim.nlink -= 1
        }
        victim.ctime = now
        // An extra link gives its slot back at once. The last name with no open handle gives back
        // the data and the inode's slot now, as on tmpfs, not when the kernel forgets the inode
        // (that FORGET is asynchronous and could come after the next write or create).
        if victim.nlink > 0 {
            inodeSlots -= 1
        } else if victim.openCount == 0 {
            inodeSlots -= 1
            releaseAllPages(of: victim)
        }
        evictIfUnused(victim)
    }

    /// Removes a name; returns the inode it named.
    @discardableResult
    func remove(parent: InodeNumber, name: FileName, directory wantDirectory: Bool) throws(Errno) -> InodeNumber {
        let (dirInode, dir) = try directory(parent)
        if name.count > FileSystem.nameMax { throw .fileNameTooLong }
        guard let ino = dir.lookup(name), let victim = inodes[ino] else { throw .noSuchFileOrDirectory }
        if wantDirectory {
            guard let victimDir = victim.directory else { throw .notDirectory }
            if !victimDir.isEmpty { throw .directoryNotEmpty }
        } else if victim.isDirectory {
            throw .isDirectory
        }
        let now = timespec.now
        dir.remove(name)
        dirInode.mtime = now
        dirInode.ctime = now
        dropLink(victim, from: dirInode, dir, now: now)
        return ino
    }

    /// True when `ino` is `ancestor` or lies below it.
    private func isWithin(_ ino: InodeNumber, _ ancestor: InodeNumber) -> Bool {
        var current = ino
        while true {
            if current == ancestor { return true }
            guard current != FileSystem.rootIno, let dir = inodes[current]?.directory else { return false }
            current = dir.parent
        }
    }

    func rename(parent: InodeNumber, name: FileName, newParent: InodeNumber, newName: FileName, flags: RenameFlags) throws(Errno) {
        let noReplace = flags.contains(.noReplace)
        let exchange = flags.contains(.exchange)
        // RENAME_WHITEOUT (overlayfs's) and unknown flags: EINVAL, as tmpfs without whiteouts.
        if !flags.subtracting([.noReplace, .exchange]).isEmpty || (noReplace && exchange) {
            throw .invalidArgument
        }
        let (fromInode, fromDir) = try directory(parent)
        let (toInode, toDir) = try directory(newParent)
        if name.count > FileSystem.nameMax || newName.count > FileSystem.nameMax { throw .fileNameTooLong }
        try Self.validate(newName)
        guard let ino = fromDir.lookup(name), let moving = inodes[ino] else { throw .noSuchFileOrDirectory }
        let existingIno = toDir.lookup(newName)
        let existing = existingIno.flatMap { inodes[$0] }
        let now = timespec.now

        if exchange {
            guard let existing else { throw .noSuchFileOrDirectory }
            if moving === existing { return }
            // Two targets would each have to take the other's pages: refused, as XFS refuses a
            // rename across project quota directories (mv copies, which charges the copy).
            if fromInode.chargeTarget != toInode.chargeTarget && !sharesCharges { throw Errno(rawValue: EXDEV) }
            // Neither may end up inside itself.
            if moving.isDirectory && isWithin(toInode.ino, moving.ino) { throw .invalidArgument }
            if existing.isDirectory && isWithin(fromInode.ino, existing.ino) { throw .invalidArgument }
            fromDir.replace(name, ino: existing.ino)
            toDir.replace(newName, ino: moving.ino)
            if fromInode !== toInode {
                if moving.isDirectory != existing.isDirectory {
                    let (gain, lose) = moving.isDirectory ? (toInode, fromInode) : (fromInode, toInode)
                    gain.nlink += 1
                    lose.nlink -= 1
                }
                moving.directory?.parent = toInode.ino
                existing.directory?.parent = fromInode.ino
            }
            for inode in [fromInode, toInode, moving, existing] { inode.ctime = now }
            fromInode.mtime = now
            toInode.mtime = now
            return
        }

        if let existing {
            if noReplace { throw .fileExists }
            if moving === existing { return }  // two names of one inode: nothing to do
            if moving.isDirectory {
                guard let existingDir = existing.directory else { throw .notDirectory }
                if !existingDir.isEmpty { throw .directoryNotEmpty }
            } else if existing.isDirectory {
                throw .isDirectory
            }
        }
        if moving.isDirectory && isWithin(toInode.ino, moving.ino) { throw .invalidArgument }
        // Into another target: the pages move with it (charged there first: ENOSPC moves nothing).
        // Under memcg=auto a file's host is who uses it, not where it is: nothing moves.
        if !sharesCharges && !moving.ownsTarget && moving.chargeTarget != toInode.chargeTarget {
            try retarget(moving, to: toInode.chargeTarget, backed: Errno(rawValue: EXDEV))
        }

        fromDir.remove(name)
        if let existing {
            toDir.replace(newName, ino: moving.ino)
            dropLink(existing, from: toInode, toDir, now: now)
        } else {
            toDir.insert(newName, ino: moving.ino)
        }
        if let movingDir = moving.directory, fromInode !== toInode {
            movingDir.parent = toInode.ino
            fromInode.nlink -= 1
            toInode.nlink += 1
        }
        moving.ctime = now
        fromInode.mtime = now
        fromInode.ctime = now
        toInode.mtime = now
        toInode.ctime = now
    }

    // MARK: attributes

    /// `clearSetIDAsked`: the kernel asked this truncate or chown to clear setuid/setgid.
    func setattr(_ ino: InodeNumber, _ changes: AttributeChanges, caller: Caller, clearSetIDAsked: Bool) throws(Errno) -> Attributes {
        let inode = try inode(ino)
        let clears = clearSetIDAsked || changes.size != nil || changes.uid != nil || changes.gid != nil
        // An explicit mode wins: it is a chmod, or an older kernel clearing the bits itself.
        if clears, changes.mode == nil {
            _ = clearSetID(inode, caller, kernelAsked: clearSetIDAsked)
        }
        let now = timespec.now
        if let size = changes.size {
            guard inode.isRegular else { throw inode.isDirectory ? .isDirectory : .invalidArgument }
            if size < 0 { throw .invalidArgument }
            if size != inode.size { try truncate(inode, to: size) }
            // tmpfs moves mtime on every truncate, to the same size too.
            inode.mtime = now
        }
        if let mode = changes.mode {
            inode.mode = (inode.mode & ModeBits.typeMask) | (mode & 0o7777)
        }
        if let uid = changes.uid {
            inode.uid = uid
        }
        if let gid = changes.gid {
            inode.gid = gid
        }
        switch changes.atime {
        case .now?: inode.atime = now
        case .set(let t)?: inode.atime = t
        case nil: break
        }
        switch changes.mtime {
        case .now?: inode.mtime = now
        case .set(let t)?: inode.mtime = t
        case nil: break
        }
        // Every SETATTR moves ctime, one that sets nothing too: chown(f, -1, -1) arrives as a
        // SETATTR with no attribute, and tmpfs moves ctime on it (the VFS's chown always carries
        // ATTR_CTIME; pjdfstest chown/00.t, a TODO there that tmpfs fails).
        inode.ctime = changes.ctime ?? now
        return inode.attributes
    }

    /// Returns true when O_TRUNC cleared setuid/setgid (see `clearSetID`).
    @discardableResult
    func open(_ ino: InodeNumber, flags: OpenFlags, caller: Caller, clearSetIDAsked: Bool) throws(Errno) -> Bool {
        let inode = try inode(ino)
        var modeChanged = false
        if flags.truncates, inode.isRegular, flags.mayWrite {
            modeChanged = clearSetID(inode, caller, kernelAsked: clearSetIDAsked)
            // Times move even when the file was empty already, as tmpfs's O_TRUNC does.
            try truncate(inode, to: 0)
            let now = timespec.now
            inode.mtime = now
            inode.ctime = now
        }
        // Reopening an unlinked file (through /proc/PID/fd) takes back the slot its last close
        // will give back.
        if inode.nlink == 0 && inode.openCount == 0 { inodeSlots += 1 }
        inode.openCount += 1
        return modeChanged
    }

    /// Whether that was the file's last open.
    @discardableResult
    func release(_ ino: InodeNumber) -> Bool {
        guard let inode = inodes[ino], inode.openCount > 0 else { return false }
        inode.openCount -= 1
        if inode.openCount == 0 && inode.nlink == 0 {
            inodeSlots -= 1
            releaseAllPages(of: inode)
        } else if inode.openCount == 0 {
            trimAhead(inode)
        }
        return inode.openCount == 0
    }

    // MARK: directories

    func readdir(_ ino: InodeNumber, offset: Int64, plus: Bool, _ body: (DirectoryEntry) -> Bool) throws(Errno) {
        let (dirInode, dir) = try directory(ino)
        if offset == 0 { touchAtime(dirInode) }
        func emit(_ name: FileName, _ inode: Inode, next: Int64, counted: Bool) -> Bool {
            let entry = DirectoryEntry(name: name, ino: inode.ino, type: inode.directoryEntryType,
                                       nextOffset: next, attributes: plus ? inode.attributes : nil)
            guard body(entry) else { return false }
            if plus && counted { inode.lookups += 1 }
            return true
        }
        if offset <= 0, !emit([UInt8(ascii: ".")], dirInode, next: 1, counted: false) { return }
        if offset <= 1, let parent = inodes[dir.parent],
           !emit([UInt8(ascii: "."), UInt8(ascii: ".")], parent, next: 2, counted: false) { return }
        dir.forEach(from: UInt64(max(offset, 2))) { entry in
            guard let inode = inodes[entry.ino] else { return true }
            return emit(entry.name, inode, next: Int64(entry.cookie + 1), counted: true)
        }
    }

    /// relatime, as tmpfs mounts by default: atime moves when it is older than mtime or ctime,
    /// or a day old.
    func touchAtime(_ inode: Inode) {
        if atimeIsStale(inode) { inode.atime = .now }
    }

    func touchAtime(_ ino: InodeNumber) {
        if let inode = inodes[ino] { touchAtime(inode) }
    }

    func atimeIsStale(_ ino: InodeNumber) -> Bool {
        inodes[ino].map(atimeIsStale) ?? false
    }

    func atimeIsStale(_ inode: Inode) -> Bool {
        guard !config.noatime else { return false }
        return inode.atime <= inode.mtime || inode.atime <= inode.ctime || timespec.now.tv_sec - inode.atime.tv_sec >= 86400
    }

    /// statfs's figures, as tmpfs gives them: no totals where nothing limits (size=0,
    /// nr_inodes=0); with memcg=, what can still be stored is bounded by the cgroup's headroom.
    /// Pages charged ahead of appends are not used blocks (tmpfs has none); size= still counts
    /// them (`pagesAllowed`): they are stored, and a write into them takes no room check.
    func usage() -> FileSystemUsage {
        let used = Int64(store.pagesInUse - pagesAhead)
        var total = maxPages.map { Int64($0) }
        if let headroom = store.availableBytes() {
            total = min(total ?? .max, used + max(0, headroom) / Int64(PageSize.bytes))
        }
        let freeInodes = config.maxInodes.map { max(0, $0 - inodeSlots) } ?? 0
        return FileSystemUsage(totalPages: total ?? 0, freePages: total.map { max(0, $0 - used) } ?? 0,
                               totalInodes: config.maxInodes ?? 0, freeInodes: freeInodes)
    }
}
