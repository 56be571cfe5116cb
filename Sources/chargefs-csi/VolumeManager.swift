import Dispatch
import Foundation

/// A NodePublishVolume request in plain values, so that VolumeManager needs no gRPC types.
struct PublishRequest: Sendable {
    enum Access: Sendable { case none, unspecified, mount, block }
    var volumeID: String
    var targetPath: String
    var access: Access
    var readOnly: Bool
    var volumeContext: [String: String]
}

/// Publishes and unpublishes chargefs volumes: finds the pod's cgroup, runs chargefsd, keeps the
/// record of each volume in the state store. An actor so that two calls never interleave their
/// bookkeeping; the slow parts (waiting for the pod's cgroup, mounting) run off the actor's
/// executor, and a second call for a volume already in progress gets ABORTED, as the CSI spec
/// asks ("an operation for this volume is already in progress").
actor VolumeManager {
    struct Config: Sendable {
        var tree: CgroupTree
        /// Why publishing is refused (the plugin cannot see the host's cgroup tree), or nil.
        var hostViewProblem: String?
        var chargefsd: Chargefsd
        var state: StateStore
        /// Seconds to wait for a pod's cgroup to appear.
        var podCgroupWait: Double
    }

    static let ephemeralKey = "csi.storage.k8s.io/ephemeral"
    static let podUIDKey = "csi.storage.k8s.io/pod.uid"

    private let config: Config
    private let log: @Sendable (String) -> Void
    private var volumes: [String: VolumeRecord] = [:]
    private var busy: Set<String> = []

    init(config: Config, log: @escaping @Sendable (String) -> Void) {
        self.config = config
        self.log = log
        // The volumes a previous instance published: their daemons kept serving meanwhile.
        for r in config.state.loadAll(log: log) {
            volumes[r.volumeID] = r
            let serving = Chargefsd.isChargefsMount(r.targetPath)
            log("state: volume=\(r.volumeID) pod=\(r.podUID) target=\(r.targetPath) \(serving ? "still mounted" : "not mounted (will be remounted on publish, cleaned on unpublish)")")
        }
    }

    var publishedCount: Int { volumes.count }

    // MARK: - NodePublishVolume

    func publish(_ req: PublishRequest) async throws(CSIError) {
        guard !req.volumeID.isEmpty else { throw CSIError(.invalidArgument, "volume_id is missing") }
        guard !req.targetPath.isEmpty else { throw CSIError(.invalidArgument, "target_path is missing") }
        switch req.access {
        case .none: throw CSIError(.invalidArgument, "volume_capability is missing")
        case .unspecified: throw CSIError(.invalidArgument, "volume_capability has no access_type (mount or block)")
        case .block: throw CSIError(.invalidArgument, "block access is not supported: chargefs volumes are filesystems (use access_type mount)")
        case .mount: break
        }
        guard req.targetPath.hasPrefix("/"), !req.targetPath.split(separator: "/").contains("..") else {
            throw CSIError(.invalidArgument, "target_path \"\(req.targetPath)\" is not an absolute path")
        }
        guard req.volumeContext[Self.ephemeralKey] == "true" else {
            throw CSIError(.invalidArgument, "csi.chargefs.io serves only CSI ephemeral inline volumes (volume_context \(Self.ephemeralKey)=\"true\"); it has no controller to provision persistent volumes")
        }
        guard let podUID = req.volumeContext[Self.podUIDKey], !podUID.isEmpty else {
            throw CSIError(.invalidArgument, "volume_context has no \(Self.podUIDKey): the CSIDriver object needs podInfoOnMount: true")
        }
        guard PodCgroup.isValidUID(podUID) else {
            throw CSIError(.invalidArgument, "\(Self.podUIDKey) \"\(podUID)\" is not a pod uid")
        }
        let attrs = try VolumeAttributes.parse(req.volumeContext)
        let target = normalise(req.targetPath)
        // Claimed before the first await: the actor lets other calls in while this one waits.
        guard busy.insert(req.volumeID).inserted else {
            throw CSIError(.aborted, "an operation on volume \(req.volumeID) is already in progress")
        }
        defer { busy.remove(req.volumeID) }

        if let old = volumes[req.volumeID] {
            guard old.targetPath == target, old.attributes == attrs, old.readOnly == req.readOnly, old.podUID == podUID else {
                throw CSIError(.alreadyExists, "volume \(req.volumeID) is already published at \(old.targetPath) with other parameters (pod \(old.podUID), \(old.attributes.mountOptions.joined(separator: ",")))")
            }
            switch await blocking({ Chargefsd.mountState(target) }) {
            case .serving: return  // the same request again: done
            case .dead:
                // its chargefsd died (killed, OOM): the data is gone with it; clear the dead mount
                // ("Transport endpoint is not connected") and serve an empty volume again
                log("publish volume=\(req.volumeID): its chargefsd is gone; remounting \(target)")
                if let err = await blocking({ Chargefsd.unmount(target: target) }) {
                    throw CSIError(.internal, err)
                }
            case .absent: break  // the record survived a reboot, the mount did not: mount again
            }
        }
        if let other = volumes.values.first(where: { $0.targetPath == target && $0.volumeID != req.volumeID }) {
            throw CSIError(.alreadyExists, "target_path \(target) already holds volume \(other.volumeID)")
        }
        if let problem = config.hostViewProblem {
            throw CSIError(.failedPrecondition, "publishing refused: \(problem)")
        }

        guard let podCgroup = await PodCgroup.wait(root: config.tree.root, uid: podUID, timeout: config.podCgroupWait) else {
            let looked = PodCgroup.candidates(uid: podUID).joined(separator: ", ")
            throw CSIError(.unavailable, "the cgroup of pod \(podUID) did not appear under \(config.tree.root) within \(config.podCgroupWait) s (looked for \(looked))")
        }

        // allow_other: the containers' uids are not the mounter's (FUSE lets in only the mounter
        // otherwise); mode= (1777 by default) then decides, as on a memory emptyDir.
        var opts = ["memcg=\(podCgroup)", "allow_other"] + attrs.mountOptions
        if req.readOnly { opts.append("ro") }
        let options = opts
        let chargefsd = config.chargefsd
        let logFile = config.state.dir + "/mount-\(UUID().uuidString).log"  // chargefsd's own words
        let failure: String? = await blocking {
            // The CO creates target_path's parent; the plugin creates target_path itself.
            var created = false
            var isDir: ObjCBool = false
            if !FileManager.default.fileExists(atPath: target, isDirectory: &isDir) {
                guard mkdir(target, 0o750) == 0 else {
                    return "cannot create target_path \(target): \(String(cString: strerror(errno)))"
                }
                created = true
            } else if !isDir.boolValue {
                return "target_path \(target) exists and is not a directory"
            }
            if let err = chargefsd.mount(target: target, options: options, logFile: logFile) {
                if created { try? FileManager.default.removeItem(atPath: target) }
                return err
            }
            return nil
        }
        if let failure {
            throw CSIError(.internal, "pod cgroup \(podCgroup): \(failure)")
        }
        let record = VolumeRecord(volumeID: req.volumeID, targetPath: target, podUID: podUID, podCgroup: podCgroup,
                                  attributes: attrs, readOnly: req.readOnly,
                                  publishedAt: Date().formatted(.iso8601))
        do {
            try config.state.save(record)
        } catch {
            // Without a record a restarted plugin could not unpublish it: undo the mount.
            _ = await blocking { Chargefsd.unmount(target: target) }
            throw error
        }
        volumes[req.volumeID] = record
        log("publish volume=\(req.volumeID) pod=\(podUID) cgroup=\(podCgroup) size=\(attrs.sizeBytes.map(String.init) ?? "default") target=\(target)\(req.readOnly ? " ro" : "")")
    }

    // MARK: - NodeUnpublishVolume

    func unpublish(volumeID: String, targetPath: String) async throws(CSIError) {
        guard !volumeID.isEmpty else { throw CSIError(.invalidArgument, "volume_id is missing") }
        guard !targetPath.isEmpty else { throw CSIError(.invalidArgument, "target_path is missing") }
        let target = normalise(targetPath)
        // Unknown, or already unpublished: nothing to do, and that is success (idempotent).
        guard let record = volumes[volumeID], record.targetPath == target else { return }
        guard busy.insert(volumeID).inserted else {
            throw CSIError(.aborted, "an operation on volume \(volumeID) is already in progress")
        }
        defer { busy.remove(volumeID) }
        let failure: String? = await blocking {
            if let err = Chargefsd.unmount(target: target) { return err }
            // The spec: the plugin removes the target_path it created.
            if Chargefsd.mountType(target) == nil { try? FileManager.default.removeItem(atPath: target) }
            return nil
        }
        if let failure {
            throw CSIError(.internal, "pod \(record.podUID) cgroup \(record.podCgroup): \(failure)")
        }
        config.state.remove(volumeID)
        volumes[volumeID] = nil
        log("unpublish volume=\(volumeID) pod=\(record.podUID) cgroup=\(record.podCgroup) size=\(record.attributes.sizeBytes.map(String.init) ?? "default") target=\(target)")
    }

    // MARK: - NodeGetVolumeStats

    func stats(volumeID: String, volumePath: String) async throws(CSIError) -> Chargefsd.Usage {
        guard !volumeID.isEmpty else { throw CSIError(.invalidArgument, "volume_id is missing") }
        guard !volumePath.isEmpty else { throw CSIError(.invalidArgument, "volume_path is missing") }
        let path = normalise(volumePath)
        guard let record = volumes[volumeID] else {
            throw CSIError(.notFound, "volume \(volumeID) is not published on this node")
        }
        guard record.targetPath == path else {
            throw CSIError(.notFound, "volume \(volumeID) is not published at \(path) (it is at \(record.targetPath))")
        }
        let result = await blocking { () -> Result<Chargefsd.Usage, CSIError> in
            guard Chargefsd.isChargefsMount(path) else {
                return .failure(CSIError(.notFound, "volume \(volumeID): \(path) is no longer mounted"))
            }
            return Chargefsd.usage(path)
        }
        return try result.get()
    }

    private func normalise(_ p: String) -> String {
        p.count > 1 && p.hasSuffix("/") ? String(p.dropLast()) : p
    }
}

/// Runs blocking work (waitpid, umount2, statvfs on a FUSE mount) on a Dispatch thread, off the
/// small cooperative pool the gRPC handlers share.
func blocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { cont in
        DispatchQueue.global().async { cont.resume(returning: body()) }
    }
}
