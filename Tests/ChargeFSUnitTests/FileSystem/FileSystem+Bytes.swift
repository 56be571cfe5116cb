@testable import ChargeFS

/// How the in-process tests write and read a file's bytes and see a directory's target.
extension FileSystem {
    /// Writes `bytes` at `offset` of `ino`; what `write` stored.
    func write(_ ino: InodeNumber, _ bytes: [UInt8], at offset: Int64 = 0, caller: Caller,
               request: RequestContext? = nil) throws -> Int {
        try bytes.withUnsafeBytes { try write(ino, offset: offset, data: $0, caller: caller, clearSetIDAsked: false, request: request).written }
    }

    /// Up to `count` bytes of `ino` from `offset`, read as a FUSE_READ would.
    func bytes(of ino: InodeNumber, at offset: Int64 = 0, count: Int, noatime: Bool = true) throws -> [UInt8] {
        var out: [UInt8] = []
        try read(ino, offset: offset, count: count, noatime: noatime) { vectors in
            for v in vectors { out += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len) }
        }
        return out
    }

    /// The charge target `ino` shows (user.chargefs.memcg); nil where it shows none.
    func memcgTarget(of ino: InodeNumber) -> String? {
        (try? getxattr(ino, name: FileSystem.memcgXattr)).map { String(decoding: $0, as: UTF8.self) }
    }
}
