import CFuse
import Glibc
import SystemPackage

/// A backing file registered with the kernel for FUSE passthrough (FUSE_DEV_IOC_BACKING_OPEN):
/// the id an open reply names. One per backing file while it has passthrough opens (the kernel
/// refuses a second, different registration of one inode's backing while any exist), made at
/// the first of them and closed after the last (the file system drops it), or with the file.
final class PassthroughRegistration {
    /// A /dev/fuse fd of our own (a dup): the session's may be closed and its number reused
    /// before the last registration goes, and an ioctl on a stranger's fd must never happen.
    final class Device: @unchecked Sendable {
        let fd: Int32
        init?(sessionFD: Int32) {
            let copy = fcntl(sessionFD, F_DUPFD_CLOEXEC, 3)
            guard copy >= 0 else { return nil }
            fd = copy
        }
        deinit { close(fd) }
    }

    let device: Device
    let id: Int32

    private init(device: Device, id: Int32) {
        self.device = device
        self.id = id
    }

    deinit { _ = cfuse_backing_close(device.fd, id) }

    /// The backing id for `file`, registering it on first use; nil (with the errno) when the
    /// kernel refuses (EPERM without CAP_SYS_ADMIN in the initial namespace, ...).
    static func id(for file: BackingFile, device: Device) -> Result<Int32, Errno> {
        file.registration.withLock { (registration: inout AnyObject?) -> Result<Int32, Errno> in
            if let existing = registration as? PassthroughRegistration { return .success(existing.id) }
            let id = cfuse_backing_open(device.fd, file.fileDescriptor.rawValue)
            guard id > 0 else { return .failure(Errno(rawValue: -id)) }
            registration = PassthroughRegistration(device: device, id: id)
            return .success(id)
        }
    }
}
