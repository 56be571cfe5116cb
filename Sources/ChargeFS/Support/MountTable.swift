import Glibc

/// The kernel's mount table as /proc/self/mountinfo states it (proc(5)): one parser for every
/// caller. Fields that hold paths escape space, tab, newline and backslash as octal (\040).
public enum MountTable {
    public struct Entry: Equatable, Sendable {
        /// Field 5: where it is mounted, unescaped.
        public var mountPoint: String
        /// The first field after " - ": e.g. "fuse.chargefsd", "cgroup2".
        public var fileSystemType: String
        /// The field after the type, unescaped.
        public var source: String
        /// Field 4: the root of the mount within its file system, unescaped.
        public var root: String
    }

    /// The entries of `text` (mountinfo's format); malformed lines are skipped.
    public static func parse(_ text: String) -> [Entry] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            // Optional fields end at "-"; the id, parent, major:minor, root and mount point come first.
            guard fields.count >= 7, let dash = fields[6...].firstIndex(of: "-"), dash + 2 < fields.count else { return nil }
            return Entry(mountPoint: unescape(fields[4]), fileSystemType: String(fields[dash + 1]),
                         source: unescape(fields[dash + 2]), root: unescape(fields[3]))
        }
    }

    /// This process's mount table now; empty when /proc is not there.
    public static func current() -> [Entry] {
        guard let file = fopen("/proc/self/mountinfo", "r") else { return [] }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, file)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return parse(String(decoding: bytes, as: UTF8.self))
    }

    /// Undoes mountinfo's octal escapes.
    public static func unescape(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        var chars = Array(field.utf8)[...]
        while let c = chars.first {
            chars = chars.dropFirst()
            if c == UInt8(ascii: "\\"), chars.count >= 3,
               let v = UInt8(String(decoding: chars.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(v)
                chars = chars.dropFirst(3)
            } else {
                bytes.append(c)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// `text` with control characters shown as "?": what a user typed (or a file held) goes into
/// one line of a terminal or the log, and must not move the cursor or forge another line.
public func printable(_ text: String) -> String {
    String(String.UnicodeScalarView(text.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7f ? "?" : $0 }))
}
