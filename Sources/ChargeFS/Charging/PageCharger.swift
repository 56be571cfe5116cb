// Charging/: who pays for the arena's pages. PageCharger and its two kinds (the daemon's own
// cgroup, a memcg= target through the charge helper) and the helper's client. Calls Cgroup/ and
// Support/ only.
import CFuse
import Glibc
import SystemPackage

/// Who pays for the pages of the arena.
///
/// The page store keeps all file data in one memfd (the arena). The kernel charges a shmem page
/// to the memory cgroup of the process that instantiates it, and keeps it there until the page is
/// freed; so whoever calls `fallocate` on a range of the arena decides who pays. A charger is
/// built for one arena (it is given the fd once) and does exactly that, nothing else: the page
/// store calls `charge` before it hands out a page, and punches the range itself when the page is
/// freed (which gives the charge back, whoever punches).
///
/// `charge` may be called from several threads at once and needs no lock of the caller's;
/// `availableBytes` answers at once even while a charge waits (a frozen target).
public protocol PageCharger: AnyObject, Sendable {
    /// Instantiates bytes [offset, offset+length) of the arena so that its pages are charged to
    /// this charger's cgroup. Throws `Errno.noSpace` when the cgroup (or an ancestor) has no room
    /// for them; nothing is charged then. Other errors (the helper cannot run, the cgroup
    /// vanished) are thrown as they are and logged by the charger.
    func charge(offset: Int64, length: Int64) throws(Errno)

    /// A one-line description for logs and the per-mount status (`memcg=... (v2)` or `daemon`).
    var summary: String { get }

    /// Stops whatever the charger runs (helper process, leaf cgroup). Idempotent.
    func shutdown()

    /// The bytes that can still be charged (the effective headroom, for statfs/df); nil when
    /// nothing limits it.
    func availableBytes() -> Int64?
}

extension PageCharger {
    /// Chargers that know no limit need not say so.
    public func availableBytes() -> Int64? { nil }
}

/// Pages are charged to the daemon's own cgroup, as any tmpfs page would be to its writer.
public final class DaemonCharger: PageCharger {
    /// The arena (owned by the page store, which outlives its charger).
    private let arena: FileDescriptor

    public init(arena: FileDescriptor) {
        self.arena = arena
    }

    public func charge(offset: Int64, length: Int64) throws(Errno) {
        do {
            _ = try retryingInterrupts { cfuse_fallocate(arena.rawValue, 0, offset, length) }
        } catch {
            throw error == .noMemory ? .noSpace : error
        }
    }

    public var summary: String { "daemon" }
    public func shutdown() {}
    public func availableBytes() -> Int64? { nil }
}
