import Glibc
import SystemPackage

/// The cgroups directories may charge to (user.chargefs.memcg): who may name one, and its charger.
public protocol ChargeTargets: Sendable {
    /// `path` after realpath, if the caller (uid, gid, supplementary `groups`) may move
    /// processes into it: EPERM if not, EINVAL if it is no memory cgroup, ENOENT if it does not
    /// exist.
    func check(_ path: String, uid: UInt32, gid: UInt32, groups: [UInt32]) throws(Errno) -> String
    /// A charger for the cgroup `key` (as `check` returned it), for `arena`.
    func charger(for key: String, arena: FileDescriptor) throws(Errno) -> PageCharger
}

/// Directories' targets as memcg= resolves the mount's: the same validation, the same permission
/// rule (write access to the target's cgroup.procs, checked by the kernel for the caller's uid,
/// gid and supplementary groups in a child that drops to them, as the issue asks), the
/// same limit policy, and a `CgroupCharger` (helper in a leaf of the target) per target.
public struct CgroupChargeTargets: ChargeTargets {
    public let limitPolicy: CgroupLimitPolicy

    public init(limitPolicy: CgroupLimitPolicy) {
        self.limitPolicy = limitPolicy
    }

    public func check(_ path: String, uid: UInt32, gid: UInt32, groups: [UInt32]) throws(Errno) -> String {
        do {
            return try CgroupTarget.resolve(path, limitPolicy: limitPolicy, accessAs: (uid, gid), groups: groups).resolvedPath
        } catch let error as CgroupError {
            Log.line("user.chargefs.memcg: \(error)")
            throw Self.errnoFor(error.kind)
        } catch {
            throw .ioError
        }
    }

    public func charger(for key: String, arena: FileDescriptor) throws(Errno) -> PageCharger {
        do {
            let charger = try CgroupCharger(target: CgroupTarget.resolve(key, limitPolicy: limitPolicy), arena: arena)
            Log.line("user.chargefs.memcg: a charge helper started for \(key)")
            return charger
        } catch let error as CgroupError {
            Log.line("user.chargefs.memcg: \(error)")
            throw Self.errnoFor(error.kind)
        } catch {
            throw .ioError
        }
    }

    static func errnoFor(_ kind: CgroupError.Kind) -> Errno {
        switch kind {
        case .permissionDenied: return .notPermitted
        case .notFound, .gone: return .noSuchFileOrDirectory
        case .notDirectory, .notCgroup, .noMemoryController: return .invalidArgument
        case .io: return .ioError
        }
    }
}
