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

    static func caller(_ reply: borrowing Reply) -> Caller {
        guard let ctx = fuse_req_ctx(reply.request) else { return .root }
        nonisolated(unsafe) let request = reply.request
        return Caller(uid: ctx.pointee.uid, gid: ctx.pointee.gid) {
            // Valid only while the request is being handled, which is when the core asks.
            var groups = [gid_t](repeating: 0, count: 256)
            let n = fuse_req_getgroups(request, Int32(groups.count), &groups)
            return n > 0 ? Array(groups.prefix(min(Int(n), groups.count))) : []
        }
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
        do throws(Errno) {
            reply.entry(try s.fileSystem.lookup(parent: InodeNumber(parent), name: Self.name(name)))
        } catch where error == .noSuchFileOrDirectory {
            reply.noEntry()
        } catch {
            reply.error(error)
        }
    }

    static func forget(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, count: UInt64) {
        s.fileSystem.forget(InodeNumber(ino), count: count)
        reply.none()
    }

    static func forgetMulti(_ s: FuseSession, _ reply: consuming Reply, count: Int, forgets: UnsafeMutablePointer<fuse_forget_data>?) {
        if let forgets {
            for i in 0..<count { s.fileSystem.forget(InodeNumber(forgets[i].ino), count: forgets[i].nlookup) }
        }
        reply.none()
    }

    static func mknod(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?,
                      mode: mode_t, rdev: dev_t) {
        do throws(Errno) {
            reply.entry(try s.fileSystem.mknod(parent: InodeNumber(parent), name: Self.name(name), mode: FileMode(rawValue: mode),
                                               rdev: UInt64(rdev), caller: caller(reply)))
        } catch {
            reply.error(error)
        }
    }

    static func mkdir(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?, mode: mode_t) {
        do throws(Errno) {
            reply.entry(try s.fileSystem.mkdir(parent: InodeNumber(parent), name: Self.name(name), mode: FileMode(rawValue: mode), caller: caller(reply)))
        } catch {
            reply.error(error)
        }
    }

    static func symlink(_ s: FuseSession, _ reply: consuming Reply, target: UnsafePointer<CChar>?, parent: fuse_ino_t,
                        name: UnsafePointer<CChar>?) {
        do throws(Errno) {
            reply.entry(try s.fileSystem.symlink(target: Self.name(target), parent: InodeNumber(parent), name: Self.name(name),
                                                 caller: caller(reply)))
        } catch {
            reply.error(error)
        }
    }

    static func link(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, newParent: fuse_ino_t, newName: UnsafePointer<CChar>?) {
        do throws(Errno) {
            reply.entry(try s.fileSystem.link(InodeNumber(ino), newParent: InodeNumber(newParent), newName: Self.name(newName)))
        } catch {
            reply.error(error)
        }
    }

    static func unlink(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?) {
        do throws(Errno) {
            try s.fileSystem.unlink(parent: InodeNumber(parent), name: Self.name(name))
            reply.success()
        } catch {
            reply.error(error)
        }
    }

    static func rmdir(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?) {
        do throws(Errno) {
            try s.fileSystem.rmdir(parent: InodeNumber(parent), name: Self.name(name))
            reply.success()
        } catch {
            reply.error(error)
        }
    }

    static func rename(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?,
                       newParent: fuse_ino_t, newName: UnsafePointer<CChar>?, flags: UInt32) {
        do throws(Errno) {
            try s.fileSystem.rename(parent: InodeNumber(parent), name: Self.name(name), newParent: InodeNumber(newParent),
                                    newName: Self.name(newName), flags: RenameFlags(rawValue: flags))
            reply.success()
        } catch {
            reply.error(error)
        }
    }

    static func readlink(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t) {
        do throws(Errno) {
            reply.link(target: try s.fileSystem.readlink(InodeNumber(ino)))
        } catch {
            reply.error(error)
        }
    }

    // MARK: attributes

    static func getattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t) {
        do throws(Errno) {
            reply.attributes(try s.fileSystem.getattr(InodeNumber(ino)))
        } catch {
            reply.error(error)
        }
    }

    static func setattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, attr: UnsafeMutablePointer<stat>?, toSet: Int32) {
        guard let attr else { return reply.error(.invalidArgument) }
        // With the kill-privilege handover, a setattr that sets nothing is the kernel's own
        // "clear setuid/setgid" (a chown to -1:-1, or the first write to a setuid file).
        let clears = FuseKernelFeatures.requestClearsSetID || (s.features.granted && toSet == 0)
        do throws(Errno) {
            reply.attributes(try s.fileSystem.setattr(InodeNumber(ino), changes(from: attr.pointee, toSet), caller: caller(reply),
                                                      clearSetIDAsked: clears))
        } catch {
            reply.error(error)
        }
    }

    static func statfs(_ s: FuseSession, _ reply: consuming Reply) {
        let usage = s.fileSystem.usage()
        var st = statvfs()
        st.f_bsize = UInt(PageStore.pageSize)
        st.f_frsize = UInt(PageStore.pageSize)
        st.f_blocks = UInt(usage.totalPages)
        st.f_bfree = UInt(usage.freePages)
        st.f_bavail = UInt(usage.freePages)
        st.f_files = UInt(usage.totalInodes)
        st.f_ffree = UInt(usage.freeInodes)
        st.f_favail = UInt(usage.freeInodes)
        st.f_namemax = UInt(FileSystem.nameMax)
        reply.statfs(st)
    }

    // MARK: files

    // Files keep open/release: an unlinked file's data must go at its last close, which only
    // release tells (FORGET comes later, and asynchronously).
    static func open(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard let fi else { return reply.error(.invalidArgument) }
        do throws(Errno) {
            let outcome = try s.fileSystem.open(InodeNumber(ino), flags: OpenFlags(rawValue: fi.pointee.flags),
                                                caller: caller(reply), clearSetIDAsked: FuseKernelFeatures.requestClearsSetID)
            if let file = outcome.passthrough {
                switch s.passthroughDevice.map({ PassthroughRegistration.id(for: file, device: $0) }) {
                case .success(let id):
                    reply.openedPassthrough(backingID: id, handle: passthroughHandle, directIO: outcome.writes)
                    if outcome.modeChanged { s.invalidateAttributes(ino) }
                    return
                case .failure(let error):
                    s.noteRefusedPassthrough(error)
                    s.fileSystem.passthroughRefused(InodeNumber(ino))
                case nil:
                    s.fileSystem.passthroughRefused(InodeNumber(ino))
                }
            }
            setCaching(s, fi)
            reply.opened(fi)
            if outcome.modeChanged { s.invalidateAttributes(ino) }
        } catch {
            reply.error(error)
        }
    }

    static func create(_ s: FuseSession, _ reply: consuming Reply, parent: fuse_ino_t, name: UnsafePointer<CChar>?, mode: mode_t,
                       fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard let fi else { return reply.error(.invalidArgument) }
        do throws(Errno) {
            let attributes = try s.fileSystem.create(parent: InodeNumber(parent), name: Self.name(name), mode: FileMode(rawValue: mode), caller: caller(reply))
            setCaching(s, fi)
            reply.created(attributes, fi)
        } catch {
            reply.error(error)
        }
    }

    static func read(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, size: Int, offset: off_t,
                     fi: UnsafeMutablePointer<fuse_file_info>?) {
        // The read request carries the file's open flags, with or without an open.
        let noatime = fi.map { OpenFlags(rawValue: $0.pointee.flags).noatime } ?? false
        reply.vectors { (send) throws(Errno) in
            try s.fileSystem.read(InodeNumber(ino), offset: Int64(offset), count: size, noatime: noatime, send)
        }
    }

    static func write(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, buf: UnsafePointer<CChar>?, size: Int,
                      offset: off_t, fi: UnsafeMutablePointer<fuse_file_info>?) {
        // A writeback of mapped pages (FUSE_WRITE_CACHE): older kernels take a short count there
        // as success and drop the rest, so it must store all or fail whole.
        let writeback = fi.map { cfuse_fi_writepage($0) != 0 } ?? false
        do throws(Errno) {
            let result = try s.fileSystem.write(InodeNumber(ino), offset: Int64(offset), data: UnsafeRawBufferPointer(start: buf, count: size),
                                                caller: caller(reply), clearSetIDAsked: FuseKernelFeatures.requestClearsSetID,
                                                wholeOrNothing: writeback)
            reply.written(result.written)
            if result.modeChanged { s.invalidateAttributes(ino) }
        } catch {
            reply.error(error)
        }
    }

    /// The handle of opens the kernel serves through a backing file (others have 0).
    static let passthroughHandle: UInt64 = 1

    static func release(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, fi: UnsafeMutablePointer<fuse_file_info>?) {
        s.fileSystem.release(InodeNumber(ino), passthrough: fi?.pointee.fh == passthroughHandle)
        reply.success()
    }

    static func fallocate(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, mode: Int32, offset: off_t, length: off_t) {
        do throws(Errno) {
            try s.fileSystem.fallocate(InodeNumber(ino), mode: FallocateMode(rawValue: mode), offset: Int64(offset), length: Int64(length))
            reply.success()
        } catch {
            reply.error(error)
        }
    }

    static func lseek(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, offset: off_t, whence: Int32) {
        guard let whence = SeekWhence(rawValue: whence) else { return reply.error(.invalidArgument) }
        do throws(Errno) {
            reply.position(try s.fileSystem.seek(InodeNumber(ino), offset: Int64(offset), whence: whence))
        } catch {
            reply.error(error)
        }
    }

    // MARK: directories

    static func readdir(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, size: Int, offset: off_t, plus: Bool) {
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
        defer { buffer.deallocate() }
        let req = reply.request
        var used = 0
        do throws(Errno) {
            try s.fileSystem.readdir(InodeNumber(ino), offset: Int64(offset), plus: plus) { entry in
                var cName = entry.name
                cName.append(0)
                let needed: Int = cName.withUnsafeBufferPointer { nameBuf in
                    nameBuf.withMemoryRebound(to: CChar.self) { n in
                        if plus, let attributes = entry.attributes {
                            var e = Reply.entryParameters(attributes)
                            return fuse_add_direntry_plus(req, buffer + used, size - used, n.baseAddress, &e, off_t(entry.nextOffset))
                        }
                        var st = stat()
                        st.st_ino = UInt(entry.ino.rawValue)
                        st.st_mode = UInt32(entry.type) << 12
                        return fuse_add_direntry(req, buffer + used, size - used, n.baseAddress, &st, off_t(entry.nextOffset))
                    }
                }
                if needed > size - used { return false }
                used += needed
                return true
            }
            reply.bytes(buffer, count: used)
        } catch {
            reply.error(error)
        }
    }

    // MARK: extended attributes

    static func setxattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, name: UnsafePointer<CChar>?,
                         value: UnsafePointer<CChar>?, size: Int, flags: Int32) {
        let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
        do throws(Errno) {
            try s.fileSystem.setxattr(InodeNumber(ino), name: Self.name(name), value: bytes, flags: XattrFlags(rawValue: flags))
            reply.success()
        } catch {
            reply.error(error)
        }
    }

    static func getxattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, name: UnsafePointer<CChar>?, size: Int) {
        do throws(Errno) {
            reply.xattr(try s.fileSystem.getxattr(InodeNumber(ino), name: Self.name(name)), bufferSize: size)
        } catch {
            reply.error(error)
        }
    }

    static func listxattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, size: Int) {
        do throws(Errno) {
            reply.xattr(try s.fileSystem.listxattr(InodeNumber(ino)), bufferSize: size)
        } catch {
            reply.error(error)
        }
    }

    static func removexattr(_ s: FuseSession, _ reply: consuming Reply, ino: fuse_ino_t, name: UnsafePointer<CChar>?) {
        do throws(Errno) {
            try s.fileSystem.removexattr(InodeNumber(ino), name: Self.name(name))
            reply.success()
        } catch {
            reply.error(error)
        }
    }
}
