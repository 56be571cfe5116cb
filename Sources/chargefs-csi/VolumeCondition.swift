import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What one look at a volume's mount found: its filesystem type (mountinfo), then the root's
/// `user.chargefs.status` and statvfs, read with a deadline.
enum VolumeProbe: Sendable {
    /// No chargefsd mount at the path: the type of what is mounted there, nil when nothing is.
    case notChargefs(String?)
    /// Reading the status attribute failed with this errno (ENOTCONN: nobody serves the
    /// connection any more; ECONNABORTED: it was aborted, e.g. by a keeper that gave up).
    case failed(Int32)
    /// No answer within this many seconds (a stopped or hung server; the read still waits).
    case noAnswer(Double)
    /// The daemon answered: its status text and the mount's figures.
    case answered(status: String, usage: Result<Chargefsd.Usage, CSIError>)
}

/// The CSI volume condition (NodeGetVolumeStats, VOLUME_CONDITION) a probe stands for.
struct VolumeCondition: Sendable, Equatable {
    var abnormal: Bool
    var message: String

    static func of(_ probe: VolumeProbe) -> VolumeCondition {
        switch probe {
        case .notChargefs(nil):
            return .init(abnormal: true, message: "not mounted: the chargefs mount is gone from the target path")
        case .notChargefs(let type?):
            return .init(abnormal: true, message: "no longer a chargefs mount (\(type) is mounted there)")
        case .failed(let e) where e == ENOTCONN:
            return .init(abnormal: true, message: "chargefsd is gone (server and keeper): the mount answers ENOTCONN (Transport endpoint is not connected) and its files are lost; restart the pod")
        case .failed(let e) where e == ECONNABORTED:
            return .init(abnormal: true, message: "the mount was aborted: it answers ECONNABORTED (its keeper gave up after repeated server crashes, see the node's log) and its files are lost; restart the pod")
        case .failed(let e):
            return .init(abnormal: true, message: "reading the volume's status failed: \(String(cString: strerror(e)))")
        case .noAnswer(let s):
            return .init(abnormal: true, message: "chargefsd did not answer within \(String(format: "%.1f", s)) s (stopped or hung)")
        case .answered(let status, _):
            let fields = statusFields(status)
            guard let n = fields["takeovers"].flatMap({ Int($0) }), n > 0 else {
                return .init(abnormal: false, message: "serving")
            }
            let last = fields["last_takeover"].map { " (last: \($0))" } ?? ""
            return .init(abnormal: false, message: "serving, \(n) takeover\(n == 1 ? "" : "s")\(last)")
        }
    }

    /// The status attribute's `key=value` words (a value runs to the next word that holds a
    /// `=`, so `last_takeover=signal 9, 2.1 ms` keeps its spaces). Later lines win.
    static func statusFields(_ status: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in status.split(separator: "\n") {
            var key: String?
            var value: [Substring] = []
            func flush() { if let k = key { out[k] = value.joined(separator: " ") } }
            for word in line.split(separator: " ") {
                if let eq = word.firstIndex(of: "=") {
                    flush()
                    key = String(word[..<eq])
                    value = [word[word.index(after: eq)...]]
                } else if key != nil {
                    value.append(word)
                }
            }
            flush()
        }
        return out
    }
}

extension Chargefsd {
    /// Seconds NodeGetVolumeStats waits for a mount to answer.
    static let probeTimeout = 3.0

    /// Looks at the mount at `path` without ever blocking longer than `timeout`: mountinfo
    /// first (no request to the mount), then the status attribute and statvfs on a thread of
    /// their own. A FUSE request to a stopped server waits until it goes on or the connection
    /// ends, so a probe still waiting is joined by later callers, never doubled: one thread per
    /// hung mount at most.
    static func probe(_ path: String, timeout: Double = probeTimeout) -> VolumeProbe {
        let type = mountType(path)
        guard type == "fuse.chargefsd" else { return .notChargefs(type) }
        let p = Probes.shared.begin(path)
        if p.isNew {
            let thread = Thread {
                p.box.finish(readStatus(path))
                Probes.shared.end(path, p.box)
            }
            thread.stackSize = 256 << 10
            thread.start()
        }
        return p.box.wait(until: Date().addingTimeInterval(timeout))
    }

    /// Blocking: the root's status attribute, then statvfs.
    private static func readStatus(_ path: String) -> VolumeProbe {
        guard let getxattr = libcGetxattr else { return .failed(ENOSYS) }
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = buf.withUnsafeMutableBytes { getxattr(path, "user.chargefs.status", $0.baseAddress, $0.count) }
        guard n >= 0 else { return .failed(errno) }
        return .answered(status: String(decoding: buf[0..<n], as: UTF8.self), usage: usage(path))
    }
}

/// glibc's getxattr(2): Swift's Glibc module leaves <sys/xattr.h> out, so it is looked up once.
private typealias GetxattrFn = @convention(c) (UnsafePointer<CChar>?, UnsafePointer<CChar>?, UnsafeMutableRawPointer?, Int) -> Int
private let libcGetxattr: GetxattrFn? = {
    guard let handle = dlopen(nil, RTLD_NOW), let f = dlsym(handle, "getxattr") else { return nil }
    return unsafeBitCast(f, to: GetxattrFn.self)
}()

/// The probes in progress, by path.
private final class Probes: @unchecked Sendable {
    static let shared = Probes()
    private let lock = NSLock()
    private var running: [String: ProbeBox] = [:]

    func begin(_ path: String) -> (box: ProbeBox, isNew: Bool) {
        lock.lock()
        defer { lock.unlock() }
        if let b = running[path] { return (b, false) }
        let b = ProbeBox()
        running[path] = b
        return (b, true)
    }

    func end(_ path: String, _ box: ProbeBox) {
        lock.lock()
        if running[path] === box { running[path] = nil }
        lock.unlock()
    }
}

/// One probe's result, which any number of callers wait for with their own deadline.
private final class ProbeBox: @unchecked Sendable {
    private let cond = NSCondition()
    private var result: VolumeProbe?
    let started = Date()

    func finish(_ r: VolumeProbe) {
        cond.lock()
        result = r
        cond.broadcast()
        cond.unlock()
    }

    func wait(until deadline: Date) -> VolumeProbe {
        cond.lock()
        defer { cond.unlock() }
        while result == nil {
            if !cond.wait(until: deadline) { break }
        }
        return result ?? .noAnswer(Date().timeIntervalSince(started))
    }
}
