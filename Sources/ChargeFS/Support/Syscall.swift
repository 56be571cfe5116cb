import Glibc
import SystemPackage

/// Runs a system call until it is not interrupted by a signal: the one EINTR loop of the daemon.
/// `body` returns the call's result (-1 with errno set on failure); the result is returned, or
/// the errno thrown. Not for close(2), which must never be retried.
@inline(__always)
func retryingInterrupts<Result: SignedInteger>(_ body: () -> Result) throws(Errno) -> Result {
    while true {
        let result = body()
        if result >= 0 { return result }
        let error = errno
        if error != EINTR { throw Errno(rawValue: error) }
    }
}
