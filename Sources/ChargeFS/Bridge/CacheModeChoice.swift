import Glibc

/// What `cache=` (automatic by default) comes to on this kernel.
///
/// `direct` needs shared mmap of direct-I/O files (FUSE_DIRECT_IO_ALLOW_MMAP, offered since 6.6),
/// but on 6.6 to 6.8 a shared-mmap store through such a file never reached the daemon (msync
/// failed with EIO) until "fuse: fix VM_MAYSHARE and direct_io_allow_mmap", in mainline 6.9.
/// Stable kernels got that fix at different points, and a release string cannot tell a patched
/// 6.6.y from an unpatched one, so the automatic choice takes `direct` only from 6.9 on; on
/// older kernels `cache=direct` can still be asked for explicitly.
enum CacheModeChoice {
    /// The first kernel with the fix in mainline.
    static let fixedIn = (major: 6, minor: 9)

    static func resolve(_ asked: FileCaching, kernelOffersMmapWithDirectIO: Bool, kernelRelease: String) -> FileCaching {
        guard asked == .automatic else { return asked }
        guard kernelOffersMmapWithDirectIO, let version = version(of: kernelRelease) else { return .page }
        return version >= fixedIn ? .direct : .page
    }

    /// "6.18.0-1-amd64" -> (6, 18); nil when unreadable.
    static func version(of release: String) -> (major: Int, minor: Int)? {
        let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        return parts.count == 2 ? (parts[0], parts[1]) : nil
    }

    static func runningKernelRelease() -> String {
        var name = utsname()
        guard uname(&name) == 0 else { return "" }
        return withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
    }
}
