import CFuse
import Glibc
import SystemPackage

/// The system calls that change the contents of a file holding pages (the arena, a backing
/// file): one write loop and one punch, each through a replaceable function, so tests can play
/// a kernel that fails them (as swift-system passes every call through one function).
struct PageFileCalls: Sendable {
    var pwrite: @Sendable (_ fd: Int32, _ source: UnsafeRawPointer, _ count: Int, _ offset: Int64) -> Int
    var fallocate: @Sendable (_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32

    static let kernel = PageFileCalls(
        pwrite: { fd, source, count, offset in Glibc.pwrite(fd, source, count, off_t(offset)) },
        fallocate: { fd, mode, offset, length in cfuse_fallocate(fd, mode, offset, length) })

    /// Copies `length` bytes to `offset`, every byte or an error (a short pwrite goes on from
    /// where it stopped; one that writes nothing is EIO).
    func write(_ fd: Int32, _ source: UnsafeRawPointer, length: Int, at offset: Int64) throws(Errno) {
        var done = 0
        while done < length {
            let n = try retryingInterrupts { pwrite(fd, source + done, length - done, offset + Int64(done)) }
            guard n > 0 else { throw .ioError }
            done += n
        }
    }

    /// Frees [offset, offset + length) (its memory and its charge; the size stays). True when
    /// the range is a hole now, which reads back as zeros.
    func punch(_ fd: Int32, offset: Int64, length: Int64) -> Bool {
        let mode = Int32(CFUSE_FALLOC_PUNCH_HOLE | CFUSE_FALLOC_KEEP_SIZE)
        return (try? retryingInterrupts { fallocate(fd, mode, offset, length) }) != nil
    }
}
