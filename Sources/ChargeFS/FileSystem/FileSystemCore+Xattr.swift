import CFuse
import Glibc
import SystemPackage

/// Extended attributes, in the user., trusted. and security. namespaces as tmpfs keeps them.
extension FileSystemCore {
    static let xattrNamespaces: [[UInt8]] = ["user.", "trusted.", "security."].map { Array($0.utf8) }

    private static func checkName(_ name: FileName) throws(Errno) {
        if name.count > FileSystem.xattrNameMax { throw .outOfRange }
        if Self.xattrNamespaces.contains(name) { throw .invalidArgument }  // "user." alone
        guard Self.xattrNamespaces.contains(where: { name.starts(with: $0) && name.count > $0.count }) else {
            throw .notSupported
        }
    }

    func setxattr(_ ino: InodeNumber, name: FileName, value: [UInt8], flags: XattrFlags, caller: Caller) throws(Errno) {
        let inode = try inode(ino)
        try Self.checkName(name)
        if value.count > FileSystem.xattrSizeMax { throw .argListTooLong }
        if name == FileSystem.memcgXattr { return try setTarget(inode, value: value, flags: flags, caller: caller) }
        if ino == FileSystem.rootIno && (name == FileSystem.statusXattr || name == FileSystem.requestsXattr || name == FileSystem.sharesXattr) { throw .notPermitted }
        let exists = inode.xattrs?[name] != nil
        if flags.contains(.create) && exists { throw .fileExists }
        if flags.contains(.replace) && !exists { throw .noData }
        if inode.xattrs == nil { inode.xattrs = [:] }
        inode.xattrs?[name] = value
        inode.ctime = .now
    }

    static let capabilityXattr = Array("security.capability".utf8)

    func removeFileCapabilities(_ inode: Inode) {
        guard inode.xattrs?[Self.capabilityXattr] != nil else { return }
        inode.xattrs?[Self.capabilityXattr] = nil
        if inode.xattrs?.isEmpty == true { inode.xattrs = nil }
    }

    /// `caching`: the mount's resolved cache mode, which the status attribute shows.
    func getxattr(_ ino: InodeNumber, name: FileName, caching: FileCaching, passthrough: Bool) throws(Errno) -> [UInt8] {
        let inode = try inode(ino)
        if name.count > FileSystem.xattrNameMax { throw .outOfRange }
        if ino == FileSystem.rootIno && name == FileSystem.statusXattr { return Array(statusText(caching: caching, passthrough: passthrough).utf8) }
        if ino == FileSystem.rootIno && name == FileSystem.sharesXattr { return try sharesText() }
        if name == FileSystem.memcgXattr { return try effectiveTarget(inode) }
        guard let value = inode.xattrs?[name] else {
            try Self.checkName(name)
            throw .noData
        }
        return value
    }

    func listxattr(_ ino: InodeNumber) throws(Errno) -> [UInt8] {
        let inode = try inode(ino)
        var list: [UInt8] = []
        let own = inode.ownsTarget ? [FileSystem.memcgXattr] : []
        for name in own + ((inode.xattrs?.keys.sorted { $0.lexicographicallyPrecedes($1) }) ?? []) {
            list += name
            list.append(0)
        }
        return list
    }

    func removexattr(_ ino: InodeNumber, name: FileName, caller: Caller) throws(Errno) {
        let inode = try inode(ino)
        try Self.checkName(name)
        if name == FileSystem.memcgXattr { return try removeTarget(inode, caller: caller) }
        guard inode.xattrs?.removeValue(forKey: name) != nil else { throw .noData }
        if inode.xattrs?.isEmpty == true { inode.xattrs = nil }
        inode.ctime = .now
    }

    /// What `getfattr -n user.chargefs.status MOUNTPOINT` shows of the tree: who pays, and how
    /// much (the transport adds its own line, `transport=`).
    func statusText(caching: FileCaching, passthrough: Bool) -> String {
        let page = Int64(PageSize.bytes)
        let used = Int64(store.pagesInUse) * page
        let charged = Int64(store.pagesCharged) * page
        var lines = [
            "charger=\(store.chargeSummary)",
            "stored_bytes=\(used)",
            "charged_bytes=\(charged)",
            "size_limit_bytes=\(config.maxBytes.map(String.init) ?? "unlimited")",
            "cache=\(caching.rawValue)",
            "passthrough=\(passthrough ? "on" : "off")",
            "backing_files=\(backingFiles)",
        ]
        if let headroom = store.availableBytes() {
            lines.append("cgroup_headroom_bytes=\(max(0, headroom))")
        }
        let usage = usage()
        lines.append("effective_limit_bytes=\(usage.totalPages * page)")
        lines.append("available_bytes=\(usage.freePages * page)")
        // One line per directory's own target in use: who pays below it, and how much room it has.
        for t in store.directoryTargets {
            var line = "dir_target=\(t.key) charged_bytes=\(Int64(t.chargedPages) * page)"
            line += " limit_bytes=\(t.charger.limitBytes().map(String.init) ?? "unlimited")"
            if let headroom = t.charger.availableBytes() { line += " headroom_bytes=\(max(0, headroom))" }
            lines.append(line)
        }
        return lines.joined(separator: "\n") + "\n"
    }
}
