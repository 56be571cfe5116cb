import Glibc
import SystemPackage

/// Tejun Heo's shared charging (`-o memcg=auto,memcg_scope=P`).
///
/// - A file's pages are charged to the cgroup (inside P) of the process that creates or first
///   opens it; a process outside P counts as P.
/// - When a process of another cgroup opens it, its pages move (charged there first, then
///   copied, the old ones freed: as a directory's target moves them) to the nearest common
///   ancestor of the cgroups that use it, never above P. That ancestor hosts them, once, in the
///   kernel's own counters (through a charge helper in a leaf of it).
/// - Every cgroup that uses a file hosted above it carries the file's bytes as `shared`: a
///   write by a process of cgroup X gets ENOSPC when X's usage + X's shared bytes + the write
///   would pass X's limit less 256 KiB, and the same at each ancestor of X up to P (colluding
///   cgroups gain nothing by sharing).
/// - Unsharing: never, until the file goes. The users of a file only grow; its pages stay with
///   the host. That is Tejun's own proposal (the shared charge stays with every sharer), cannot
///   flap (a file read in turn by two cgroups would otherwise move back and forth at each open),
///   and costs no timer. A file unlinked and freed gives everything back.
/// - Directories take no target of their own here (user.chargefs.memcg: EINVAL), and a rename
///   moves nothing: a file's host depends on who uses it, not on where it is.
extension FileSystemCore {
    /// Whether the mount shares charges (memcg=auto).
    var sharesCharges: Bool { store.sharedScopePath != nil }

    /// Whether no share can move `inode` to another target any more, so that it may have a
    /// backing file (passthrough): always without memcg=auto (a directory's target moves files
    /// with backing files out of them, FileSystemCore+Mapped); under it, a file hosted by the
    /// scope P itself once it has a user. Hosts only go up and never above P, a file is never
    /// unshared, and renames and directories move nothing here: such a file stays put until it
    /// goes. A large file hosted below P stays in the arena: a share would move it up, and a
    /// backing file held by a live passthrough open cannot move (the kernel reads that very file),
    /// so its share would wait for a reader's close, which for a large file may never come.
    /// (Mapped and executed files pass through under any host: their opens end with the program,
    /// and the share waits for that: `noteUser`, `settleHost`.)
    func staysWithItsHost(_ inode: Inode) -> Bool {
        !sharesCharges || (inode.chargeTarget == 0 && !inode.users.isEmpty)
    }

    /// Notes that a process of `cgroup` (inside P) uses `inode`: the first user hosts it; a new
    /// one moves its pages up to the common ancestor. When the ancestor has no room for the
    /// move (pages are charged there before the old ones go), nothing moves and the new user is
    /// not noted: the next open tries again. When a live passthrough open reads the file's
    /// backing file (a program of the host's running it, a reader), the user is noted and the
    /// move waits for the last such open to close (`settleHost`): meanwhile the old host keeps
    /// the pages and the new user carries them as shared, so nobody gains by it.
    func noteUser(_ inode: Inode, cgroup: String) {
        guard let scope = store.sharedScopePath, inode.isRegular, !inode.users.contains(cgroup) else { return }
        let users = inode.users + [cgroup]
        let host = SharedCharging.host(of: users, scope: scope)
        let index = store.openSharedTarget(host)
        if index != inode.chargeTarget || inode.users.isEmpty {
            let old = inode.chargeTarget
            do throws(Errno) {
                try retarget(inode, to: index)
                // A cgroup left with no file stops its helper, so that its cgroup can be removed.
                if old != index { releaseIfUnused(old) }
            } catch .resourceBusy {
                Log.line("memcg=auto: inode \(inode.ino.rawValue) moves to \(host) once its passthrough opens close")
                releaseIfUnused(index)
            } catch {
                Log.line("memcg=auto: the pages of inode \(inode.ino.rawValue) stay with \(store.targetKey(inode.chargeTarget)): \(host) has no room to host them (\(error))")
                releaseIfUnused(index)
                return
            }
        }
        inode.users = users
        if users.count > 1 || store.targetKey(inode.chargeTarget) != cgroup { sharedInodes.insert(inode.ino) }
    }

    /// A file whose move to the common ancestor of its users waited for its passthrough opens
    /// (`noteUser`) moves once the last one closes; without room there it stays, as when noted.
    /// A mapping made before keeps the old backing file's pages until unmapped, as at any move.
    func settleHost(_ inode: Inode) {
        guard let scope = store.sharedScopePath, inode.users.count > 1, inode.nlink > 0, inode.passthroughOpens == 0 else { return }
        let host = SharedCharging.host(of: inode.users, scope: scope)
        guard store.targetKey(inode.chargeTarget) != host else { return }
        let index = store.openSharedTarget(host)
        let old = inode.chargeTarget
        do throws(Errno) {
            try retarget(inode, to: index)
            releaseIfUnused(old)
        } catch {
            Log.line("memcg=auto: the pages of inode \(inode.ino.rawValue) stay with \(store.targetKey(old)): \(host) has no room to host them (\(error))")
            releaseIfUnused(index)
        }
    }

    /// What each file shared (or hosted away from its one user) holds, for the checks.
    private func shares(_ inodeNumbers: some Sequence<InodeNumber>) -> [SharedCharging.FileShare] {
        inodeNumbers.compactMap { ino in
            guard let inode = inodes[ino], !inode.users.isEmpty else { return nil }
            return SharedCharging.FileShare(users: inode.users, host: store.targetKey(inode.chargeTarget),
                                            bytes: Int64(inode.pages.count * PageSize.bytes))
        }
    }

    /// Bytes `cgroup` and each of its ancestors up to P carry as shared (keyed by path; only
    /// those above 0). Walks the shared files only.
    func sharedBytes(from cgroup: String) -> [String: Int64] {
        guard let scope = store.sharedScopePath, !sharedInodes.isEmpty else { return [:] }
        let files = shares(sharedInodes)
        var out: [String: Int64] = [:]
        for level in SharedCharging.levels(from: cgroup, scope: scope) {
            let bytes = SharedCharging.shared(by: level, in: files)
            if bytes > 0 { out[level] = bytes }
        }
        return out
    }

    /// The shares attribute: one line per cgroup involved.
    func sharesText() throws(Errno) -> [UInt8] {
        guard sharesCharges else { throw .noData }
        let files = shares(inodes.all.filter { $0.isRegular }.map(\.ino))
        return Array(SharedCharging.text(files).utf8)
    }
}

/// The arithmetic of shared charging, on cgroup paths (no system call, no state).
enum SharedCharging {
    /// One file: the cgroups that use it, the one that hosts its pages, and their bytes.
    struct FileShare: Equatable {
        var users: [String]
        var host: String
        var bytes: Int64
    }

    /// Whether `path` is `ancestor` or below it (by whole components).
    static func isWithin(_ path: String, _ ancestor: String) -> Bool {
        path == ancestor || path.hasPrefix(ancestor.hasSuffix("/") ? ancestor : ancestor + "/")
    }

    /// `path` if inside `scope`, else `scope` (a process outside P counts as P).
    static func clamp(_ path: String, scope: String) -> String {
        isWithin(path, scope) ? path : scope
    }

    static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
        return String(path[..<slash])
    }

    /// The nearest common ancestor of `users` (each clamped to `scope`), never above `scope`.
    static func host(of users: [String], scope: String) -> String {
        guard let first = users.first else { return scope }
        var common = clamp(first, scope: scope)
        for user in users.dropFirst() {
            let path = clamp(user, scope: scope)
            while !isWithin(path, common) && common != scope { common = parent(common) }
        }
        return common
    }

    /// `cgroup` (clamped) and its ancestors up to `scope`, nearest first.
    static func levels(from cgroup: String, scope: String) -> [String] {
        var level = clamp(cgroup, scope: scope)
        var out = [level]
        while level != scope {
            level = parent(level)
            out.append(level)
        }
        return out
    }

    /// Bytes used in `cgroup`'s subtree but hosted outside it: what it carries as shared.
    static func shared(by cgroup: String, in files: [FileShare]) -> Int64 {
        files.reduce(0) { sum, file in
            file.users.contains { isWithin($0, cgroup) } && !isWithin(file.host, cgroup) ? sum + file.bytes : sum
        }
    }

    /// `<cgroup> owned=<bytes> shared=<bytes> hosted=<bytes>`, one line per cgroup that uses or
    /// hosts a file, sorted by path. owned: hosted for itself alone; hosted: hosted for others
    /// too; shared: used by it and hosted above it.
    static func text(_ files: [FileShare]) -> String {
        var cgroups = Set<String>()
        for file in files {
            cgroups.insert(file.host)
            cgroups.formUnion(file.users)
        }
        return cgroups.sorted().map { cgroup in
            var owned: Int64 = 0, hosted: Int64 = 0
            for file in files where file.host == cgroup {
                if file.users.allSatisfy({ $0 == cgroup }) { owned += file.bytes } else { hosted += file.bytes }
            }
            return "\(cgroup) owned=\(owned) shared=\(shared(by: cgroup, in: files)) hosted=\(hosted)\n"
        }.joined()
    }
}
