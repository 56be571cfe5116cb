import SystemPackage
@testable import ChargeFS

/// Directory targets without cgroups: paths "/cg/NAME" with a budget of pages each, charged by a
/// `FakeCharger` apiece (kept in `chargers` by path); only uid 0, uid 1000 and members of group
/// 2000 (standing for a delegated, group-writable cgroup.procs) may charge them.
final class FakeTargets: ChargeTargets, @unchecked Sendable {
    let budgets: [String: Int]
    var chargers: [String: FakeCharger] = [:]
    init(_ budgets: [String: Int]) { self.budgets = budgets }
    func check(_ path: String, uid: UInt32, gid: UInt32, groups: [UInt32]) throws(Errno) -> String {
        guard budgets[path] != nil else { throw .noSuchFileOrDirectory }
        guard uid == 0 || uid == 1000 || groups.contains(2000) else { throw .notPermitted }
        return path
    }
    func charger(for key: String, arena: FileDescriptor) throws(Errno) -> PageCharger {
        let c = FakeCharger(arena: arena, budget: budgets[key])
        chargers[key] = c
        return c
    }
}
