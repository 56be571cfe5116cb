import CFuse
import Glibc
import Synchronization

/// Where the daemon's running log goes: stderr in the foreground; syslog once detached (stderr
/// is /dev/null then), so a reason logged for an EIO or a helper's death is not lost.
///
/// Global on purpose: where a line goes is a property of the process (its stderr, its syslog
/// connection), shared by every layer and thread that logs; it changes once, at `detach`.
public enum Log {
    private static let detached = Atomic(false)

    /// Called once, when the daemon leaves its terminal.
    static func detach() {
        cfuse_openlog()
        detached.store(true, ordering: .releasing)
    }

    /// One line, prefixed with the program's name when it goes to stderr.
    public static func line(_ message: String) {
        if detached.load(ordering: .acquiring) {
            message.withCString { cfuse_syslog(Int32(CFUSE_LOG_WARNING), $0) }
            return
        }
        let text = "chargefsd: \(message)\n"
        _ = text.withCString { write(STDERR_FILENO, $0, strlen($0)) }
    }
}
