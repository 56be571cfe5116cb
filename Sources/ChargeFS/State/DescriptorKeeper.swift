import Glibc
import Synchronization
import SystemPackage

/// Which of a mount's descriptors a keeper holds.
public enum KeptDescriptor: Hashable, Sendable {
    case arena
    /// The arena's private tmpfs (new backing files are made there).
    case arenaRoot
    case journal
    case checkpoint(Int)
    /// A large file's backing file, by the id its inode's records name.
    case backingFile(UInt64)
}

/// Who holds the descriptors while no server does: the keeper process (a later step: it gets
/// each one over SCM_RIGHTS), or `InProcessKeeper` (tests, and a takeover inside one process).
/// `keep` must hold its own reference (a duplicate), so that the server's close changes nothing.
public protocol DescriptorKeeper: AnyObject, Sendable {
    func keep(_ fd: FileDescriptor, as what: KeptDescriptor) throws(StateError)
    /// Closes its copy (a backing file freed).
    func forget(_ what: KeptDescriptor)
    /// Its copy, still owned by the keeper (the taker duplicates what it keeps).
    func descriptor(_ what: KeptDescriptor) -> FileDescriptor?
    /// The ids of the backing files it holds (a successor lets go of those no inode names).
    var backingFileIDs: [UInt64] { get }
}

/// A keeper inside this process: duplicates in a table.
public final class InProcessKeeper: DescriptorKeeper {
    private let table = Mutex<[KeptDescriptor: Int32]>([:])

    public init() {}

    deinit {
        table.withLock { t in for fd in t.values { close(fd) } }
    }

    public func keep(_ fd: FileDescriptor, as what: KeptDescriptor) throws(StateError) {
        let copy = fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw .system("dup", errno) }
        let old = table.withLock { t in t.updateValue(copy, forKey: what) }
        if let old { close(old) }
    }

    public func forget(_ what: KeptDescriptor) {
        if let fd = table.withLock({ t in t.removeValue(forKey: what) }) { close(fd) }
    }

    public func descriptor(_ what: KeptDescriptor) -> FileDescriptor? {
        table.withLock { t in t[what].map { FileDescriptor(rawValue: $0) } }
    }

    public var backingFileIDs: [UInt64] {
        table.withLock { t in t.keys.compactMap { if case .backingFile(let id) = $0 { id } else { nil } } }
    }

    /// Descriptors held now (tests: nothing leaks).
    public var count: Int { table.withLock { $0.count } }
}
