// What the in-process passthrough tests (BackingFileTests, MappedFileTests) share: a file system
// made as the daemon makes one (cache=direct), files written whole, and a file's bytes as the
// daemon reads them and as the kernel would through the backing file.

import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// A 1 GiB file system with `cache=direct` on `store` (by default a new one charging in this
/// process), whose kernel took passthrough at INIT or not; `mapped`: the mapped-file rule.
func passthroughFS(passthrough: Bool = true, mapped: Bool = true, store: sending PageStore? = nil) throws -> FileSystem {
    var config = FileSystemConfig()
    config.maxBytes = 1 << 30
    config.caching = .direct
    config.mappedPassthrough = mapped
    let fs = FileSystem(config: config, store: try store ?? PageStore { DaemonCharger(arena: $0) })
    fs.resolveCaching(.direct)
    fs.noteKernelPassthrough(passthrough)
    return fs
}

/// What the kernel would read through passthrough: the backing file itself.
func backingContents(_ file: PassthroughFile) -> [UInt8] {
    var st = stat()
    guard fstat(file.fileDescriptor.rawValue, &st) == 0 else { return [] }
    var out = [UInt8](repeating: 0, count: Int(st.st_size))
    let n = out.withUnsafeMutableBytes { pread(file.fileDescriptor.rawValue, $0.baseAddress, $0.count, 0) }
    return Array(out.prefix(max(0, n)))
}

extension FileSystem {
    /// Creates `name` in `parent` holding `bytes`, closed again.
    func createFile(_ name: String, in parent: InodeNumber = .root, mode: ChargeFS.FileMode = 0o100644, bytes: [UInt8],
                    caller: Caller) throws -> InodeNumber {
        let ino = try create(parent: parent, name: Array(name.utf8), mode: mode, caller: caller).ino
        if !bytes.isEmpty {
            let n = try bytes.withUnsafeBytes { try write(ino, offset: 0, data: $0, caller: caller, clearSetIDAsked: false).written }
            XCTAssertEqual(n, bytes.count)
        }
        release(ino)
        return ino
    }

    /// Every byte of `ino`, read through the daemon.
    func contents(_ ino: InodeNumber) throws -> [UInt8] {
        let size = Int(try getattr(ino).size)
        var out: [UInt8] = []
        try read(ino, offset: 0, count: size, noatime: true) { vectors in
            for v in vectors { out += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len) }
        }
        return out
    }

    /// The `backing_files=` count of the root's status attribute.
    func backingFileCount() throws -> Int? {
        let status = String(decoding: try getxattr(.root, name: FileSystem.statusXattr), as: UTF8.self)
        return status.split(separator: "\n").first { $0.hasPrefix("backing_files=") }.flatMap { Int($0.dropFirst(14)) }
    }
}
