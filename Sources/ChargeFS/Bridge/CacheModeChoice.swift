import Glibc

/// What `cache=` comes to on this kernel, and whether shared mappings of direct-I/O files are
/// asked for.
///
/// The automatic choice is `direct` on every kernel. With `page`, a writer's copy in the FUSE page
/// cache is charged to the writer's own cgroup on top of the target's charge for the stored page.
/// When the writer sits inside the target (a pod's container writing to the pod's volume) the pod
/// pays twice (49 MiB for 24 MiB stored, in charge.sh's pod test), and the kernel, not chargefsd,
/// decides what happens at the limit: an OOM kill of the writer was reported on Debian 12's 6.1
/// kernel (docs/testing.md has what our runs there showed). chargefs exists to prevent that.
///
/// What `direct` costs on older kernels is shared mmap. Shared mappings of direct-I/O files need
/// FUSE_DIRECT_IO_ALLOW_MMAP (6.6), and on 6.6 to 6.8 a store through such a mapping never
/// reached the daemon (msync failed with EIO) until "fuse: fix VM_MAYSHARE and
/// direct_io_allow_mmap", in mainline 6.9. A release string cannot tell a patched 6.6.y from an
/// unpatched one, so the flag is asked for only from 6.9 on: before that `mmap(MAP_SHARED)` fails
/// at once with ENODEV, where a store that vanishes at msync would be worse. `cache=page` is there
/// for a mount that needs shared mmap on such a kernel and has no writer inside its target.
enum CacheModeChoice {
    /// The first kernel with the fix in mainline.
    static let fixedIn = (major: 6, minor: 9)

    static func resolve(_ asked: FileCaching) -> FileCaching {
        asked == .automatic ? .direct : asked
    }

    /// Whether to ask for FUSE_DIRECT_IO_ALLOW_MMAP (when the kernel offers it).
    static func mapsDirectIOShared(kernelRelease: String) -> Bool {
        guard let version = version(of: kernelRelease) else { return false }
        return version >= fixedIn
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
