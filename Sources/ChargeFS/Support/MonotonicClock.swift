import Glibc

/// CLOCK_MONOTONIC, read one way everywhere: phases of a takeover, a wait's deadline, a cache's
/// expiry. Not `ContinuousClock`: its `Instant` cannot be stored in an atomic or a log line as a
/// number, and these callers need both.
public enum MonotonicClock {
    public static func nanoseconds() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }

    public static func microseconds() -> UInt64 { nanoseconds() / 1000 }

    public static func milliseconds() -> Double { Double(nanoseconds()) / 1e6 }
}
