import Glibc
import SystemPackage

/// A charge target per directory (user.chargefs.memcg).
///
/// - A directory with a target of its own charges every page stored below it to that cgroup,
///   except below a subdirectory with its own; a new file or directory takes its parent's
///   target when it is made. getfattr shows the target a directory's (or file's) pages go to
///   (ENODATA when that is the daemon's own cgroup); `setfattr -x` gives the parent's back.
/// - Setting or removing a target moves the pages already stored below: all of them are charged
///   to the new target first (ENOSPC, and nothing moves, when it has no room, at its limit or
///   an ancestor's), then copied and the old ones freed. A rename into a directory of another
///   target moves the renamed file's (or tree's) pages the same way; a RENAME_EXCHANGE between
///   targets is refused with EXDEV. A hard link moves nothing: the inode stays charged to the
///   target it was made or last moved under, whichever names link it.
/// - Permission: the caller must own the directory (or be uid 0: FUSE passes no capabilities,
///   so uid 0 stands for CAP_FOWNER) and be allowed to move a process into the target (write
///   access to its cgroup.procs, checked by the kernel with the caller's uid, gid and
///   supplementary groups); else EPERM.
/// - Each target has its own charger (a helper in a leaf of it), started when the target is
///   first set and stopped once no directory names it and no file holds its pages (backing
///   files included). Files below a directory's own target stay in the arena, but for those
///   mapped or executed, which get backing files of its own (FileSystemCore+Mapped); a file with
///   a backing file moves out of it into the new target's arena.
extension FileSystemCore {
    /// The target path shown for `inode`; ENODATA for the daemon's own cgroup.
    func effectiveTarget(_ inode: Inode) throws(Errno) -> [UInt8] {
        let key = store.targetKey(inode.chargeTarget)
        if key.isEmpty { throw .noData }
        return Array(key.utf8)
    }

    /// Whether a directory still names target `index` as its own; under memcg=auto, whether
    /// any inode that can still take pages is charged to it (a file may name it before it has
    /// pages; one unlinked and closed cannot). Asked only when the target's last page goes.
    func targetNamed(_ index: Int) -> Bool {
        if sharesCharges { return inodes.all.contains { $0.chargeTarget == index && ($0.nlink > 0 || $0.openCount > 0) } }
        return inodes.all.contains { $0.ownsTarget && $0.chargeTarget == index }
    }

    func setTarget(_ dir: Inode, value: [UInt8], flags: XattrFlags, caller: Caller) throws(Errno) {
        guard dir.isDirectory else { throw .invalidArgument }
        // memcg=auto charges by who uses a file, not where it is: no directory target.
        if sharesCharges { throw .invalidArgument }
        if flags.contains(.create) && dir.ownsTarget { throw .fileExists }
        if flags.contains(.replace) && !dir.ownsTarget { throw .noData }
        guard caller.uid == 0 || caller.uid == dir.uid else { throw .notPermitted }
        let path = String(decoding: value.prefix { $0 != 0 }, as: UTF8.self)
        guard path.hasPrefix("/") else { throw .invalidArgument }
        let old = dir.chargeTarget, wasOwn = dir.ownsTarget
        // The caller's supplementary groups (libfuse reads them from /proc/PID/status, "Groups:")
        // count as they would for the caller's own write to cgroup.procs.
        let index = try store.openTarget(path, uid: caller.uid, gid: caller.gid, groups: caller.supplementaryGroups())
        do {
            try retarget(dir, to: index)
        } catch {
            if !targetNamed(index) && store.pagesInUse(target: index) == 0 { store.releaseTarget(index) }
            throw error
        }
        dir.ownsTarget = true
        dir.ctime = .now
        if wasOwn && old != index { releaseIfUnused(old) }
    }

    func removeTarget(_ dir: Inode, caller: Caller) throws(Errno) {
        guard dir.ownsTarget else { throw .noData }
        guard caller.uid == 0 || caller.uid == dir.uid else { throw .notPermitted }
        let old = dir.chargeTarget
        let parentTarget = dir.ino == FileSystem.rootIno ? 0 : (dir.directory.flatMap { inodes[$0.parent] }?.chargeTarget ?? 0)
        try retarget(dir, to: parentTarget)
        dir.ownsTarget = false
        dir.ctime = .now
        releaseIfUnused(old)
    }

    func releaseIfUnused(_ index: Int) {
        if index != 0 && store.pagesInUse(target: index) == 0 && !targetNamed(index) { store.releaseTarget(index) }
    }

    /// Moves `top` and everything below it that takes its target from it to target `index`:
    /// the pages are charged there first (all or nothing), then copied, the old ones freed.
    /// A file with a backing file (the mount's target's: a large file, or a small one mapped or
    /// executed) moves into the new target's arena, unless the kernel reads it for a live
    /// passthrough open: `backed` is the error then (EXDEV for a rename: mv copies the file).
    func retarget(_ top: Inode, to index: Int, backed: Errno = .resourceBusy) throws(Errno) {
        var moving: [Inode] = []
        var pending = [top]
        while let inode = pending.popLast() {
            guard inode === top || !inode.ownsTarget else { continue }
            moving.append(inode)
            inode.directory?.forEach(from: 0) { entry in
                if let child = inodes[entry.ino] { pending.append(child) }
                return true
            }
        }
        let all = moving.filter { $0.isRegular && $0.chargeTarget != index && $0.pages.count > 0 }
        // A backing file the kernel reads for a live passthrough open (a running program's
        // executable, a reader's open) cannot be swapped under it: its pages stay.
        if all.contains(where: { $0.backing != nil && $0.passthroughOpens > 0 }) { throw backed }
        // Pages charged ahead of an append are not copied into the arena, where they would be
        // the file's for good, past its end: they go back now (the next append charges again).
        for file in all where file.backing != nil { trimAhead(file) }
        let needed = all.reduce(0) { $0 + $1.pages.count }
        let kill = needed > 0 && keeping != nil ? MoveKillPoint.armed : nil
        if kill == .charging { MoveKillPoint.killSoon() }
        if needed > 0 { try chargeForMove(needed, to: index) }
        if kill == .charged { MoveKillPoint.killNow() }
        // The copying kill comes once half of the pages are copied and swapped in.
        var copied = 0
        func copiedOne() {
            copied += 1
            if kill == .copying && copied == needed / 2 { MoveKillPoint.killNow() }
        }
        // Backing files with no passthrough open (a library mapped and closed, a program that
        // ended) move into the arena of the new target: copied first, all of them, so that a
        // failed read changes nothing; put in place with the rest below.
        let unbacking: [(Inode, [(index: Int, page: UInt32)])]
        do throws(Errno) {
            unbacking = try copyOutOfBacking(all.filter { $0.backing != nil }, to: index, copied: copiedOne)
        } catch {
            store.trimReserveToLimit()
            throw error
        }
        let files = all.filter { $0.backing == nil }
        for file in files {
            store.activeTarget = index
            var fresh: [UInt32] = []
            store.takeCharged(file.pages.count, into: &fresh)
            var old: [UInt32] = []
            old.reserveCapacity(fresh.count)
            file.pages.forEach { i, page in
                guard let to = fresh.popLast() else { return }
                // Read through the daemon's mapping of a page that exists: no new charge.
                try? store.store(store.address(of: page), length: PageSize.bytes, page: to, inner: 0)
                file.pages.replace(at: i, with: to)
                old.append(page)
                copiedOne()
            }
            store.free(fresh)  // none left unless a zero-fill failed above
            store.activeTarget = file.chargeTarget
            store.free(old)
        }
        commitUnbacking(unbacking)
        for inode in moving { inode.chargeTarget = index }
        if kill == .unpublished || kill == .published { keeping?.killAtPublishForTest = kill }
        store.activeTarget = index
        store.trimReserveToLimit()
    }

    /// Charges `pages` pages to target `index` into its reserve, or none (ENOSPC, or the
    /// charger's error) when it has no room for all of them.
    private func chargeForMove(_ pages: Int, to index: Int) throws(Errno) {
        store.activeTarget = index
        while store.chargedFreePages < pages {
            guard let pending = store.pickForCharging(pages - store.chargedFreePages) else { throw .noSpace }
            let (charged, failure) = pending.charge()
            store.settle(pending, charged: charged)
            if charged < pending.wanted || failure != nil {
                store.trimReserveToLimit()
                throw failure ?? .noSpace
            }
        }
    }
}

/// Test hook (scripts/tests/targets.sh, the kill_move_* tests): CHARGEFS_TEST_KILL_IN_MOVE=POINT
/// makes the server SIGKILL itself in the first move of pages between targets (a target set or
/// removed above files, a rename into another target, a memcg=auto share) with state kept for a
/// successor, at POINT:
/// - `charging`: 2 ms after the charge of the new target's pages was sent to its helper (which
///   is then still instantiating them);
/// - `charged`: all of them charged, nothing copied;
/// - `copying`: half of the pages copied and swapped into their files' maps;
/// - `unpublished`: every page moved, the record written but not published;
/// - `published`: the record published, the old pages not punched yet.
/// A successor unsets the variable (Takeover.serveAsSuccessor), so it fires once per mount.
enum MoveKillPoint: String {
    case charging, charged, copying, unpublished, published

    static let variable = "CHARGEFS_TEST_KILL_IN_MOVE"
    /// Read at the first move (a successor has unset it by then).
    static let armed: MoveKillPoint? = getenv(variable).flatMap { MoveKillPoint(rawValue: String(cString: $0)) }

    static func killNow() { kill(getpid(), SIGKILL) }

    /// Kills from another thread 2 ms from now: this one goes on into the charge.
    static func killSoon() {
        var thread = pthread_t()
        let made = pthread_create(&thread, nil, { _ in
            var pause = timespec(tv_sec: 0, tv_nsec: 2_000_000)
            nanosleep(&pause, nil)
            kill(getpid(), SIGKILL)
            return nil
        }, nil)
        if made == 0 { pthread_detach(thread) } else { killNow() }
    }
}
