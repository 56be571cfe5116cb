import CFuse
import Glibc
import Synchronization
import SystemPackage

/// The backing files registered with the kernel for FUSE passthrough (FUSE_DEV_IOC_BACKING_OPEN),
/// one slot per inode: the backing id its passthrough opens name, and how many of those opens
/// the kernel holds. Registered at the first of them, closed (FUSE_DEV_IOC_BACKING_CLOSE) at
/// the release of the last: the kernel refuses a second, different registration of one inode
/// while any exist, and a registration lives as long as the FUSE connection (a killed daemon's
/// outlive it until the unmount).
///
/// The Bridge owns this state: the file system only says which file an open may pass through,
/// and the ioctls run under this table's own lock, never under the tree's, nor from a deinit.
/// Slots are keyed by inode number, not by object, so a successor daemon that takes the
/// connection over can be handed the ids the kernel still holds.
final class PassthroughRegistry: Sendable {
    /// A /dev/fuse fd of our own (a dup): the session's may be closed and its number reused
    /// before the last registration goes, and an ioctl on a stranger's fd must never happen.
    final class Device: Sendable {
        let fd: Int32
        init?(sessionFD: Int32) {
            let copy = fcntl(sessionFD, F_DUPFD_CLOEXEC, 3)
            guard copy >= 0 else { return nil }
            fd = copy
        }
        deinit { close(fd) }
    }

    private struct Slot {
        let id: Int32
        var opens: Int
    }

    private let device: Device
    private let slots = Mutex<[InodeNumber: Slot]>([:])

    init(device: Device) { self.device = device }

    /// A successor's registry: the registrations a dead server made on this connection, which
    /// the kernel still holds (`FileSystem.passthroughRegistrations`), each with its live opens,
    /// so that their releases close them and new opens of those inodes name the same ids.
    init(device: Device, adopting registrations: [InodeNumber: (id: Int32, opens: UInt32)]) {
        self.device = device
        slots.withLock { slots in
            for (ino, r) in registrations where r.id > 0 && r.opens > 0 { slots[ino] = Slot(id: r.id, opens: Int(r.opens)) }
        }
    }

    /// The backing id for a passthrough open of `ino` served from `file`, registering it at the
    /// first such open; the errno when the kernel refuses (EPERM without CAP_SYS_ADMIN in the
    /// initial namespace, ...). Each success must be matched by one `released(_:)`.
    func opened(_ ino: InodeNumber, file: PassthroughFile) -> Result<Int32, Errno> {
        slots.withLock { slots -> Result<Int32, Errno> in
            if let slot = slots[ino] {
                slots[ino]?.opens = slot.opens + 1
                return .success(slot.id)
            }
            let id = cfuse_backing_open(device.fd, file.fileDescriptor.rawValue)
            guard id > 0 else { return .failure(Errno(rawValue: -id)) }
            slots[ino] = Slot(id: id, opens: 1)
            return .success(id)
        }
    }

    /// A passthrough open of `ino` was released: the kernel let go of the backing file with
    /// the last one (before it sent the release), and so does its registration now.
    func released(_ ino: InodeNumber) {
        slots.withLock { slots in
            guard let slot = slots[ino] else { return }
            if slot.opens > 1 {
                slots[ino]?.opens = slot.opens - 1
                return
            }
            slots[ino] = nil
            _ = cfuse_backing_close(device.fd, slot.id)
        }
    }

    /// Inodes with a registration now (tests, and what a successor would be handed).
    var registered: [InodeNumber: Int32] { slots.withLock { $0.mapValues(\.id) } }
}
