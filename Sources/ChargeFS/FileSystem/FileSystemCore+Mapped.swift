import Glibc
import SystemPackage

/// Mapped and executed files below the passthrough threshold (issue 22).
///
/// A mapping of a file opened with direct I/O goes through FUSE's page cache, and the kernel
/// charges those pages to whoever faults them: a job that executes a program or loads a shared
/// library from the mount pays for its pages (measured: a Python runtime on a mount, 0.9 to 2.2
/// MiB per job). A mapping of a passthrough open maps the backing file instead, whose pages are
/// the target's. So an open that looks like a map or an exec gets a backing file and passes
/// through, whatever the file's size:
/// - the kernel's exec opens: execve's of the program and of its ELF interpreter (ld.so) carry
///   `__FMODE_EXEC` in FUSE_OPEN's flags (open_exec's `O_RDONLY | O_LARGEFILE | __FMODE_EXEC`);
/// - ld.so's (and dlopen's) opens of shared libraries are plain `O_RDONLY | O_CLOEXEC` opens:
///   those are recognised by the file, an ELF object (`\x7fELF` at offset 0). Every ELF file is
///   one a loader maps; reading it through passthrough is no slower than through the daemon.
/// Other read-only opens of small files (scripts, .py, .pyc: read, not mapped) stay in the
/// arena, as before, and cost no backing file.
///
/// Under memcg=auto for every file with a host, charged by that host's charger: a share that
/// would move it up while a passthrough open lives is noted and waits for the last one to close
/// (`noteUser`, `settleHost`), so that the kernel never reads a backing file being swapped.
/// Whatever the file's target: below a directory with a target of its own the backing file is
/// made and charged by that target's charger (`BackingFile.target`), and ELF files of 1 MiB or
/// more pass through there too (other large files only under the mount's own target). A move to
/// another target (a target set or removed above, a rename) takes a file's data out of its
/// backing file into the arena of the new target, unless a passthrough open of it is live (a
/// program from there still running holds its executable open): then EBUSY (EXDEV for a
/// rename). The next map or exec makes a backing file of the new target's.
/// Cost: a backing file per such file, about 1.8 KB of the target's kernel memory and a
/// descriptor of the daemon's (docs/design.md, "Mapped and executed files").
extension FileSystemCore {
    /// `__FMODE_EXEC`: the kernel's exec opens carry it in the open flags FUSE passes on.
    static let execOpenFlag: Int32 = 0x20

    /// Whether a read-only open of `inode` (below the passthrough threshold, or of any size
    /// below a directory's own target) should pass through because a mapping is likely to
    /// follow (an exec, or a loader's open of an ELF object). Reads only the file's first bytes, through the daemon's own view of the page
    /// that holds them (no new charge).
    func wantsMappedPassthrough(_ inode: Inode, flags: OpenFlags) -> Bool {
        // Under memcg=auto any file with a host (its first user's cgroup, or the common ancestor
        // of its users): a share that would move it while a passthrough open lives waits for
        // the last one to close (FileSystemCore+Shares, `settleHost`).
        guard config.mappedPassthrough, !sharesCharges || !inode.users.isEmpty, inode.isRegular, !flags.mayWrite, !flags.truncates,
              inode.size > 0 else { return false }
        if flags.rawValue & Self.execOpenFlag != 0 { return true }
        return startsWithELFMagic(inode)
    }

    static let elfMagic: [UInt8] = [0x7f, UInt8(ascii: "E"), UInt8(ascii: "L"), UInt8(ascii: "F")]

    private func startsWithELFMagic(_ inode: Inode) -> Bool {
        guard inode.size >= Int64(Self.elfMagic.count) else { return false }
        var head = [UInt8](repeating: 0, count: Self.elfMagic.count)
        if let backing = inode.backing {
            let n = head.withUnsafeMutableBytes { buf in
                guard let base = buf.baseAddress else { return 0 }
                return (try? backing.read(into: base, length: buf.count, at: 0)) ?? 0
            }
            return n == head.count && head == Self.elfMagic
        }
        let page = inode.pages.page(at: 0)
        guard page != 0, page != PageMap.inBackingFile else { return false }
        let address = store.address(of: page)
        for i in 0..<head.count { head[i] = address.load(fromByteOffset: i, as: UInt8.self) }
        return head == Self.elfMagic
    }

    /// A move to target `index` of files with backing files (none with a live passthrough
    /// open): each file's pages are copied into arena pages of that target, charged already
    /// (`retarget` charged them with the rest). Nothing changes yet: `commitUnbacking` puts them
    /// in place. EIO, with the copies freed, when a backing file cannot be read.
    func copyOutOfBacking(_ files: [Inode], to index: Int, copied: () -> Void = {}) throws(Errno) -> [(Inode, [(index: Int, page: UInt32)])] {
        store.activeTarget = index
        var copies: [(Inode, [(index: Int, page: UInt32)])] = []
        // A page of file data at a time: a mapping out of core dumps (DumpExcluded), as every
        // copy of file data outside the arena; the heap only if that cannot be mapped.
        let mapped = DumpExcluded.map(byteCount: PageSize.bytes)
        let buffer = mapped?.baseAddress ?? UnsafeMutableRawPointer.allocate(byteCount: PageSize.bytes, alignment: PageSize.bytes)
        defer { if let mapped { DumpExcluded.unmap(mapped) } else { buffer.deallocate() } }
        func undo(_ extra: [UInt32]) {
            store.free(copies.flatMap { $0.1.map(\.page) } + extra)
        }
        for file in files {
            guard let backing = file.backing else { continue }
            var fresh: [UInt32] = []
            store.takeCharged(file.pages.count, into: &fresh)
            var pairs: [(index: Int, page: UInt32)] = []
            var failed = fresh.count < file.pages.count
            file.pages.forEach { i, _ in
                guard !failed, let to = fresh.popLast() else { failed = true; return }
                pairs.append((i, to))
                let offset = Int64(i) * Int64(PageSize.bytes)
                do throws(Errno) {
                    let n = try backing.read(into: buffer, length: PageSize.bytes, at: offset)
                    if n < PageSize.bytes { memset(buffer + n, 0, PageSize.bytes - n) }
                    try store.store(buffer, length: PageSize.bytes, page: to, inner: 0)
                    copied()
                } catch {
                    failed = true
                }
            }
            if failed {
                undo(fresh + pairs.map(\.page))
                throw .ioError
            }
            copies.append((file, pairs))
        }
        return copies
    }

    /// Puts the copies of `copyOutOfBacking` in place of the files' backing files, which are
    /// dropped (their pages, the mount target's, go with them, or with the last mapping of one).
    func commitUnbacking(_ copies: [(Inode, [(index: Int, page: UInt32)])]) {
        for (file, pairs) in copies {
            var marks: [UInt32] = []
            file.pages.remove(from: 0, to: Int.max >> 1, into: &marks)
            if let backing = file.backing { store.noteBackingPages(-marks.count, of: backing) }
            for pair in pairs { file.pages.set(pair.page, at: pair.index) }
            file.backing?.shrinks += 1
            if let backing = file.backing { endAhead(file, backing) }
            file.backing = nil
            backingFiles -= 1
        }
    }
}
