import CFuse
import Glibc
import SystemPackage

/// The memory all file data lives in, and its mapping: one file of 4 KiB pages, mapped shared
/// into the daemon. Page 0 is never handed out (0 means "no page" in page maps).
///
/// The file lives on a private tmpfs instance of the daemon's own (fsopen + fsmount, attached to
/// no mount namespace, so nobody else can see it and it vanishes with its last fd), mounted with
/// `huge=never` (a 4 KiB punch inside a 2 MiB folio would free nothing, and a 4 KiB charge
/// request would bill 2 MiB) and `noswap` where the kernel has it (6.4+: a swapped-out page would
/// be swapped back in, and charged, by the daemon with no headroom check). Without CAP_SYS_ADMIN
/// it falls back to a memfd, which follows the host's shmem_enabled and may be swapped.
///
/// Which huge-page setting wins where (mm/shmem.c, shmem_huge_global_enabled): `deny` and `force`
/// in /sys/kernel/mm/transparent_hugepage/shmem_enabled override every tmpfs mount; otherwise a
/// mount's own huge= decides, and the internal mount behind memfds takes shmem_enabled's value.
/// The per-size knobs (hugepages-*/shmem_enabled) apply to anonymous shared memory only. So the
/// arena refuses to start where a probe (or, failing that, the setting) says it would get huge
/// folios: `force` for the private tmpfs; `always`, `within_size` and `force` for a memfd.
public final class Arena {
    /// A page of zeros of the store's own, for zeroing pages and for reading holes.
    public nonisolated(unsafe) static let zeros: UnsafeRawPointer = {
        let page = UnsafeMutableRawPointer.allocate(byteCount: PageSize.bytes, alignment: PageSize.bytes)
        memset(page, 0, PageSize.bytes)
        return UnsafeRawPointer(page)
    }()

    public enum Backing: Equatable, Sendable, CustomStringConvertible {
        case privateTmpfs(noswap: Bool)
        case memfd

        public var description: String {
            switch self {
            case .privateTmpfs(let noswap): noswap ? "tmpfs,huge=never,noswap" : "tmpfs,huge=never"
            case .memfd: "memfd"
            }
        }
    }

    /// The arena's file, for chargers that instantiate its pages from another process.
    public let fileDescriptor: FileDescriptor
    /// The root of the private tmpfs the arena lives on (nil for a memfd): large files' own
    /// backing files are made there, with the same huge=never and noswap.
    public let tmpfsRoot: FileDescriptor?
    public let backing: Backing
    /// Pages 1...capacityPages can be handed out.
    public let capacityPages: Int
    let base: UnsafeMutableRawPointer
    let mappedBytes: Int

    /// The system calls that change page contents, replaceable by tests to inject failures.
    var syscalls = PageFileCalls.kernel

    /// `allowHugePages`: start even where the arena would get huge folios (with a warning); only
    /// for mounts whose pages nobody charges to a target, where they cost memory, not correctness.
    public init(capacityPages requested: Int = Int(UInt32.max) - 1, allowHugePages: Bool = false) throws(ArenaError) {
        let kernelPageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard kernelPageSize == PageSize.bytes else { throw .pageSize(kernel: kernelPageSize) }
        let capacity = max(2, min(requested, Int(UInt32.max) - 1))
        let (fd, backing, root) = try Self.openBackingFile()
        let bytes = (capacity + 1) * PageSize.bytes
        do throws(ArenaError) {
            guard ftruncate(fd, off_t(bytes)) == 0 else { throw ArenaError.system("ftruncate", Errno(rawValue: errno)) }
            try Self.refuseHugeFolios(fd, backing: backing, allow: allowHugePages)
            if backing != .privateTmpfs(noswap: true), Self.swapConfigured() {
                Log.line("warning: swap is on and the arena (\(backing)) can be swapped: a swapped-out page "
                         + "is charged again when the daemon touches it, without a headroom check (needs Linux 6.4+ and root for noswap)")
            }
        } catch {
            close(fd)
            if let root { close(root) }
            throw error
        }
        // MAP_NORESERVE: the mapping is address space only; memory exists once a page is charged.
        let mapped = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let err = Errno(rawValue: errno)
            close(fd)
            if let root { close(root) }
            throw .system("mmap", err)
        }
        // Users' data stays out of core dumps, and a dump must not fault in (and charge) every
        // page of the mapping's terabytes of holes. NOHUGEPAGE keeps khugepaged from collapsing
        // the mapping on hosts whose setting would allow it.
        guard cfuse_madvise(mapped, bytes, Int32(CFUSE_MADV_DONTDUMP)) == 0 else {
            let err = Errno(rawValue: errno)
            munmap(mapped, bytes)
            close(fd)
            if let root { close(root) }
            throw .system("madvise(MADV_DONTDUMP)", err)
        }
        _ = cfuse_madvise(mapped, bytes, Int32(CFUSE_MADV_NOHUGEPAGE))  // EINVAL without THP: nothing to keep off
        self.fileDescriptor = FileDescriptor(rawValue: fd)
        self.tmpfsRoot = root.map { FileDescriptor(rawValue: $0) }
        self.backing = backing
        self.capacityPages = capacity
        self.base = mapped
        self.mappedBytes = bytes
    }

    /// Takes over an arena another server made (a takeover): duplicates of its file and of its
    /// tmpfs root, mapped the same way. The pages are as that server left them.
    public init(adopting file: FileDescriptor, tmpfsRoot root: FileDescriptor?, backing: Backing) throws(ArenaError) {
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw .system("fstat", Errno(rawValue: errno)) }
        let bytes = Int(st.st_size)
        guard bytes >= 2 * PageSize.bytes, bytes % PageSize.bytes == 0 else {
            throw .system("an arena of \(bytes) bytes", .invalidArgument)
        }
        let fd = fcntl(file.rawValue, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw .system("dup", Errno(rawValue: errno)) }
        var rootCopy: Int32? = nil
        if let root {
            let copy = fcntl(root.rawValue, F_DUPFD_CLOEXEC, 0)
            guard copy >= 0 else {
                let err = Errno(rawValue: errno)
                close(fd)
                throw .system("dup", err)
            }
            rootCopy = copy
        }
        let mapped = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let err = Errno(rawValue: errno)
            close(fd)
            if let rootCopy { close(rootCopy) }
            throw .system("mmap", err)
        }
        _ = cfuse_madvise(mapped, bytes, Int32(CFUSE_MADV_DONTDUMP))
        _ = cfuse_madvise(mapped, bytes, Int32(CFUSE_MADV_NOHUGEPAGE))
        self.fileDescriptor = FileDescriptor(rawValue: fd)
        self.tmpfsRoot = rootCopy.map { FileDescriptor(rawValue: $0) }
        self.backing = backing
        self.capacityPages = bytes / PageSize.bytes - 1
        self.base = mapped
        self.mappedBytes = bytes
    }

    deinit {
        munmap(base, mappedBytes)
        close(fileDescriptor.rawValue)
        if let tmpfsRoot { close(tmpfsRoot.rawValue) }
    }

    /// Maps `count` pages from `first` into this process's page tables (their data is there
    /// already): a successor's reply copied from them then never faults. The kernel fails a
    /// reply whose copy faults while its server is being killed (EIO to the caller, no resend).
    /// Only pages files hold: a read fault on a hole would allocate (and charge) a page.
    public func populate(first: UInt32, count: Int) {
        guard count > 0 else { return }
        _ = cfuse_madvise(address(of: first), count &* PageSize.bytes, Int32(CFUSE_MADV_POPULATE_READ))
    }

    @inline(__always)
    public func address(of page: UInt32) -> UnsafeMutableRawPointer {
        base + Int(page) &* PageSize.bytes
    }

    @inline(__always)
    static func offset(of page: UInt32) -> Int64 { Int64(page) &* Int64(PageSize.bytes) }

    /// Copies `length` bytes to `offset`. pwrite rather than a copy through the mapping: one
    /// syscall instead of a page fault per page, and a failure is an error, not a SIGBUS.
    func write(_ source: UnsafeRawPointer, length: Int, at offset: Int64) throws(Errno) {
        try syscalls.write(fileDescriptor.rawValue, source, length: length, at: offset)
    }

    /// Zero-fills a whole page. True only when every byte was written: the caller's proof that the
    /// page holds nothing of its last file.
    func zero(_ page: UInt32) -> Bool {
        do {
            try write(Self.zeros, length: PageSize.bytes, at: Self.offset(of: page))
            return true
        } catch {
            return false
        }
    }

    /// Frees `count` pages from `first` (their memory and their charge). True when they are holes
    /// now, which read back as zeros.
    func punch(first: UInt32, count: Int) -> Bool {
        syscalls.punch(fileDescriptor.rawValue, offset: Self.offset(of: first), length: Int64(count * PageSize.bytes))
    }

    // MARK: - Creation

    private static func openBackingFile() throws(ArenaError) -> (Int32, Backing, Int32?) {
        switch privateTmpfsFile() {
        case .success(let opened):
            return opened
        case .failure(let refused):
            // No CAP_SYS_ADMIN (a non-root mounter, a container), or a kernel before 5.2.
            let fd = cfuse_memfd_create("chargefs-arena", UInt32(CFUSE_MFD_CLOEXEC))
            guard fd >= 0 else { throw .system("memfd_create (after \(refused))", Errno(rawValue: errno)) }
            return (fd, .memfd, nil)
        }
    }

    /// A file on a new tmpfs instance: huge=never, size unlimited (the memcg is the limit), and
    /// noswap where the kernel has it. Fails with what refused it.
    private static func privateTmpfsFile() -> Result<(Int32, Backing, Int32?), ArenaError> {
        let fs = cfuse_fsopen("tmpfs", UInt32(CFUSE_FSOPEN_CLOEXEC))
        guard fs >= 0 else { return .failure(.system("fsopen(tmpfs)", Errno(rawValue: errno))) }
        defer { close(fs) }
        func set(_ key: String, _ value: String?) -> Errno? {
            let rc = value == nil
                ? cfuse_fsconfig(fs, UInt32(CFUSE_FSCONFIG_SET_FLAG), key, nil)
                : cfuse_fsconfig(fs, UInt32(CFUSE_FSCONFIG_SET_STRING), key, value)
            return rc == 0 ? nil : Errno(rawValue: errno)
        }
        // A kernel built without THP has no huge= option at all, and then no huge pages either.
        if let err = set("huge", "never"), err != .invalidArgument { return .failure(.system("fsconfig(huge=never)", err)) }
        if let err = set("size", "0") { return .failure(.system("fsconfig(size=0)", err)) }
        let noswap = set("noswap", nil) == nil  // EINVAL before 6.4
        guard cfuse_fsconfig(fs, UInt32(CFUSE_FSCONFIG_CMD_CREATE), nil, nil) == 0 else {
            return .failure(.system("fsconfig(create)", Errno(rawValue: errno)))
        }
        let mnt = cfuse_fsmount(fs, UInt32(CFUSE_FSMOUNT_CLOEXEC), UInt32(CFUSE_MOUNT_ATTR_PRIVATE_DATA))
        guard mnt >= 0 else { return .failure(.system("fsmount", Errno(rawValue: errno))) }
        let fd = cfuse_open_tmpfile(mnt, 0o600)
        guard fd >= 0 else {
            let err = Errno(rawValue: errno)
            close(mnt)
            return .failure(.system("open(O_TMPFILE)", err))
        }
        return .success((fd, .privateTmpfs(noswap: noswap), mnt))
    }

    static let shmemEnabledPath = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

    /// The host's shmem THP setting (the bracketed word), nil without THP.
    static func hostShmemHugeSetting() -> String? {
        guard let text = readSmallFile(shmemEnabledPath),
              let open = text.firstIndex(of: "["), let close = text[open...].firstIndex(of: "]") else { return nil }
        return String(text[text.index(after: open)..<close])
    }

    /// Whether the kernel gives this backing huge folios under the host setting (mm/shmem.c).
    static func hugeFoliosExpected(backing: Backing, setting: String?) -> Bool {
        switch (backing, setting) {
        case (_, "force"): true
        case (.memfd, "always"), (.memfd, "within_size"): true
        default: false
        }
    }

    /// Instantiates page 0 (never handed out) as the daemon and counts the blocks it took: the
    /// kernel's own answer, whatever its version and knobs. nil when the probe could not run.
    static func probeHugeFolios(_ fd: Int32) -> Bool? {
        let size = Int64(PageSize.bytes)
        guard cfuse_fallocate(fd, 0, 0, size) == 0 else { return nil }
        var st = stat()
        let measured = fstat(fd, &st) == 0 ? st.st_blocks > Int(size / 512) : nil
        _ = cfuse_fallocate(fd, Int32(CFUSE_FALLOC_PUNCH_HOLE | CFUSE_FALLOC_KEEP_SIZE), 0, size)
        return measured
    }

    private static func refuseHugeFolios(_ fd: Int32, backing: Backing, allow: Bool) throws(ArenaError) {
        let setting = hostShmemHugeSetting()
        let huge = probeHugeFolios(fd) ?? hugeFoliosExpected(backing: backing, setting: setting)
        guard huge else { return }
        let error = ArenaError.hugePages(backing: backing, setting: setting)
        if !allow { throw error }
        Log.line("warning: \(error) (allowed: nothing is charged to a memcg= target)")
    }

    static func swapConfigured() -> Bool {
        guard let text = readSmallFile("/proc/swaps") else { return false }
        return text.split(separator: "\n").count > 1  // a header line, then one line per swap area
    }

    private static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n >= 0 else { return nil }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }
}

/// Why the arena could not be created; each says what to change.
public enum ArenaError: Error, CustomStringConvertible, Equatable {
    case pageSize(kernel: Int)
    case hugePages(backing: Arena.Backing, setting: String?)
    case system(String, Errno)

    public var description: String {
        switch self {
        case .pageSize(let kernel):
            return "the kernel's page size is \(kernel) bytes; chargefs counts and charges in pages of \(PageSize.bytes)"
        case .hugePages(.memfd, let setting):
            return "the arena would get huge pages: without CAP_SYS_ADMIN chargefsd cannot mount its own tmpfs "
                + "(huge=never) and uses a memfd, which follows \(Arena.shmemEnabledPath) ('\(setting ?? "?")'); "
                + "run chargefsd with CAP_SYS_ADMIN (as root), or set it to never or advise"
        case .hugePages(.privateTmpfs, let setting):
            return "the arena would get huge pages: \(Arena.shmemEnabledPath) is '\(setting ?? "?")', "
                + "which overrides the arena's huge=never; set it to anything but force"
        case .system(let call, let err):
            return "cannot create the page arena: \(call): \(err)"
        }
    }
}
