import CKeeper
import Glibc
import SystemPackage

/// `chargefsd --upgrade MOUNTPOINT` (docs/takeover.md, "Upgrade in place"): asks the mount's
/// keeper to have its server hand over to the chargefsd binary now installed at the daemon's
/// path, waits until a new server serves, and prints one line. Nothing here touches the state:
/// the keeper and the servers do the work; this only finds the keeper, checks the caller, and
/// signals.
public enum Upgrade {
    /// How long a new server may take to serve before this command gives up waiting (the
    /// upgrade itself goes on in the keeper).
    static let waitSeconds = 60.0

    struct Failure: Error { let message: String }

    /// The mount's entry in mountinfo: its type and the kernel's super options (fuse keeps
    /// user_id=, the uid that mounted it).
    static func mountEntry(_ path: String) -> (type: String, superOptions: String)? {
        guard let file = fopen("/proc/self/mountinfo", "r") else { return nil }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>? = nil
        var capacity = 0
        defer { free(line) }
        var found: (String, String)?
        while getline(&line, &capacity, file) > 0, let line {
            var text = String(cString: line)
            if text.hasSuffix("\n") { text.removeLast() }
            let fields = text.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count >= 7, MountTable.unescape(fields[4]) == path,
                  let dash = fields[6...].firstIndex(of: "-"), dash + 3 < fields.count else { continue }
            found = (String(fields[dash + 1]), String(fields[dash + 3]))  // the last one mounted there
        }
        return found
    }

    /// The status attribute's `key=value` words.
    static func status(_ path: String) -> [String: String]? {
        var buf = [CChar](repeating: 0, count: 8192)
        let r = ckeeper_read_status(path, &buf, UInt(buf.count))
        guard r > 0 else { errno = Int32(-r); return nil }
        let n = Int(r)
        var words: [String: String] = [:]
        for word in String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" }) {
            let kv = word.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { words[String(kv[0])] = String(kv[1]) }
        }
        return words
    }

    static func comm(_ pid: Int32) -> String? {
        guard let f = fopen("/proc/\(pid)/comm", "r") else { return nil }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 64)
        guard fgets(&buf, Int32(buf.count), f) != nil else { return nil }
        let bytes = buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        return String(decoding: bytes, as: UTF8.self).trimmingSuffix("\n")
    }

    /// Runs the command; returns the exit status (0: upgraded; 1: refused or failed).
    public static func run(mountpoint: String) -> Int32 {
        do throws(Failure) {
            print(try upgrade(mountpoint))
            return 0
        } catch {
            Daemon.printError(error.message)
            return 1
        }
    }

    static func upgrade(_ mountpoint: String) throws(Failure) -> String {
        // mountinfo first: nothing is asked of a mount that may have nobody serving it.
        guard let path = Takeover.absolutePath(mountpoint) else {
            throw Failure("--upgrade \(mountpoint): no such directory")
        }
        guard let entry = mountEntry(path) else {
            var st = stat()
            throw Failure(stat(path, &st) != 0 ? "--upgrade \(mountpoint): no such directory" : "--upgrade \(mountpoint): not a mountpoint")
        }
        guard entry.type == "fuse.chargefsd" else {
            throw Failure("--upgrade \(mountpoint): not a chargefs mount (\(entry.type) is mounted there)")
        }
        // Who may: root, or the uid that mounted it, as the kernel recorded it (fuse's user_id=).
        let mounter = entry.superOptions.split(separator: ",").first { $0.hasPrefix("user_id=") }.flatMap { UInt32($0.dropFirst(8)) }
        let uid = getuid()
        guard uid == 0 || mounter == uid else {
            throw Failure("--upgrade \(mountpoint): not permitted (only root or uid \(mounter.map(String.init) ?? "?"), who mounted it, may upgrade it)")
        }
        guard let before = status(path) else {
            throw Failure("--upgrade \(mountpoint): cannot read its status (\(Errno(rawValue: errno)))")
        }
        guard let keeperText = before["keeper"], let keeper = Int32(keeperText), keeper > 0,
              let oldText = before["pid"], let oldPid = Int32(oldText) else {
            throw Failure("--upgrade \(mountpoint): mounted without -o takeover (no keeper to hand the mount over)")
        }
        guard comm(keeper) == "chargefs-keeper" else {
            throw Failure("--upgrade \(mountpoint): its keeper \(keeper) is not running")
        }
        let upgrades = before["upgrades"].flatMap { UInt64($0) }
        let failures = before["upgrade_failures"].flatMap { UInt64($0) } ?? 0
        guard upgrades != nil else {
            throw Failure("--upgrade \(mountpoint): its keeper is too old to upgrade in place (no upgrades= in its status); remount it")
        }
        let asked = MonotonicClock.milliseconds()
        guard kill(keeper, Int32(CKEEPER_UPGRADE_SIGNAL)) == 0 else {
            throw Failure("--upgrade \(mountpoint): cannot signal keeper \(keeper): \(Errno(rawValue: errno))")
        }
        // Each status read waits while nobody serves: the last wait is the pause callers saw.
        while MonotonicClock.milliseconds() - asked < waitSeconds * 1e3 {
            if let now = status(path), let pidText = now["pid"], let pid = Int32(pidText), pid != oldPid {
                let pause = MonotonicClock.milliseconds() - asked
                let nowFailures = now["upgrade_failures"].flatMap { UInt64($0) } ?? 0
                if nowFailures > failures {
                    throw Failure("--upgrade \(mountpoint): the installed chargefsd could not take the mount over (its log says why); the previous binary serves it again: pid \(oldPid) -> \(pid), \(Int(pause.rounded())) ms without answers")
                }
                return "upgraded \(mountpoint): pid \(oldPid) -> \(pid), the mount did not answer for at most \(Int(pause.rounded())) ms"
            }
            var pause = timespec(tv_sec: 0, tv_nsec: 5_000_000)
            nanosleep(&pause, nil)
        }
        throw Failure("--upgrade \(mountpoint): no new server after \(Int(waitSeconds)) s (see the keeper's log)")
    }
}

extension Upgrade.Failure {
    init(_ message: String) { self.message = message }
}

private extension String {
    func trimmingSuffix(_ suffix: String) -> String { hasSuffix(suffix) ? String(dropLast(suffix.count)) : self }
}
