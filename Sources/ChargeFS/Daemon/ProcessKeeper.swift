import CKeeper
import Glibc
import Synchronization
import SystemPackage

/// The keeper process (chargefs-keeper) as a `DescriptorKeeper`: each descriptor is sent to it
/// over the server's socket (SCM_RIGHTS) as it is made, and forgotten there as it goes; the
/// keeper holds its own reference. A successor gets everything the keeper holds at its start
/// (`receive`), which answers `descriptor(_:)` during the takeover.
final class ProcessKeeper: DescriptorKeeper, @unchecked Sendable {
    let socket: Int32
    /// Serialises sends (the file system sends under its own lock; the daemon from its thread).
    private let sending = Mutex(())
    /// What the keeper handed a successor: files by name, and values (CKeeper.h's kinds).
    private let received = Mutex<[KeptDescriptor: Int32]>([:])
    private(set) var devFuse: Int32?
    private(set) var values: [UInt32: UInt64] = [:]

    init(socket: Int32) { self.socket = socket }

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

    private func send(op: Int, kind: UInt32, id: UInt64 = 0, value: UInt64 = 0, fd: Int32 = -1) -> Int32 {
        var message = ckeeper_msg(op: UInt32(op), kind: kind, id: id, value: value)
        return sending.withLock { _ in ckeeper_send(socket, &message, fd) }
    }

    func keep(_ fd: FileDescriptor, as what: KeptDescriptor) throws(StateError) {
        let (kind, id) = Self.code(what)
        let r = send(op: CKEEPER_KEEP, kind: kind, id: id, fd: fd.rawValue)
        if r < 0 { throw .system("sending a file to the keeper", -r) }
    }

    func forget(_ what: KeptDescriptor) {
        let (kind, id) = Self.code(what)
        _ = send(op: CKEEPER_FORGET, kind: kind, id: id)
    }

    func descriptor(_ what: KeptDescriptor) -> FileDescriptor? {
        received.withLock { $0[what].map { FileDescriptor(rawValue: $0) } }
    }

    /// Hands the keeper the mount's /dev/fuse file (the same open file: never a clone).
    func keepDevFuse(_ fd: Int32) -> Int32 { send(op: CKEEPER_KEEP, kind: UInt32(CKEEPER_DEV_FUSE), fd: fd) }

    /// A value the keeper keeps for successors (the connection's device, the arena's backing).
    func set(_ kind: Int, _ value: UInt64) { _ = send(op: CKEEPER_SET, kind: UInt32(kind), value: value) }

    /// Tells the keeper this server serves now (`startMicroseconds`: its own start).
    func serving(startMicroseconds: UInt64) { _ = send(op: CKEEPER_SERVING, kind: 0, value: startMicroseconds) }

    /// A successor's start: everything the keeper holds, up to its END message.
    static func receive(socket: Int32) throws(StateError) -> ProcessKeeper {
        let keeper = ProcessKeeper(socket: socket)
        while true {
            var message = ckeeper_msg()
            var fd: Int32 = -1
            let r = ckeeper_recv(socket, &message, &fd)
            guard r > 0 else { throw r == 0 ? .corrupt("the keeper closed its socket before handing everything over") : .system("recvmsg from the keeper", -r) }
            switch Int(message.op) {
            case CKEEPER_END: return keeper
            case CKEEPER_SET: keeper.values[message.kind] = message.value
            case CKEEPER_KEEP where fd >= 0:
                if message.kind == UInt32(CKEEPER_DEV_FUSE) {
                    keeper.devFuse = fd
                } else if let name = name(kind: message.kind, id: message.id) {
                    keeper.received.withLock { _ = $0.updateValue(fd, forKey: name).map { close($0) } }
                } else {
                    close(fd)
                }
            default:
                if fd >= 0 { close(fd) }
            }
        }
    }

    /// Closes the copies received at the takeover (the new file system duplicated what it kept).
    func releaseReceived() {
        received.withLock { table in
            for fd in table.values { close(fd) }
            table = [:]
        }
    }
}
