/// A volume's attributes from the pod spec (volumeAttributes), checked and normalised into the
/// chargefsd mount options they become.
struct VolumeAttributes: Codable, Equatable, Sendable {
    /// Bytes (size= of chargefsd), nil for chargefsd's default (half of RAM, and never more than
    /// the pod's headroom).
    var sizeBytes: Int64?
    var nrInodes: Int64?
    /// Octal permissions of the volume's root, 1777 by default: like a memory emptyDir, any
    /// container uid (runAsUser, fsGroup) can create files, and the sticky bit keeps them
    /// from deleting each other's.
    var mode: String = "1777"
    /// direct unless the pod asks for page. With page, each container that writes is charged
    /// for its page-cache copy on top of the pod's charge for the stored page, and a writer
    /// inside the pod is OOM-killed at the pod's limit before chargefsd can answer ENOSPC
    /// (measured on 6.1: a 1 MiB-block fill got 17 OOM kills in User-Mode Linux, a kill on
    /// Debian 12's kernel in QEMU). With direct, no writer is OOM-killed for the volume's pages
    /// on any kernel; what it costs is shared mmap before Linux 6.9: chargefsd asks the kernel
    /// for shared mappings of direct-I/O files (FUSE_DIRECT_IO_ALLOW_MMAP) only from 6.9, since
    /// on 6.6-6.8 a store through one could vanish (msync EIO) unless the stable kernel has the
    /// fix, so there mmap(MAP_SHARED) of a volume's file fails at once with ENODEV (checked on
    /// 6.1); read, write and private mappings work on every kernel. chargefsd's own default is
    /// direct too: the attribute is passed so that the volume does not depend on it.
    var cache: String = "direct"
    /// chargefsd -o takeover (a keeper restarts a killed or crashed daemon; the volume keeps its
    /// files): on unless the pod says `takeover: "false"`. nil when the pod does not say, so that
    /// a record written before the attribute existed still equals a request without it.
    var takeover: Bool? = nil

    static let known = ["size", "nr_inodes", "mode", "cache", "takeover"]
    /// Keys the kubelet adds itself (podInfoOnMount, ephemeral); they are not attributes.
    static let kubeletPrefix = "csi.storage.k8s.io/"

    /// Parses volume_context; throws INVALID_ARGUMENT naming the first bad attribute.
    static func parse(_ context: [String: String]) throws(CSIError) -> VolumeAttributes {
        var a = VolumeAttributes()
        for key in context.keys.sorted() {
            guard let value = context[key] else { continue }
            if key.hasPrefix(kubeletPrefix) { continue }
            switch key {
            case "size":
                guard let b = Quantity.bytes(value) else {
                    throw CSIError(.invalidArgument, "volume attribute size: \"\(value)\" is not a byte quantity (e.g. 64Mi, 1Gi, 500M, 1048576)")
                }
                a.sizeBytes = b
            case "nr_inodes":
                guard let n = Quantity.bytes(value) else {
                    throw CSIError(.invalidArgument, "volume attribute nr_inodes: \"\(value)\" is not a non-negative count (e.g. 10000, 1M)")
                }
                a.nrInodes = n
            case "mode":
                guard (3...4).contains(value.count), value.allSatisfy({ ("0"..."7").contains($0) }),
                      let m = Int(value, radix: 8), m <= 0o7777 else {
                    throw CSIError(.invalidArgument, "volume attribute mode: \"\(value)\" is not an octal mode (e.g. 1777, 0770)")
                }
                a.mode = String(m, radix: 8)
            case "cache":
                guard value == "direct" || value == "page" else {
                    throw CSIError(.invalidArgument, "volume attribute cache: \"\(value)\" is neither direct nor page")
                }
                a.cache = value
            case "takeover":
                guard value == "true" || value == "false" else {
                    throw CSIError(.invalidArgument, "volume attribute takeover: \"\(value)\" is neither true nor false")
                }
                a.takeover = value == "true"
            default:
                throw CSIError(.invalidArgument, "unknown volume attribute \"\(key)\" (known: \(known.joined(separator: ", ")))")
            }
        }
        return a
    }

    /// chargefsd -o options for these attributes (memcg= and allow_other are added by the caller).
    var mountOptions: [String] {
        var o: [String] = []
        if let s = sizeBytes { o.append("size=\(s)") }
        if let n = nrInodes { o.append("nr_inodes=\(n)") }
        o.append("mode=\(mode)")
        o.append("cache=\(cache)")
        if takeover != false { o.append("takeover") }
        return o
    }
}
