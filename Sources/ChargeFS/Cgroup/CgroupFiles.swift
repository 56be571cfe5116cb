import Glibc
import SystemPackage

// Small file helpers for cgroupfs: whole-file reads and one-write writes (a cgroup file takes
// one value per write), paths.

func cgReadFile(_ path: String) throws(CgroupError) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw cgErrnoError(path, errno) }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n: Int
        do throws(Errno) { n = try retryingInterrupts { buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } } } catch {
            throw cgErrnoError(path, error.rawValue)
        }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

/// Writes `text` in one write(2); returns 0 or the errno.
func cgWriteFile(_ path: String, _ text: String) -> Int32 {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return errno }
    defer { close(fd) }
    var s = text
    let rc = s.withUTF8 { b in write(fd, b.baseAddress, b.count) }
    return rc < 0 ? errno : 0
}

/// The value of `key` in a flat keyed file ("key value" lines: memory.stat, memory.events).
func cgStatValue(_ text: String, _ key: String) -> Int64? {
    for line in text.split(separator: "\n") {
        let parts = line.split(separator: " ")
        if parts.count == 2, parts[0] == key { return Int64(parts[1]) }
    }
    return nil
}

func cgRealPath(_ path: String) throws(CgroupError) -> String {
    guard let p = realpath(path, nil) else { throw cgErrnoError(path, errno) }
    defer { free(p) }
    return String(cString: p)
}

/// True when `path` is the root of its mount (its parent is on another device): the top of a
/// cgroup hierarchy as this process sees it.
func cgIsMountRoot(_ path: String, dev: dev_t) -> Bool {
    if path == "/" { return true }
    var st = stat()
    guard stat(cgParentPath(path), &st) == 0 else { return true }
    return st.st_dev != dev
}

func cgParentPath(_ path: String) -> String {
    guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
    return String(path[..<slash])
}

/// The names in a directory (nil when it cannot be read).
func cgDirectoryNames(_ path: String) -> [String]? {
    guard let dir = opendir(path) else { return nil }
    defer { closedir(dir) }
    var names: [String] = []
    while let ent = readdir(dir) {
        let name = withUnsafePointer(to: ent.pointee.d_name) {
            $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

extension StringProtocol {
    var cgTrimmed: String {
        let s = Substring(self)
        guard let first = s.firstIndex(where: { !$0.isWhitespace }),
              let last = s.lastIndex(where: { !$0.isWhitespace }) else { return "" }
        return String(s[first...last])
    }
}
