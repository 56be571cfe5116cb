import CFuse
import Glibc

/// Where the daemon's running log goes: stderr in the foreground; syslog once detached (stderr
/// is /dev/null then), so a reason logged for an EIO or a helper's death is not lost.
public enum Log {
    nonisolated(unsafe) private static var detached = false

    /// Called once, when the daemon leaves its terminal.
    static func detach() {
        cfuse_openlog()
        detached = true
    }

    /// One line, prefixed with the program's name when it goes to stderr.
    public static func line(_ message: String) {
        if detached {
            message.withCString { cfuse_syslog(Int32(CFUSE_LOG_WARNING), $0) }
            return
        }
        let text = "chargefsd: \(message)\n"
        _ = text.withCString { write(STDERR_FILENO, $0, strlen($0)) }
    }
}
