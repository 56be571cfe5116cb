import CFuse
import Glibc

/// libfuse's table of callbacks: each one wraps its request in a `Reply`, finds the session and
/// calls the handler of the same name in `FuseHandlers`. Nothing else happens here.
enum FuseOperations {
    /// Runs `handler` with the request's session and its reply; a request that arrives without
    /// one (impossible while libfuse keeps our userdata) is answered EIO by the dropped reply.
    @inline(__always)
    static func serve(_ req: fuse_req_t?, _ handler: (FuseSession, consuming Reply) -> Void) {
        let reply = Reply(req)
        guard let session = FuseSession.of(fuse_req_userdata(req)) else { return reply.error(.ioError) }
        handler(session, reply)
    }

    static func table() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let session = FuseSession.of(userdata), let conn else { return }
            FuseHandlers.initialize(session, conn)
        }
        ops.destroy = { userdata in FuseSession.of(userdata)?.fileSystem.destroy() }
        ops.lookup = { req, parent, name in FuseOperations.serve(req) { FuseHandlers.lookup($0, $1, parent: parent, name: name) } }
        ops.forget = { req, ino, n in FuseOperations.serve(req) { FuseHandlers.forget($0, $1, ino: ino, count: n) } }
        ops.forget_multi = { req, count, forgets in
            FuseOperations.serve(req) { FuseHandlers.forgetMulti($0, $1, count: count, forgets: forgets) }
        }
        ops.getattr = { req, ino, _ in FuseOperations.serve(req) { FuseHandlers.getattr($0, $1, ino: ino) } }
        ops.setattr = { req, ino, attr, toSet, _ in
            FuseOperations.serve(req) { FuseHandlers.setattr($0, $1, ino: ino, attr: attr, toSet: toSet) }
        }
        ops.readlink = { req, ino in FuseOperations.serve(req) { FuseHandlers.readlink($0, $1, ino: ino) } }
        ops.mknod = { req, parent, name, mode, rdev in
            FuseOperations.serve(req) { FuseHandlers.mknod($0, $1, parent: parent, name: name, mode: mode, rdev: rdev) }
        }
        ops.mkdir = { req, parent, name, mode in FuseOperations.serve(req) { FuseHandlers.mkdir($0, $1, parent: parent, name: name, mode: mode) } }
        ops.symlink = { req, link, parent, name in
            FuseOperations.serve(req) { FuseHandlers.symlink($0, $1, target: link, parent: parent, name: name) }
        }
        ops.link = { req, ino, newParent, newName in
            FuseOperations.serve(req) { FuseHandlers.link($0, $1, ino: ino, newParent: newParent, newName: newName) }
        }
        ops.unlink = { req, parent, name in FuseOperations.serve(req) { FuseHandlers.unlink($0, $1, parent: parent, name: name) } }
        ops.rmdir = { req, parent, name in FuseOperations.serve(req) { FuseHandlers.rmdir($0, $1, parent: parent, name: name) } }
        ops.rename = { req, parent, name, newParent, newName, flags in
            FuseOperations.serve(req) { FuseHandlers.rename($0, $1, parent: parent, name: name, newParent: newParent, newName: newName, flags: flags) }
        }
        ops.open = { req, ino, fi in FuseOperations.serve(req) { FuseHandlers.open($0, $1, ino: ino, fi: fi) } }
        ops.create = { req, parent, name, mode, fi in
            FuseOperations.serve(req) { FuseHandlers.create($0, $1, parent: parent, name: name, mode: mode, fi: fi) }
        }
        ops.read = { req, ino, size, offset, fi in
            FuseOperations.serve(req) { FuseHandlers.read($0, $1, ino: ino, size: size, offset: offset, fi: fi) }
        }
        ops.write = { req, ino, buf, size, offset, fi in
            FuseOperations.serve(req) { FuseHandlers.write($0, $1, ino: ino, buf: buf, size: size, offset: offset, fi: fi) }
        }
        // No flush: libfuse answers ENOSYS once and the kernel stops sending it on every close.
        ops.release = { req, ino, fi in FuseOperations.serve(req) { FuseHandlers.release($0, $1, ino: ino, fi: fi) } }
        // No fsync or fsyncdir: RAM has nothing to sync, and on ENOSYS the kernel stops sending
        // them (it still writes back a file's dirty mmap pages first and reports their errors).
        // Directories keep no per-open state: ENOSYS tells the kernel to stop sending opendir
        // and releasedir, and to cache listings (every change comes through it).
        ops.opendir = { req, _, _ in Reply(req).error(.noFunction) }
        ops.readdir = { req, ino, size, offset, _ in
            FuseOperations.serve(req) { FuseHandlers.readdir($0, $1, ino: ino, size: size, offset: offset, plus: false) }
        }
        ops.readdirplus = { req, ino, size, offset, _ in
            FuseOperations.serve(req) { FuseHandlers.readdir($0, $1, ino: ino, size: size, offset: offset, plus: true) }
        }
        ops.releasedir = { req, _, _ in Reply(req).success() }
        ops.statfs = { req, _ in FuseOperations.serve(req) { FuseHandlers.statfs($0, $1) } }
        ops.setxattr = { req, ino, name, value, size, flags in
            FuseOperations.serve(req) { FuseHandlers.setxattr($0, $1, ino: ino, name: name, value: value, size: size, flags: flags) }
        }
        ops.getxattr = { req, ino, name, size in FuseOperations.serve(req) { FuseHandlers.getxattr($0, $1, ino: ino, name: name, size: size) } }
        ops.listxattr = { req, ino, size in FuseOperations.serve(req) { FuseHandlers.listxattr($0, $1, ino: ino, size: size) } }
        ops.removexattr = { req, ino, name in FuseOperations.serve(req) { FuseHandlers.removexattr($0, $1, ino: ino, name: name) } }
        ops.fallocate = { req, ino, mode, offset, length, _ in
            FuseOperations.serve(req) { FuseHandlers.fallocate($0, $1, ino: ino, mode: mode, offset: offset, length: length) }
        }
        ops.lseek = { req, ino, offset, whence, _ in
            FuseOperations.serve(req) { FuseHandlers.lseek($0, $1, ino: ino, offset: offset, whence: whence) }
        }
        return ops
    }
}
