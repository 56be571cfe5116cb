import CKeeper
import Glibc
import Synchronization
import SystemPackage

/// The keeper process (chargefs-keeper) as a `DescriptorKeeper`: each descriptor is sent to it
/// over the server's socket (SCM_RIGHTS) as it is made, and forgotten there as it goes; the
/// keeper holds its own reference. The server keeps a duplicate of each too, so that it can hand
/// everything to a new keeper if this one dies (`replace`). A successor gets everything the
/// keeper holds at its start (`receive`), which also answers `descriptor(_:)` during the takeover.
final class ProcessKeeper: DescriptorKeeper, @unchecked Sendable {
    private struct Link {
        var socket: Int32
        var pid: pid_t
        /// Every file the keeper holds (our duplicates), /dev/fuse under `devFuseName`, and values.
        var held: [KeptDescriptor: Int32] = [:]
        var devFuse: Int32 = -1
        var values: [UInt32: UInt64] = [:]
    }

    /// Everything under one lock: a send and the table change it reflects are one step, so a new
    /// keeper is handed exactly what the old one held.
    private let link: Mutex<Link>

    init(socket: Int32, pid: pid_t) { link = Mutex(Link(socket: socket, pid: pid)) }

    /// The keeper's pid now.
    var pid: pid_t { link.withLock { $0.pid } }
    /// /dev/fuse as received by a successor (-1: none).
    var devFuse: Int32? { link.withLock { $0.devFuse >= 0 ? $0.devFuse : nil } }
    /// The values the keeper handed a successor (CKeeper.h's kinds).
    var values: [UInt32: UInt64] { link.withLock { $0.values } }

    static func code(_ what: KeptDescriptor) -> (kind: UInt32, id: UInt64) {
        switch what {
        case .arena: (UInt32(CKEEPER_ARENA), 0)
        case .arenaRoot: (UInt32(CKEEPER_ARENA_ROOT), 0)
        case .journal: (UInt32(CKEEPER_JOURNAL), 0)
        case .checkpoint(let i): (UInt32(CKEEPER_CHECKPOINT), UInt64(i))
        case .backingFile(let id): (UInt32(CKEEPER_BACKING), id)
        }
    }

    static func name(kind: UInt32, id: UInt64) -> KeptDescriptor? {
        switch Int(kind) {
        case Int(CKEEPER_ARENA): .arena
        case Int(CKEEPER_ARENA_ROOT): .arenaRoot
        case Int(CKEEPER_JOURNAL): .journal
        case Int(CKEEPER_CHECKPOINT): .checkpoint(Int(id))
        case Int(CKEEPER_BACKING): .backingFile(id)
        default: nil
        }
    }

    private static func send(_ socket: Int32, op: Int, kind: UInt32, id: UInt64 = 0, value: UInt64 = 0, fd: Int32 = -1) -> Int32 {
        var message = ckeeper_msg(op: UInt32(op), kind: kind, id: id, value: value)
        return ckeeper_send(socket, &message, fd)
    }

    func keep(_ fd: FileDescriptor, as what: KeptDescriptor) throws(StateError) {
        let (kind, id) = Self.code(what)
        let copy = fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw .system("dup", errno) }
        let r = link.withLock { l in
            if let old = l.held.updateValue(copy, forKey: what) { close(old) }
            return Self.send(l.socket, op: CKEEPER_KEEP, kind: kind, id: id, fd: copy)
        }
        if r < 0 { throw .system("sending a file to the keeper", -r) }
    }

    func forget(_ what: KeptDescriptor) {
        let (kind, id) = Self.code(what)
        link.withLock { l in
            if let old = l.held.removeValue(forKey: what) { close(old) }
            _ = Self.send(l.socket, op: CKEEPER_FORGET, kind: kind, id: id)
        }
    }

    func descriptor(_ what: KeptDescriptor) -> FileDescriptor? {
        link.withLock { $0.held[what].map { FileDescriptor(rawValue: $0) } }
    }

    var backingFileIDs: [UInt64] {
        link.withLock { l in l.held.keys.compactMap { if case .backingFile(let id) = $0 { id } else { nil } } }
    }

    /// Hands the keeper the mount's /dev/fuse file (the same open file: never a clone).
    func keepDevFuse(_ fd: Int32) -> Int32 {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { return -errno }
        return link.withLock { l in
            if l.devFuse >= 0 { close(l.devFuse) }
            l.devFuse = copy
            return Self.send(l.socket, op: CKEEPER_KEEP, kind: UInt32(CKEEPER_DEV_FUSE), fd: copy)
        }
    }

    /// A value the keeper keeps for successors (the connection's number, the arena's backing).
    func set(_ kind: Int, _ value: UInt64) {
        link.withLock { l in
            l.values[UInt32(kind)] = value
            _ = Self.send(l.socket, op: CKEEPER_SET, kind: UInt32(kind), value: value)
        }
    }

    /// Tells the keeper this server serves now (`startMicroseconds`: its own start).
    func serving(startMicroseconds: UInt64) {
        link.withLock { l in _ = Self.send(l.socket, op: CKEEPER_SERVING, kind: 0, value: startMicroseconds) }
    }

    /// Tells the keeper this server exits 0 next (a keeper we restarted cannot see our status).
    func bye() {
        link.withLock { l in _ = Self.send(l.socket, op: CKEEPER_BYE, kind: 0) }
    }

    /// Tells the keeper this server exits `CKEEPER_EXIT_HANDED_OVER` next (an upgrade).
    func handedOver() {
        link.withLock { l in _ = Self.send(l.socket, op: CKEEPER_BYE, kind: 0, value: UInt64(CKEEPER_EXIT_HANDED_OVER)) }
    }

    /// A new keeper in place of a dead one: everything held is sent to it. Returns how many
    /// files it was handed, or -errno.
    func replace(socket: Int32, pid: pid_t) -> Int {
        link.withLock { l in
            close(l.socket)
            l.socket = socket
            l.pid = pid
            var count = 0
            if l.devFuse >= 0 {
                let r = Self.send(socket, op: CKEEPER_KEEP, kind: UInt32(CKEEPER_DEV_FUSE), fd: l.devFuse)
                if r < 0 { return Int(r) }
                count += 1
            }
            for (what, fd) in l.held {
                let (kind, id) = Self.code(what)
                let r = Self.send(socket, op: CKEEPER_KEEP, kind: kind, id: id, fd: fd)
                if r < 0 { return Int(r) }
                count += 1
            }
            for (kind, value) in l.values where kind != UInt32(CKEEPER_KEEPER_PID) {
                _ = Self.send(socket, op: CKEEPER_SET, kind: kind, value: value)
            }
            return count
        }
    }

    /// A successor's start: everything the keeper holds, up to its END message.
    static func receive(socket: Int32) throws(StateError) -> ProcessKeeper {
        var l = Link(socket: socket, pid: getppid())
        while true {
            var message = ckeeper_msg()
            var fd: Int32 = -1
            let r = ckeeper_recv(socket, &message, &fd)
            guard r > 0 else {
                for fd in l.held.values { close(fd) }
                throw r == 0 ? .corrupt("the keeper closed its socket before handing everything over") : .system("recvmsg from the keeper", -r)
            }
            switch Int(message.op) {
            case CKEEPER_END:
                if let pid = l.values[UInt32(CKEEPER_KEEPER_PID)] { l.pid = pid_t(truncatingIfNeeded: pid) }
                let keeper = ProcessKeeper(socket: socket, pid: l.pid)
                keeper.link.withLock { $0 = l }
                return keeper
            case CKEEPER_SET: l.values[message.kind] = message.value
            case CKEEPER_KEEP where fd >= 0:
                if message.kind == UInt32(CKEEPER_DEV_FUSE) {
                    if l.devFuse >= 0 { close(l.devFuse) }
                    l.devFuse = fd
                } else if let name = name(kind: message.kind, id: message.id) {
                    if let old = l.held.updateValue(fd, forKey: name) { close(old) }
                } else {
                    close(fd)
                }
            default:
                if fd >= 0 { close(fd) }
            }
        }
    }
}
