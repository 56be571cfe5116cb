import CFuse
import Glibc
import SystemPackage

/// Where a FUSE request becomes a `FileSystem` call: the only code that touches fuse_req_t.
///
/// Each handler decodes the request, calls the file system, and sends exactly one reply (or none,
/// for forget). The file system is reached through the session's userdata.
enum FuseBridge {
    /// Everything comes through this kernel, so cached entries and attributes stay right; the
    /// timeout bounds how stale atime (which only we update) can look.
    static let cacheSeconds = 3600.0

    static func fileSystem(_ req: fuse_req_t?) -> FileSystem {
        Unmanaged<FileSystem>.fromOpaque(UnsafeRawPointer(fuse_req_userdata(req)!)).takeUnretainedValue()
    }

    static func caller(_ req: fuse_req_t?) -> Caller {
        guard let ctx = fuse_req_ctx(req) else { return .root }
        nonisolated(unsafe) let request = req
        return Caller(uid: ctx.pointee.uid, gid: ctx.pointee.gid) {
            // Valid only while the request is being handled, which is when the core asks.
            var groups = [gid_t](repeating: 0, count: 256)
            let n = fuse_req_getgroups(request, Int32(groups.count), &groups)
            return n > 0 ? Array(groups.prefix(min(Int(n), groups.count))) : []
        }
    }

    /// The session, for notifications the kernel did not ask for.
    nonisolated(unsafe) static var session: OpaquePointer?

    /// Tells the kernel its cached attributes of `ino` are stale (a mode changed behind its back).
    /// Attributes only (negative offset): takes no inode lock a writer may hold.
    static func invalidateAttributes(_ ino: fuse_ino_t) {
        if let session { _ = fuse_lowlevel_notify_inval_inode(session, ino, -1, 0) }
    }

    static func name(_ cString: UnsafePointer<CChar>?) -> FileName {
        guard let cString else { return [] }
        return Array(UnsafeRawBufferPointer(start: cString, count: strlen(cString)))
    }

    static func reply(_ req: fuse_req_t?, _ error: Errno) {
        fuse_reply_err(req, error.rawValue)
    }

    static func entry(_ attributes: Attributes) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = fuse_ino_t(attributes.ino)
        e.generation = UInt64(attributes.generation)
        e.attr = attributes.stat
        e.attr_timeout = cacheSeconds
        e.entry_timeout = cacheSeconds
        return e
    }

    static func replyEntry(_ req: fuse_req_t?, _ body: () throws(Errno) -> Attributes) {
        do throws(Errno) {
            var e = entry(try body())
            fuse_reply_entry(req, &e)
        } catch {
            reply(req, error)
        }
    }

    static func replyAttr(_ req: fuse_req_t?, _ body: () throws(Errno) -> Attributes) {
        do throws(Errno) {
            var st = try body().stat
            fuse_reply_attr(req, &st, cacheSeconds)
        } catch {
            reply(req, error)
        }
    }

    static func replyStatus(_ req: fuse_req_t?, _ body: () throws(Errno) -> Void) {
        do throws(Errno) {
            try body()
            fuse_reply_err(req, 0)
        } catch {
            reply(req, error)
        }
    }

    static func replyBytes(_ req: fuse_req_t?, size: Int, _ body: () throws(Errno) -> [UInt8]) {
        do throws(Errno) {
            let bytes = try body()
            if size == 0 {
                fuse_reply_xattr(req, bytes.count)
            } else if bytes.count > size {
                reply(req, .outOfRange)
            } else {
                bytes.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress, bytes.count) }
            }
        } catch {
            reply(req, error)
        }
    }

    static func changes(from attr: UnsafeMutablePointer<stat>, _ toSet: Int32) -> AttributeChanges {
        let set = { (flag: Int32) in toSet & flag != 0 }
        var c = AttributeChanges()
        let st = attr.pointee
        if set(FUSE_SET_ATTR_MODE) { c.mode = st.st_mode }
        if set(FUSE_SET_ATTR_UID) { c.uid = st.st_uid }
        if set(FUSE_SET_ATTR_GID) { c.gid = st.st_gid }
        if set(FUSE_SET_ATTR_SIZE) { c.size = Int64(st.st_size) }
        if set(FUSE_SET_ATTR_ATIME_NOW) { c.atime = .now } else if set(FUSE_SET_ATTR_ATIME) { c.atime = .set(st.st_atim) }
        if set(FUSE_SET_ATTR_MTIME_NOW) { c.mtime = .now } else if set(FUSE_SET_ATTR_MTIME) { c.mtime = .set(st.st_mtim) }
        if set(FUSE_SET_ATTR_CTIME) { c.ctime = st.st_ctim }
        return c
    }

    /// Direct I/O for every open file, or the page cache; decided once, at INIT.
    nonisolated(unsafe) static var directIO = false

    /// Every change to the data comes through this kernel, so a page cache stays valid across
    /// opens (keep_cache).
    static func setCaching(_ fi: UnsafeMutablePointer<fuse_file_info>) {
        if directIO { cfuse_fi_set_direct_io(fi, 1) } else { cfuse_fi_set_keep_cache(fi, 1) }
    }

    static func makeOperations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let conn, let userdata else { return }
            let fs = Unmanaged<FileSystem>.fromOpaque(userdata).takeUnretainedValue()
            var caching = fs.config.caching
            if caching == .automatic {
                caching = FuseKernelFeatures.kernelOffersMmapWithDirectIO ? .direct : .page
            }
            FuseBridge.directIO = caching == .direct
            fs.noteCachingInEffect(caching)
            // 1 MiB requests: fewer round trips for streams.
            conn.pointee.max_write = 1 << 20
            conn.pointee.max_readahead = 1 << 20
            conn.pointee.want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
            // Every change to the data comes through this kernel, which keeps its page cache right
            // (write-through, truncate, punch); a newer mtime seen in a getattr is our own write,
            // not a reason to drop the cache (auto_inval_data did so after every write).
            conn.pointee.want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
        }
        ops.destroy = { userdata in
            guard let userdata else { return }
            Unmanaged<FileSystem>.fromOpaque(userdata).takeUnretainedValue().destroy()
        }
        ops.lookup = { req, parent, name in
            let fs = FuseBridge.fileSystem(req)
            do throws(Errno) {
                var e = FuseBridge.entry(try fs.lookup(parent: UInt64(parent), name: FuseBridge.name(name)))
                fuse_reply_entry(req, &e)
            } catch where error == .noSuchFileOrDirectory {
                // A negative entry lets the kernel cache the miss; creating the name invalidates it.
                var e = fuse_entry_param()
                e.entry_timeout = FuseBridge.cacheSeconds
                fuse_reply_entry(req, &e)
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        ops.forget = { req, ino, nlookup in
            FuseBridge.fileSystem(req).forget(UInt64(ino), count: nlookup)
            fuse_reply_none(req)
        }
        ops.forget_multi = { req, count, forgets in
            let fs = FuseBridge.fileSystem(req)
            if let forgets {
                for i in 0..<count { fs.forget(UInt64(forgets[i].ino), count: forgets[i].nlookup) }
            }
            fuse_reply_none(req)
        }
        ops.getattr = { req, ino, _ in
            FuseBridge.replyAttr(req) { () throws(Errno) in try FuseBridge.fileSystem(req).getattr(UInt64(ino)) }
        }
        ops.setattr = { req, ino, attr, toSet, _ in
            guard let attr else { return FuseBridge.reply(req, .invalidArgument) }
            let c = FuseBridge.changes(from: attr, toSet)
            // With the kill-privilege handover, a setattr that sets nothing is the kernel's own
            // "clear setuid/setgid" (a chown to -1:-1, or the first write to a setuid file).
            let clears = FuseKernelFeatures.requestClearsSetID || (FuseKernelFeatures.granted && toSet == 0)
            FuseBridge.replyAttr(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).setattr(UInt64(ino), c, caller: FuseBridge.caller(req), clearSetIDAsked: clears)
            }
        }
        ops.readlink = { req, ino in
            do throws(Errno) {
                let target = try FuseBridge.fileSystem(req).readlink(UInt64(ino)) + [0]
                target.withUnsafeBufferPointer { buf in
                    buf.withMemoryRebound(to: CChar.self) { _ = fuse_reply_readlink(req, $0.baseAddress) }
                }
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        ops.mknod = { req, parent, name, mode, rdev in
            FuseBridge.replyEntry(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).mknod(parent: UInt64(parent), name: FuseBridge.name(name), mode: mode,
                                          rdev: UInt64(rdev), caller: FuseBridge.caller(req))
            }
        }
        ops.mkdir = { req, parent, name, mode in
            FuseBridge.replyEntry(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).mkdir(parent: UInt64(parent), name: FuseBridge.name(name), mode: mode, caller: FuseBridge.caller(req))
            }
        }
        ops.symlink = { req, link, parent, name in
            FuseBridge.replyEntry(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).symlink(target: FuseBridge.name(link), parent: UInt64(parent),
                                            name: FuseBridge.name(name), caller: FuseBridge.caller(req))
            }
        }
        ops.link = { req, ino, newParent, newName in
            FuseBridge.replyEntry(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).link(UInt64(ino), newParent: UInt64(newParent), newName: FuseBridge.name(newName))
            }
        }
        ops.unlink = { req, parent, name in
            FuseBridge.replyStatus(req) { () throws(Errno) in try FuseBridge.fileSystem(req).unlink(parent: UInt64(parent), name: FuseBridge.name(name)) }
        }
        ops.rmdir = { req, parent, name in
            FuseBridge.replyStatus(req) { () throws(Errno) in try FuseBridge.fileSystem(req).rmdir(parent: UInt64(parent), name: FuseBridge.name(name)) }
        }
        ops.rename = { req, parent, name, newParent, newName, flags in
            FuseBridge.replyStatus(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).rename(parent: UInt64(parent), name: FuseBridge.name(name), newParent: UInt64(newParent),
                                           newName: FuseBridge.name(newName), flags: UInt32(flags))
            }
        }
        // Files keep open/release: an unlinked file's data must go at its last close, which only
        // release tells (FORGET comes later, and asynchronously).
        ops.open = { req, ino, fi in
            guard let fi else { return FuseBridge.reply(req, .invalidArgument) }
            do throws(Errno) {
                let modeChanged = try FuseBridge.fileSystem(req).open(UInt64(ino), flags: fi.pointee.flags, caller: FuseBridge.caller(req),
                                                                      clearSetIDAsked: FuseKernelFeatures.requestClearsSetID)
                FuseBridge.setCaching(fi)
                fuse_reply_open(req, fi)
                if modeChanged { FuseBridge.invalidateAttributes(ino) }
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        ops.create = { req, parent, name, mode, fi in
            guard let fi else { return FuseBridge.reply(req, .invalidArgument) }
            do throws(Errno) {
                let attributes = try FuseBridge.fileSystem(req).create(parent: UInt64(parent), name: FuseBridge.name(name),
                                                                        mode: mode, caller: FuseBridge.caller(req))
                var e = FuseBridge.entry(attributes)
                FuseBridge.setCaching(fi)
                fuse_reply_create(req, &e, fi)
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        ops.read = { req, ino, size, offset, fi in
            // The read request carries the file's open flags, with or without an open.
            let noatime = fi.map { $0.pointee.flags & Int32(CFUSE_O_NOATIME) != 0 } ?? false
            do throws(Errno) {
                try FuseBridge.fileSystem(req).read(UInt64(ino), offset: Int64(offset), count: size, noatime: noatime) { vectors in
                    _ = fuse_reply_iov(req, vectors.baseAddress, Int32(vectors.count))
                }
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        ops.write = { req, ino, buf, size, offset, _ in
            do throws(Errno) {
                let result = try FuseBridge.fileSystem(req).write(UInt64(ino), offset: Int64(offset),
                                                                  data: UnsafeRawBufferPointer(start: buf, count: size),
                                                                  caller: FuseBridge.caller(req),
                                                                  clearSetIDAsked: FuseKernelFeatures.requestClearsSetID)
                fuse_reply_write(req, result.written)
                if result.modeChanged { FuseBridge.invalidateAttributes(ino) }
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        // No flush: libfuse answers ENOSYS once and the kernel stops sending it on every close.
        ops.release = { req, ino, _ in
            FuseBridge.fileSystem(req).release(UInt64(ino))
            fuse_reply_err(req, 0)
        }
        ops.fsync = { req, _, _, _ in fuse_reply_err(req, 0) }
        // Directories keep no per-open state: ENOSYS tells the kernel to stop sending opendir
        // and releasedir, and to cache listings (every change comes through it).
        ops.opendir = { req, _, _ in FuseBridge.reply(req, .noFunction) }
        ops.readdir = { req, ino, size, offset, _ in
            FuseBridge.readdir(req, ino: ino, size: size, offset: offset, plus: false)
        }
        ops.readdirplus = { req, ino, size, offset, _ in
            FuseBridge.readdir(req, ino: ino, size: size, offset: offset, plus: true)
        }
        ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }
        ops.fsyncdir = { req, _, _, _ in fuse_reply_err(req, 0) }
        ops.statfs = { req, _ in
            let usage = FuseBridge.fileSystem(req).usage()
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
            fuse_reply_statfs(req, &st)
        }
        ops.setxattr = { req, ino, name, value, size, flags in
            let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
            FuseBridge.replyStatus(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).setxattr(UInt64(ino), name: FuseBridge.name(name), value: bytes, flags: flags)
            }
        }
        ops.getxattr = { req, ino, name, size in
            FuseBridge.replyBytes(req, size: size) { () throws(Errno) in try FuseBridge.fileSystem(req).getxattr(UInt64(ino), name: FuseBridge.name(name)) }
        }
        ops.listxattr = { req, ino, size in
            FuseBridge.replyBytes(req, size: size) { () throws(Errno) in try FuseBridge.fileSystem(req).listxattr(UInt64(ino)) }
        }
        ops.removexattr = { req, ino, name in
            FuseBridge.replyStatus(req) { () throws(Errno) in try FuseBridge.fileSystem(req).removexattr(UInt64(ino), name: FuseBridge.name(name)) }
        }
        ops.fallocate = { req, ino, mode, offset, length, _ in
            FuseBridge.replyStatus(req) { () throws(Errno) in
                try FuseBridge.fileSystem(req).fallocate(UInt64(ino), mode: mode, offset: Int64(offset), length: Int64(length))
            }
        }
        ops.lseek = { req, ino, offset, whence, _ in
            do throws(Errno) {
                let position = try FuseBridge.fileSystem(req).seek(UInt64(ino), offset: Int64(offset), whence: whence)
                fuse_reply_lseek(req, off_t(position))
            } catch {
                FuseBridge.reply(req, error)
            }
        }
        return ops
    }

    static func readdir(_ req: fuse_req_t?, ino: fuse_ino_t, size: Int, offset: off_t, plus: Bool) {
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
        defer { buffer.deallocate() }
        var used = 0
        do throws(Errno) {
            try fileSystem(req).readdir(UInt64(ino), offset: Int64(offset), plus: plus) { entry in
                var cName = entry.name
                cName.append(0)
                let needed: Int = cName.withUnsafeBufferPointer { nameBuf in
                    nameBuf.withMemoryRebound(to: CChar.self) { n in
                        if plus, let attributes = entry.attributes {
                            var e = FuseBridge.entry(attributes)
                            return fuse_add_direntry_plus(req, buffer + used, size - used, n.baseAddress, &e, off_t(entry.nextOffset))
                        }
                        var st = stat()
                        st.st_ino = UInt(entry.ino)
                        st.st_mode = UInt32(entry.type) << 12
                        return fuse_add_direntry(req, buffer + used, size - used, n.baseAddress, &st, off_t(entry.nextOffset))
                    }
                }
                if needed > size - used { return false }
                used += needed
                return true
            }
            fuse_reply_buf(req, buffer, used)
        } catch {
            reply(req, error)
        }
    }
}
