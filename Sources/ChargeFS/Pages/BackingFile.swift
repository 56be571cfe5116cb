import CFuse
import Glibc
import SystemPackage

/// A large file's data in a file of its own on the arena's tmpfs, at the file's own offsets, so
/// that FUSE passthrough can let the kernel read it without a round trip to the daemon.
///
/// Made by the charger (for a memcg= target: by the charge helper inside the target, so the
/// inode, dentry and file are the target's too), charged range by range like the arena
/// (`PageCharger.charge(file:)`, FALLOC_FL_KEEP_SIZE), kept exactly as long as the file's size
/// (a passthrough read stops at the backing file's size). Dropped, it is closed, not emptied: a
/// mapping of it that outlives the file's last open and its unlink keeps working, as a mapping
/// of an unlinked tmpfs file does, and its pages go (and their charge) when the mapping does.
public final class BackingFile: @unchecked Sendable {
    public let fileDescriptor: FileDescriptor
    /// Bumped (under the tree's lock) whenever pages of the file are freed: a charge picked
    /// before then cannot tell which of its pages still exist.
    public internal(set) var shrinks: UInt64 = 0
    /// Pages below this index past the file's end were charged ahead of appends (under the
    /// tree's lock): given back at the file's last close unless it grew into them. 0: none.
    var aheadEnd = 0
    /// Its name in the kept state (0: not recorded yet): the keeper holds it under this id.
    public internal(set) var stateID: UInt64 = 0

    /// The system calls that change its contents, replaceable by tests to inject failures.
    var syscalls = PageFileCalls.kernel
    /// The page store's target whose charger made it and charges its pages (0: the mount's).
    public let target: Int

    init(_ fd: FileDescriptor, target: Int = 0) {
        fileDescriptor = fd
        self.target = target
    }

    deinit { close(fileDescriptor.rawValue) }

    /// Copies `length` bytes to `offset`. The pages must be charged already (a hole written here
    /// would be charged to the daemon).
    func write(_ source: UnsafeRawPointer, length: Int, at offset: Int64) throws(Errno) {
        try syscalls.write(fileDescriptor.rawValue, source, length: length, at: offset)
    }

    /// Reads up to `length` bytes at `offset`; holes read as zeros and allocate nothing (tmpfs
    /// copies its zero page for them). Returns the bytes read (fewer only at the end of file).
    func read(into buffer: UnsafeMutableRawPointer, length: Int, at offset: Int64) throws(Errno) -> Int {
        var done = 0
        while done < length {
            let n = try retryingInterrupts { pread(fileDescriptor.rawValue, buffer + done, length - done, off_t(offset + Int64(done))) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Frees the pages of [offset, offset + length) (their memory and their charge); false when
    /// the kernel would not (they are still there, and still charged).
    func punch(offset: Int64, length: Int64) -> Bool {
        syscalls.punch(fileDescriptor.rawValue, offset: offset, length: length)
    }

    /// Follows the file's size; shrinking frees the pages past it.
    func setSize(_ size: Int64) throws(Errno) {
        _ = try retryingInterrupts { ftruncate(fileDescriptor.rawValue, off_t(size)) }
    }
}
