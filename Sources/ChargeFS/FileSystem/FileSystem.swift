import Glibc
import SystemPackage

/// Who asks: the kernel tells us the uid/gid of the process behind each request.
public struct Caller: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups, asked for only when needed (reading them costs a /proc read).
    public var supplementaryGroups: @Sendable () -> [UInt32]
    public init(uid: UInt32, gid: UInt32, supplementaryGroups: @escaping @Sendable () -> [UInt32] = { [] }) {
        self.uid = uid
        self.gid = gid
        self.supplementaryGroups = supplementaryGroups
    }
    public static let root = Caller(uid: 0, gid: 0)

    func isMember(_ group: UInt32) -> Bool {
        gid == group || supplementaryGroups().contains(group)
    }
}

/// tmpfs's mount-time settings.
public struct FileSystemConfig: Sendable {
    /// size=: bytes of data, nil for unlimited.
    public var maxBytes: Int64?
    /// nr_inodes=, nil for unlimited.
    public var maxInodes: Int64?
    public var rootMode: UInt32 = 0o1777
    public var rootUid: UInt32 = 0
    public var rootGid: UInt32 = 0
    /// noatime: reads never update atime.
    public var noatime = false
    public var caching = FileCaching.automatic
    public init() {}
}

/// How read(2) and write(2) reach a file's data.
public enum FileCaching: String, Sendable {
    /// Straight to chargefsd (FOPEN_DIRECT_IO): no FUSE page cache, whose pages the kernel would
    /// charge to whichever cgroup reads or writes, and one round trip fewer per cached write (the
    /// kernel's getxattr before it). Mappings still go through the page cache, kept coherent.
    case direct
    /// Through the kernel's page cache, kept across opens: re-reads cost no round trip.
    case page
    /// `direct` if the kernel can still map such files shared (FUSE_DIRECT_IO_ALLOW_MMAP,
    /// Linux 6.6), else `page`. The default.
    case automatic
}

/// Attribute changes asked by setattr; nil fields stay.
public struct AttributeChanges: Sendable {
    public enum Time: Sendable {
        case now
        case set(timespec)
    }
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: Int64?
    public var atime: Time?
    public var mtime: Time?
    public var ctime: timespec?
    public init() {}
}

/// Figures for statfs.
public struct FileSystemUsage: Sendable {
    public var totalPages: Int64
    public var freePages: Int64
    public var totalInodes: Int64
    public var freeInodes: Int64
}

/// One readdir entry.
public struct DirectoryEntry {
    public var name: FileName
    public var ino: UInt64
    public var type: UInt8
    /// Offset to pass to resume after this entry.
    public var nextOffset: Int64
    /// Full attributes, for readdirplus (which counts as a lookup).
    public var attributes: Attributes?
}

/// The file system: inodes, names, data. Every operation is a method that takes plain values and
/// returns attributes or an errno, so it runs the same in-process (tests) and behind FUSE.
///
/// One reader-writer lock guards the whole tree: reads of data and attributes share it, anything
/// that changes the tree or a count holds it alone. Lock order: this lock, then the charger's.
public final class FileSystem: Sendable {
    public static let rootIno: UInt64 = 1
    public static let nameMax = 255
    public static let xattrSizeMax = 65536
    public static let xattrNameMax = 255
    /// The root's read-only status attribute (getfattr -n user.chargefs.status MOUNTPOINT).
    public static let statusXattr: FileName = Array("user.chargefs.status".utf8)

    private let core: ReadWriteLock<FileSystemCore>
    public let config: FileSystemConfig

    public init(config: FileSystemConfig, store: sending PageStore) {
        self.config = config
        core = ReadWriteLock(FileSystemCore(config: config, store: store))
    }

    @inline(__always)
    private func locked<T>(_ body: (FileSystemCore) throws(Errno) -> T) throws(Errno) -> T {
        try core.withWriteLock(body)
    }

    @inline(__always)
    private func shared<T>(_ body: (FileSystemCore) throws(Errno) -> T) throws(Errno) -> T {
        try core.withReadLock(body)
    }

    public func lookup(parent: UInt64, name: FileName) throws(Errno) -> Attributes {
        try locked { c throws(Errno) in try c.lookup(parent: parent, name: name) }
    }
    public func forget(_ ino: UInt64, count: UInt64) {
        core.withWriteLock { c in c.forget(ino, count: count) }
    }
    /// What `cache=` came to (the default depends on the kernel), for the status xattr.
    public func noteCachingInEffect(_ caching: FileCaching) {
        core.withWriteLock { c in c.cachingInEffect = caching }
    }
    public func getattr(_ ino: UInt64) throws(Errno) -> Attributes {
        try shared { c throws(Errno) in try c.inode(ino).attributes }
    }
    /// `clearSetIDAsked`: the kernel asked this truncate or chown to clear setuid/setgid.
    public func setattr(_ ino: UInt64, _ changes: AttributeChanges, caller: Caller = .root,
                        clearSetIDAsked: Bool = false) throws(Errno) -> Attributes {
        try locked { c throws(Errno) in
            let clears = clearSetIDAsked || changes.size != nil || changes.uid != nil || changes.gid != nil
            // An explicit mode wins: it is a chmod, or an older kernel clearing the bits itself.
            if clears, changes.mode == nil, let inode = try? c.inode(ino) {
                _ = c.clearSetID(inode, caller, kernelAsked: clearSetIDAsked)
            }
            return try c.setattr(ino, changes)
        }
    }
    public func readlink(_ ino: UInt64) throws(Errno) -> [UInt8] {
        try shared { c throws(Errno) in try c.readlink(ino) }
    }
    public func mknod(parent: UInt64, name: FileName, mode: UInt32, rdev: UInt64, caller: Caller) throws(Errno) -> Attributes {
        try locked { c throws(Errno) in try c.create(parent: parent, name: name, mode: mode, rdev: rdev, target: nil, caller: caller) }
    }
    public func mkdir(parent: UInt64, name: FileName, mode: UInt32, caller: Caller) throws(Errno) -> Attributes {
        let m = (mode & 0o7777) | ModeBits.directory
        return try locked { c throws(Errno) in try c.create(parent: parent, name: name, mode: m, rdev: 0, target: nil, caller: caller) }
    }
    public func symlink(target: [UInt8], parent: UInt64, name: FileName, caller: Caller) throws(Errno) -> Attributes {
        try locked { c throws(Errno) in
            try c.create(parent: parent, name: name, mode: ModeBits.symlink | 0o777, rdev: 0, target: target, caller: caller)
        }
    }
    public func link(_ ino: UInt64, newParent: UInt64, newName: FileName) throws(Errno) -> Attributes {
        try locked { c throws(Errno) in try c.link(ino, newParent: newParent, newName: newName) }
    }
    public func unlink(parent: UInt64, name: FileName) throws(Errno) {
        try locked { c throws(Errno) in try c.remove(parent: parent, name: name, directory: false) }
    }
    public func rmdir(parent: UInt64, name: FileName) throws(Errno) {
        try locked { c throws(Errno) in try c.remove(parent: parent, name: name, directory: true) }
    }
    public func rename(parent: UInt64, name: FileName, newParent: UInt64, newName: FileName, flags: UInt32) throws(Errno) {
        try locked { c throws(Errno) in try c.rename(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags) }
    }
    /// Open of an existing inode; handles O_TRUNC (the kernel passes it with atomic_o_trunc).
    /// Returns true when truncating cleared setuid/setgid (the kernel's cached mode is then stale).
    @discardableResult
    public func open(_ ino: UInt64, flags: Int32, caller: Caller = .root, clearSetIDAsked: Bool = false) throws(Errno) -> Bool {
        try locked { c throws(Errno) in try c.open(ino, flags: flags, caller: caller, clearSetIDAsked: clearSetIDAsked) }
    }
    /// Creates a regular file and opens it (create(2) with O_CREAT).
    public func create(parent: UInt64, name: FileName, mode: UInt32, caller: Caller) throws(Errno) -> Attributes {
        try locked { c throws(Errno) in
            let attributes = try c.create(parent: parent, name: name, mode: mode, rdev: 0, target: nil, caller: caller)
            try c.open(attributes.ino, flags: O_RDWR)
            return attributes
        }
    }
    /// The last close of one open (or create) handle.
    public func release(_ ino: UInt64) {
        core.withWriteLock { c in c.release(ino) }
    }
    /// Reads into the caller's hands: `body` sees the bytes as iovecs pointing into the store
    /// (and a shared zero page for holes), while the lock is held, so no page can be freed or
    /// reused under it. An empty list means end of file.
    public func read(_ ino: UInt64, offset: Int64, count: Int, noatime: Bool = false,
                     _ body: (UnsafeBufferPointer<iovec>) -> Void) throws(Errno) {
        // relatime moves atime rarely (after a change, or daily): then the read runs under the
        // exclusive lock and atime moves before the reply, so a stat right after sees it.
        let done = try core.withReadLock { (c: FileSystemCore) throws(Errno) -> Bool in
            if !noatime && c.atimeIsStale(ino) { return false }
            try c.read(ino, offset: offset, count: count, body)
            return true
        }
        if done { return }
        try core.withWriteLock { (c: FileSystemCore) throws(Errno) -> Void in
            c.touchAtime(ino)
            try c.read(ino, offset: offset, count: count, body)
        }
    }
    /// Writes; returns the bytes stored (fewer than given when only part fits), and whether the
    /// write cleared setuid/setgid (the kernel's cached mode is then stale). `clearSetIDAsked`:
    /// the kernel flagged the write (its caller lacks CAP_FSETID).
    public func write(_ ino: UInt64, offset: Int64, data: UnsafeRawBufferPointer, caller: Caller = .root,
                      clearSetIDAsked: Bool = false) throws(Errno) -> (written: Int, modeChanged: Bool) {
        try core.withWriteLock { (c: FileSystemCore) throws(Errno) -> (written: Int, modeChanged: Bool) in
            let written = try c.write(ino, offset: offset, data: data)
            let inode = try c.inode(ino)
            // A written file loses its capabilities, as on tmpfs. The kernel removes them itself
            // before a cached write, but a direct-I/O write reaches us without that.
            c.removeFileCapabilities(inode)
            return (written, c.clearSetID(inode, caller, kernelAsked: clearSetIDAsked))
        }
    }
    public func fallocate(_ ino: UInt64, mode: Int32, offset: Int64, length: Int64) throws(Errno) {
        try locked { c throws(Errno) in try c.fallocate(ino, mode: mode, offset: offset, length: length) }
    }
    /// SEEK_DATA and SEEK_HOLE.
    public func seek(_ ino: UInt64, offset: Int64, whence: Int32) throws(Errno) -> Int64 {
        try shared { c throws(Errno) in try c.seek(ino, offset: offset, whence: whence) }
    }
    /// Lists from `offset`; `body` returns false when its buffer is full (the entry it was given
    /// is then not counted). With `plus`, each listed entry but "." and ".." counts as a lookup.
    public func readdir(_ ino: UInt64, offset: Int64, plus: Bool, _ body: (DirectoryEntry) -> Bool) throws(Errno) {
        try core.withWriteLock { (c: FileSystemCore) throws(Errno) -> Void in try c.readdir(ino, offset: offset, plus: plus, body) }
    }
    public func usage() -> FileSystemUsage {
        core.withReadLock { c in c.usage() }
    }
    public func setxattr(_ ino: UInt64, name: FileName, value: [UInt8], flags: Int32) throws(Errno) {
        try locked { c throws(Errno) in try c.setxattr(ino, name: name, value: value, flags: flags) }
    }
    public func getxattr(_ ino: UInt64, name: FileName) throws(Errno) -> [UInt8] {
        try shared { c throws(Errno) in try c.getxattr(ino, name: name) }
    }
    /// Names, each NUL-terminated, as listxattr returns them.
    public func listxattr(_ ino: UInt64) throws(Errno) -> [UInt8] {
        try shared { c throws(Errno) in try c.listxattr(ino) }
    }
    public func removexattr(_ ino: UInt64, name: FileName) throws(Errno) {
        try locked { c throws(Errno) in try c.removexattr(ino, name: name) }
    }
    /// Bytes of data held by files, and bytes charged (data plus the store's reserve).
    public func storedBytes() -> (used: Int64, charged: Int64) {
        core.withWriteLock { c in
            (Int64(c.store.pagesInUse * PageStore.pageSize), Int64(c.store.pagesCharged * PageStore.pageSize))
        }
    }
    /// Frees everything (unmount): every page goes back to the store and is uncharged.
    public func destroy() {
        core.withWriteLock { c in c.destroy() }
    }
    /// Live inodes, for tests that look for leaks.
    public var inodeCount: Int { core.withReadLock { c in c.inodes.count } }
}
