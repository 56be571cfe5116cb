import CFuse
import Glibc
import SystemPackage

/// Where a FUSE request becomes a `FileSystem` call: one function per operation, the only code
/// that reads a request's arguments. Each decodes them into the file system's types, makes one
/// call, and answers through its `Reply`, which it must consume (see `Reply`).
enum FuseHandlers {
    // MARK: decoding

    static func name(_ cString: UnsafePointer<CChar>?) -> FileName {
        guard let cString else { return [] }
        return Array(UnsafeRawBufferPointer(start: cString, count: strlen(cString)))
    }

    /// A missing name as nil: lookup answers it with a negative entry.
    static func missingAsNil<T>(_ body: () throws(Errno) -> T) throws(Errno) -> T? {
        do throws(Errno) { return try body() } catch where error == .noSuchFileOrDirectory { return nil }
    }

    static func changes(from st: stat, _ toSet: Int32) -> AttributeChanges {
        let set = { (flag: Int32) in toSet & flag != 0 }
        var c = AttributeChanges()
        if set(FUSE_SET_ATTR_MODE) { c.mode = st.st_mode }
        if set(FUSE_SET_ATTR_UID) { c.uid = st.st_uid }
        if set(FUSE_SET_ATTR_GID) { c.gid = st.st_gid }
        if set(FUSE_SET_ATTR_SIZE) { c.size = Int64(st.st_size) }
        if set(FUSE_SET_ATTR_ATIME_NOW) { c.atime = .now } else if set(FUSE_SET_ATTR_ATIME) { c.atime = .set(st.st_atim) }
        if set(FUSE_SET_ATTR_MTIME_NOW) { c.mtime = .now } else if set(FUSE_SET_ATTR_MTIME) { c.mtime = .set(st.st_mtim) }
        if set(FUSE_SET_ATTR_CTIME) { c.ctime = st.st_ctim }
        return c
    }

    /// Direct I/O for every open file, or the page cache kept across opens (every change to the
    /// data comes through this kernel, so a cache stays valid).
    static func setCaching(_ session: FuseSession, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        if session.fileSystem.caching == .direct { cfuse_fi_set_direct_io(fi, 1) } else { cfuse_fi_set_keep_cache(fi, 1) }
    }

    // MARK: session

    static func initialize(_ session: FuseSession, _ conn: UnsafeMutablePointer<fuse_conn_info>) {
        let fs = session.fileSystem
        fs.resolveCaching(CacheModeChoice.resolve(fs.config.caching))
        // 1 MiB requests: fewer round trips for streams.
        conn.pointee.max_write = 1 << 20
        conn.pointee.max_readahead = 1 << 20
        conn.pointee.want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
        // Every change to the data comes through this kernel, which keeps its page cache right
        // (write-through, truncate, punch); a newer mtime seen in a getattr is our own write,
        // not a reason to drop the cache (auto_inval_data did so after every write).
        conn.pointee.want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
    }

    // MARK: names

    static func lookup(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?) {
        reply.lookup { () throws(Errno) in try missingAsNil { () throws(Errno) in try s.fileSystem.lookup(parent: InodeNumber(parent), name: Self.name(name)) } }
    }

    static func forget(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, count: UInt64) {
        s.fileSystem.forget(InodeNumber(ino), count: count)
        reply.none()
    }

    static func forgetMulti(_ s: FuseSession, _ reply: consuming Reply, count: Int, forgets: UnsafeMutablePointer<fuse_forget_data>?) {
        for forget in UnsafeBufferPointer(start: forgets, count: forgets == nil ? 0 : count) {
            s.fileSystem.forget(InodeNumber(forget.ino), count: forget.nlookup)
        }
        reply.none()
    }

    static func mknod(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?, mode: mode_t, rdev: dev_t) {
        let caller = reply.caller
        reply.entry { () throws(Errno) in
            try s.fileSystem.mknod(parent: InodeNumber(parent), name: Self.name(name), mode: FileMode(rawValue: mode), rdev: UInt64(rdev), caller: caller)
        }
    }

    static func mkdir(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?, mode: mode_t) {
        let caller = reply.caller
        reply.entry { () throws(Errno) in try s.fileSystem.mkdir(parent: InodeNumber(parent), name: Self.name(name), mode: FileMode(rawValue: mode), caller: caller) }
    }

    static func symlink(_ s: FuseSession, _ reply: consuming Reply, target: UnsafePointer<CChar>?, parent: fuse_ino_t, name: UnsafePointer<CChar>?) {
        let caller = reply.caller
        reply.entry { () throws(Errno) in try s.fileSystem.symlink(target: Self.name(target), parent: InodeNumber(parent), name: Self.name(name), caller: caller) }
    }

    static func link(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, newParent: fuse_ino_t, newName: UnsafePointer<CChar>?) {
        reply.entry { () throws(Errno) in try s.fileSystem.link(InodeNumber(ino), newParent: InodeNumber(newParent), newName: Self.name(newName)) }
    }

    static func unlink(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?) {
        reply.success { () throws(Errno) in try s.fileSystem.unlink(parent: InodeNumber(parent), name: Self.name(name)) }
    }

    static func rmdir(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?) {
        reply.success { () throws(Errno) in try s.fileSystem.rmdir(parent: InodeNumber(parent), name: Self.name(name)) }
    }

    static func rename(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?,
                       newParent: fuse_ino_t, newName: UnsafePointer<CChar>?, flags: UInt32) {
        reply.success { () throws(Errno) in
            try s.fileSystem.rename(parent: InodeNumber(parent), name: Self.name(name), newParent: InodeNumber(newParent),
                                    newName: Self.name(newName), flags: RenameFlags(rawValue: flags))
        }
    }

    static func readlink(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t) {
        reply.link { () throws(Errno) in try s.fileSystem.readlink(InodeNumber(ino)) }
    }

    // MARK: attributes

    static func getattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t) {
        reply.attributes { () throws(Errno) in try s.fileSystem.getattr(InodeNumber(ino)) }
    }

    static func setattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, attr: UnsafeMutablePointer<stat>?, toSet: Int32) {
        guard let attr else { return reply.error(.invalidArgument) }
        // With the kill-privilege handover, a setattr that sets nothing is the kernel's own
        // "clear setuid/setgid" (a chown to -1:-1, or the first write to a setuid file).
        let clears = reply.clearsSetID || (s.features.granted && toSet == 0), caller = reply.caller
        reply.attributes { () throws(Errno) in
            try s.fileSystem.setattr(InodeNumber(ino), changes(from: attr.pointee, toSet), caller: caller, clearSetIDAsked: clears)
        }
    }

    static func statfs(_ s: FuseSession, _ reply: consuming Reply) {
        reply.statfs(statvfs(s.fileSystem.usage()))
    }

    // MARK: files

    // Files keep open/release: an unlinked file's data must go at its last close, which only
    // release tells (FORGET comes later, and asynchronously).
    static func open(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard let fi else { return reply.error(.invalidArgument) }
        let caller = reply.caller, clears = reply.clearsSetID
        let outcome: OpenOutcome
        do throws(Errno) {
            outcome = try s.fileSystem.open(InodeNumber(ino), flags: OpenFlags(rawValue: fi.pointee.flags), caller: caller, clearSetIDAsked: clears)
        } catch {
            return reply.error(error)
        }
        if let backingID = passthroughID(s, InodeNumber(ino), outcome) {
            reply.openedPassthrough(backingID: backingID, handle: passthroughHandle, directIO: outcome.writes)
        } else {
            setCaching(s, fi)
            reply.opened(fi)
        }
        if outcome.modeChanged { s.invalidateAttributes(ino) }
    }

    /// The backing id the open passes through, registered with the kernel; nil for an ordinary
    /// open (none offered, or the kernel refused it: then the file system is told).
    private static func passthroughID(_ s: FuseSession, _ ino: InodeNumber, _ outcome: OpenOutcome) -> Int32? {
        guard let file = outcome.passthrough else { return nil }
        switch s.passthrough?.opened(ino, file: file) {
        case .success(let id):
            return id
        case .failure(let error):
            s.noteRefusedPassthrough(error)
            s.fileSystem.passthroughRefused(ino)
        case nil:
            s.fileSystem.passthroughRefused(ino)
        }
        return nil
    }

    static func create(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?, mode: mode_t,
                       fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard let fi else { return reply.error(.invalidArgument) }
        let caller = reply.caller
        setCaching(s, fi)
        reply.answer({ () throws(Errno) in
            try s.fileSystem.create(parent: InodeNumber(parent), name: Self.name(name), mode: FileMode(rawValue: mode), caller: caller)
        }, { $0.sendCreated($1, fi) })
    }

    static func read(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, size: Int, offset: off_t,
                     fi: UnsafeMutablePointer<fuse_file_info>?) {
        // The read request carries the file's open flags, with or without an open.
        let noatime = fi.map { OpenFlags(rawValue: $0.pointee.flags).noatime } ?? false
        reply.vectors { (send) throws(Errno) in try s.fileSystem.read(InodeNumber(ino), offset: Int64(offset), count: size, noatime: noatime, send) }
    }

    static func write(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, buf: UnsafePointer<CChar>?, size: Int,
                      offset: off_t, fi: UnsafeMutablePointer<fuse_file_info>?) {
        // A writeback of mapped pages (FUSE_WRITE_CACHE): older kernels take a short count there
        // as success and drop the rest, so it must store all or fail whole.
        let writeback = fi.map { cfuse_fi_writepage($0) != 0 } ?? false
        if writeback && s.fileSystem.caching == .direct { s.pageCacheDrops.noteWriteback(InodeNumber(ino)) }
        let caller = reply.caller, clears = reply.clearsSetID
        reply.answer({ () throws(Errno) in
            try s.fileSystem.write(InodeNumber(ino), offset: Int64(offset), data: UnsafeRawBufferPointer(start: buf, count: size),
                                   caller: caller, clearSetIDAsked: clears, wholeOrNothing: writeback)
        }, { r, result in
            r.sendWritten(result.written)
            if result.modeChanged { s.invalidateAttributes(ino) }
        })
    }

    /// The handle of opens the kernel serves through a backing file (others have 0).
    static let passthroughHandle: UInt64 = 1

    static func release(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, fi: UnsafeMutablePointer<fuse_file_info>?) {
        let passthrough = fi?.pointee.fh == passthroughHandle
        let last = s.fileSystem.release(InodeNumber(ino), passthrough: passthrough)
        if passthrough { s.passthrough?.released(InodeNumber(ino)) }
        reply.success()
        // After the reply (the kernel does not wait for a release) and outside the tree's lock:
        // the page cache a mapping left (PageCacheDrops says why).
        if last && s.pageCacheDrops.take(InodeNumber(ino)) { s.dropPageCache(ino) }
    }

    static func fallocate(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, mode: Int32, offset: off_t, length: off_t) {
        let caller = reply.caller
        reply.success { () throws(Errno) in
            try s.fileSystem.fallocate(InodeNumber(ino), mode: FallocateMode(rawValue: mode), offset: Int64(offset), length: Int64(length),
                                       caller: caller)
        }
    }

    static func lseek(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, offset: off_t, whence: Int32) {
        reply.position { () throws(Errno) in
            guard let whence = SeekWhence(rawValue: whence) else { throw .invalidArgument }
            return try s.fileSystem.seek(InodeNumber(ino), offset: Int64(offset), whence: whence)
        }
    }

    // MARK: directories

    static func readdir(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, size: Int, offset: off_t, plus: Bool) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(size, 1), alignment: 8)
        defer { buffer.deallocate() }
        let request = reply.request
        reply.answer({ () throws(Errno) in
            try listDirectory(s, InodeNumber(ino), offset: Int64(offset), plus: plus, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<size]), request)
        }, { $0.sendBytes(UnsafeRawBufferPointer(rebasing: buffer[..<$1])) })
    }

    /// Fills `buffer` with the entries from `offset` in the kernel's dirent layout; returns the
    /// bytes used. (libfuse 3.14 reads no request in fuse_add_direntry*; nil in tests.)
    private static func listDirectory(_ s: FuseSession, _ ino: InodeNumber, offset: Int64, plus: Bool,
                                      into buffer: UnsafeMutableRawBufferPointer, _ request: fuse_req_t?) throws(Errno) -> Int {
        let start = buffer.baseAddress?.assumingMemoryBound(to: CChar.self)
        var used = 0
        try s.fileSystem.readdir(ino, offset: offset, plus: plus) { entry in
            guard let start else { return false }
            let needed: Int = (entry.name + [0]).withUnsafeBufferPointer { nameBuf in
                nameBuf.withMemoryRebound(to: CChar.self) { n in
                    if plus, let attributes = entry.attributes {
                        var e = Reply.entryParameters(attributes)
                        return fuse_add_direntry_plus(request, start + used, buffer.count - used, n.baseAddress, &e, off_t(entry.nextOffset))
                    }
                    var st = stat()
                    st.st_ino = UInt(entry.ino.rawValue)
                    st.st_mode = UInt32(entry.type) << 12
                    return fuse_add_direntry(request, start + used, buffer.count - used, n.baseAddress, &st, off_t(entry.nextOffset))
                }
            }
            if needed > buffer.count - used { return false }
            used += needed
            return true
        }
        return used
    }

    // MARK: extended attributes

    static func setxattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, name: UnsafePointer<CChar>?,
                         value: UnsafePointer<CChar>?, size: Int, flags: Int32) {
        let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
        let caller = reply.caller
        reply.success { () throws(Errno) in try s.fileSystem.setxattr(InodeNumber(ino), name: Self.name(name), value: bytes, flags: XattrFlags(rawValue: flags), caller: caller) }
    }

    /// The root's status and request counts are the transport's to answer (`transportAttribute`).
    static func getxattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, name: UnsafePointer<CChar>?, size: Int) {
        reply.xattr(bufferSize: size) { () throws(Errno) in
            let ino = InodeNumber(ino), name = Self.name(name)
            if let answered = try s.transportAttribute(ino, name: name) { return answered }
            return try s.fileSystem.getxattr(ino, name: name)
        }
    }

    static func listxattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, size: Int) {
        reply.xattr(bufferSize: size) { () throws(Errno) in try s.fileSystem.listxattr(InodeNumber(ino)) }
    }

    static func removexattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, name: UnsafePointer<CChar>?) {
        let caller = reply.caller
        reply.success { () throws(Errno) in try s.fileSystem.removexattr(InodeNumber(ino), name: Self.name(name), caller: caller) }
    }
}

extension statvfs {
    /// statfs's answer: page-size blocks, NAME_MAX, and the totals only when limited.
    init(_ usage: FileSystemUsage) {
        self.init()
        f_bsize = UInt(PageSize.bytes)
        f_frsize = UInt(PageSize.bytes)
        f_blocks = UInt(usage.totalPages)
        f_bfree = UInt(usage.freePages)
        f_bavail = UInt(usage.freePages)
        f_files = UInt(usage.totalInodes)
        f_ffree = UInt(usage.freeInodes)
        f_favail = UInt(usage.freeInodes)
        f_namemax = UInt(FileSystem.nameMax)
    }
}
