import Glibc

/// One file, directory, symlink or special node. It lives in the `InodeTable` until both its
/// link count and the kernel's lookup count are zero.
final class Inode {
    let ino: InodeNumber
    /// Type and permission bits, as st_mode.
    var mode: UInt32
    var uid: UInt32
    var gid: UInt32
    var nlink: UInt32
    /// Device number of a device node.
    private var rdevEncoded: UInt32 = 0
    /// Bumped each time the inode number is reused.
    var generation: UInt32 = 1
    /// Open handles; an unlinked file's data is freed when the last one closes.
    var openCount: UInt32 = 0
    /// `chargeTarget` (the low 31 bits) and `ownsTarget` (the top bit), 32 bits beside the other
    /// 32-bit fields (every inode has them).
    private var targetBits: UInt32 = 0
    var size: Int64 = 0
    var atime: timespec
    var mtime: timespec
    var ctime: timespec
    /// References the kernel holds (lookup replies minus forgets).
    var lookups: UInt64 = 0

    /// Data pages of a regular file: arena pages, or, for a large file with a backing file of
    /// its own, `PageMap.inBackingFile` marks.
    var pages = PageMap()
    /// Opens the kernel reads through `backing` itself (FOPEN_PASSTHROUGH). While there are any,
    /// the backing file never has a hole below its size: a reader's page fault on a hole would
    /// allocate a page charged to the reader. (Right after `pages`, whose 20 bytes it fills to 24.)
    var passthroughOpens: UInt32 = 0
    /// A large file's own backing file (FUSE passthrough reads it); nil while its data is in
    /// the arena.
    var backing: BackingFile?
    /// What only some kinds of inode have; one field, since an inode is at most one kind.
    enum Payload {
        case none
        case directory(Directory)
        case symlink([UInt8])
    }
    var payload = Payload.none
    /// What few inodes have, in one box that an inode without any pays one pointer for. (An
    /// inode is 168 bytes, a 176-byte heap block, as before the fields for takeover and targets
    /// came: `InodeLayoutTests`.)
    private final class Rare {
        var xattrs: [[UInt8]: [UInt8]]?
        var users: [String] = []
        var passthroughID: Int32 = 0
    }
    private var rare: Rare?
    private var rareBox: Rare {
        if let rare { return rare }
        let box = Rare()
        rare = box
        return box
    }
    /// Extended attributes; nil until the first one is set.
    var xattrs: [[UInt8]: [UInt8]]? {
        get { rare?.xattrs }
        set { if newValue != nil || rare != nil { rareBox.xattrs = newValue } }
        _modify { let box = rareBox; yield &box.xattrs }
    }
    /// The kernel's backing id (FUSE_DEV_IOC_BACKING_OPEN) the passthrough opens name, 0 when
    /// none is registered or state is not kept: the Bridge's registry owns the registration; this
    /// copy is kept for a successor, since ids belong to the connection and outlive the server.
    var passthroughID: Int32 {
        get { rare?.passthroughID ?? 0 }
        set { if newValue != 0 || rare != nil { rareBox.passthroughID = newValue } }
    }
    /// memcg=auto: the cgroups (inside the scope) that have opened this file, first the one
    /// that created it; they only grow (FileSystemCore+Shares: never unshared).
    var users: [String] {
        get { rare?.users ?? [] }
        set { if !newValue.isEmpty || rare != nil { rareBox.users = newValue } }
        _modify { let box = rareBox; yield &box.users }
    }
    /// The page store's target this inode's pages are charged to (0: the mount's): a directory's
    /// own (user.chargefs.memcg) or inherited from its parent when it was made or moved. An
    /// index into the store's table of targets, far below 2^31.
    var chargeTarget: Int {
        get { Int(targetBits & Self.indexBits) }
        set { targetBits = (targetBits & ~Self.indexBits) | (UInt32(truncatingIfNeeded: newValue) & Self.indexBits) }
    }
    /// A directory whose target is its own rather than its parent's.
    var ownsTarget: Bool {
        get { targetBits & ~Self.indexBits != 0 }
        set { targetBits = newValue ? targetBits | ~Self.indexBits : targetBits & Self.indexBits }
    }
    private static let indexBits: UInt32 = 0x7fff_ffff

    init(ino: InodeNumber, mode: UInt32, uid: UInt32, gid: UInt32, now: timespec) {
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 1
        self.atime = now
        self.mtime = now
        self.ctime = now
    }

    /// Entries of a directory.
    var directory: Directory? {
        if case .directory(let d) = payload { return d }
        return nil
    }

    /// Target of a symlink.
    var symlinkTarget: [UInt8]? {
        if case .symlink(let t) = payload { return t }
        return nil
    }

    /// FUSE carries device numbers in the kernel's 32-bit encoding both ways; kept as given.
    var rdev: UInt64 {
        get { UInt64(rdevEncoded) }
        set { rdevEncoded = UInt32(truncatingIfNeeded: newValue) }
    }

    var fileType: UInt32 { mode & ModeBits.typeMask }
    var isDirectory: Bool { fileType == ModeBits.directory }
    var isRegular: Bool { fileType == ModeBits.regular }

    /// d_type for readdir.
    var directoryEntryType: UInt8 { UInt8(truncatingIfNeeded: fileType >> 12) }

    /// Pages charged ahead of appends that lie past the end (`BackingFile.aheadEnd`): stored
    /// and charged, but not the file's yet. tmpfs has no such pages, so st_blocks and statfs
    /// leave them out (an fsx run compared op for op with tmpfs saw st_blocks +384). Nothing of
    /// the file's own lies in that range: writes, truncates and fallocates that reach it end
    /// or shorten it first (FileSystemCore+Backing). One nil check for files without one; a
    /// look at each page of the range (about one batch) for those with one (`nextData` would
    /// visit every chunk of the map).
    var pagesAhead: Int {
        guard let backing, backing.aheadEnd > 0 else { return 0 }
        let from = PageSize.covering(size)
        guard backing.aheadEnd > from else { return 0 }
        var held = 0
        for index in from..<backing.aheadEnd where pages.page(at: index) != 0 { held += 1 }
        return held
    }

    var attributes: Attributes {
        Attributes(
            ino: ino, generation: generation, mode: mode, nlink: nlink, uid: uid, gid: gid, rdev: rdev, size: size,
            blocks: Int64(pages.count - pagesAhead) * Int64(PageSize.bytes / 512),
            atime: atime, mtime: mtime, ctime: ctime)
    }
}
