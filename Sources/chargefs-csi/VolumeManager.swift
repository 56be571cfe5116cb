import Dispatch
import Foundation

/// NodeGetVolumeStats in plain values.
struct VolumeStats: Sendable {
    var usage: Chargefsd.Usage?
    var condition: VolumeCondition
}

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
        var mounter: any VolumeMounter
        var state: StateStore
        /// Seconds to wait for a pod's cgroup to appear.
        var podCgroupWait: Double
        /// Why volumes cannot be mounted with -o takeover here, or nil: volumes that do not ask
        /// for it then go without, one that asks (takeover "true") is refused.
        var takeoverProblem: String? = nil
    }

    static let ephemeralKey = "csi.storage.k8s.io/ephemeral"
    static let podUIDKey = "csi.storage.k8s.io/pod.uid"

    private let config: Config
    private let log: @Sendable (String) -> Void
    private var volumes: [String: VolumeRecord] = [:]
    /// The volume ids and target paths of the calls in progress, claimed together in one step
    /// before a call's first await (see `claim`).
    private var busyVolumes: Set<String> = []
    private var busyTargets: [String: String] = [:]
    /// Volumes unmounted whose record the state store could not remove: they stay known, so
    /// that the CO's retry of the unpublish (it retries until OK) removes the record, and a
    /// restarted plugin does not take them for live volumes meanwhile.
    private(set) var recordsNotRemoved: Set<String> = []

    init(config: Config, log: @escaping @Sendable (String) -> Void) {
        self.config = config
        self.log = log
        // The volumes a previous instance published: their daemons kept serving meanwhile.
        for r in config.state.loadAll(log: log) {
            volumes[r.volumeID] = r
            let serving = config.mounter.volumeState(r.targetPath) != .absent
            log("state: volume=\(r.volumeID) pod=\(r.podUID) target=\(r.targetPath) \(serving ? "still mounted" : "not mounted (will be remounted on publish, cleaned on unpublish)")")
        }
    }

    var publishedCount: Int { volumes.count }

    // MARK: - NodePublishVolume

    func publish(_ req: PublishRequest) async throws(CSIError) {
        let (target, podUID, attrs) = try Self.validate(req)
        try claim(volumeID: req.volumeID, target: target)
        defer { release(volumeID: req.volumeID, target: target) }

        if let old = volumes[req.volumeID] {
            guard old.targetPath == target, old.attributes == attrs, old.readOnly == req.readOnly, old.podUID == podUID else {
                throw CSIError(.alreadyExists, "volume \(req.volumeID) is already published at \(old.targetPath) with other parameters (pod \(old.podUID), \(old.attributes.mountOptions.joined(separator: ",")))")
            }
            if try await stillServing(volumeID: req.volumeID, target: target) { return }
        }
        if let problem = config.hostViewProblem {
            throw CSIError(.failedPrecondition, "publishing refused: \(problem)")
        }
        if attrs.takeover == true, let problem = config.takeoverProblem {
            throw CSIError(.failedPrecondition, "volume attribute takeover \"true\" cannot be honoured on this node: \(problem)")
        }
        let podCgroup = try await findPodCgroup(uid: podUID)
        try await mount(target: target, podCgroup: podCgroup, attributes: attrs, readOnly: req.readOnly)
        let record = VolumeRecord(volumeID: req.volumeID, targetPath: target, podUID: podUID, podCgroup: podCgroup,
                                  attributes: attrs, readOnly: req.readOnly,
                                  publishedAt: Date().formatted(.iso8601))
        do {
            try config.state.save(record)
        } catch {
            // Without a record a restarted plugin could not unpublish it: undo the mount.
            if let err = await blocking({ [mounter = config.mounter] in mounter.unmountVolume(target: target) }) {
                throw CSIError(.internal, "\(error.message); and undoing the mount failed: \(err)")
            }
            throw error
        }
        volumes[req.volumeID] = record
        log("publish volume=\(req.volumeID) pod=\(podUID) cgroup=\(podCgroup) size=\(attrs.sizeBytes.map(String.init) ?? "default") target=\(target)\(req.readOnly ? " ro" : "")")
    }

    /// The checks that need no state: INVALID_ARGUMENT for anything malformed. Returns the
    /// normalised target path, the pod's uid and the volume's attributes.
    private static func validate(_ req: PublishRequest) throws(CSIError) -> (String, String, VolumeAttributes) {
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
        guard req.volumeContext[ephemeralKey] == "true" else {
            throw CSIError(.invalidArgument, "csi.chargefs.io serves only CSI ephemeral inline volumes (volume_context \(ephemeralKey)=\"true\"); it has no controller to provision persistent volumes")
        }
        guard let podUID = req.volumeContext[podUIDKey], !podUID.isEmpty else {
            throw CSIError(.invalidArgument, "volume_context has no \(podUIDKey): the CSIDriver object needs podInfoOnMount: true")
        }
        guard PodCgroup.isValidUID(podUID) else {
            throw CSIError(.invalidArgument, "\(podUIDKey) \"\(podUID)\" is not a pod uid")
        }
        let attrs = try VolumeAttributes.parse(req.volumeContext)
        return (normalise(req.targetPath), podUID, attrs)
    }

    /// Claims a volume id and its target path for one call, checking both in the same step: an
    /// actor lets other calls in at every await, so a check before an await and an insert after
    /// it would let two volume ids publish on one path. ABORTED while another call holds either
    /// (the CSI spec's "operation already in progress"); ALREADY_EXISTS when another published
    /// volume holds the path.
    private func claim(volumeID: String, target: String) throws(CSIError) {
        guard !busyVolumes.contains(volumeID) else {
            throw CSIError(.aborted, "an operation on volume \(volumeID) is already in progress")
        }
        if let other = busyTargets[target], other != volumeID {
            throw CSIError(.aborted, "an operation on volume \(other) at target_path \(target) is already in progress")
        }
        if let other = volumes.values.first(where: { $0.targetPath == target && $0.volumeID != volumeID }) {
            throw CSIError(.alreadyExists, "target_path \(target) already holds volume \(other.volumeID)")
        }
        busyVolumes.insert(volumeID)
        busyTargets[target] = volumeID
    }

    private func release(volumeID: String, target: String) {
        busyVolumes.remove(volumeID)
        if busyTargets[target] == volumeID { busyTargets[target] = nil }
    }

    /// A volume published before, asked for again with the same parameters: true when its
    /// daemon still serves (nothing to do); false when it must be mounted again, after clearing
    /// a dead mount (its chargefsd was killed: the data went with it, the volume comes back
    /// empty) or when the mount did not survive a reboot.
    private func stillServing(volumeID: String, target: String) async throws(CSIError) -> Bool {
        let mounter = config.mounter
        switch await blocking({ mounter.volumeState(target) }) {
        case .serving:
            return true
        case .dead:
            log("publish volume=\(volumeID): its chargefsd is gone; remounting \(target)")
            if let err = await blocking({ mounter.unmountVolume(target: target) }) {
                throw CSIError(.internal, err)
            }
            return false
        case .absent:
            return false
        }
    }

    /// The pod's cgroup, waiting for it up to --pod-cgroup-wait; UNAVAILABLE when it never comes.
    private func findPodCgroup(uid: String) async throws(CSIError) -> String {
        guard let podCgroup = await PodCgroup.wait(root: config.tree.root, uid: uid, timeout: config.podCgroupWait) else {
            let looked = PodCgroup.candidates(uid: uid).joined(separator: ", ")
            throw CSIError(.unavailable, "the cgroup of pod \(uid) did not appear under \(config.tree.root) within \(config.podCgroupWait) s (looked for \(looked))")
        }
        return podCgroup
    }

    /// Creates the target directory when missing and mounts the volume there, charged to the
    /// pod's cgroup; INTERNAL with the daemon's own words when that fails (a directory it
    /// created is removed again).
    private func mount(target: String, podCgroup: String, attributes: VolumeAttributes, readOnly: Bool) async throws(CSIError) {
        // allow_other: the containers' uids are not the mounter's (FUSE lets in only the mounter
        // otherwise); mode= (1777 by default) then decides, as on a memory emptyDir.
        var opts = ["memcg=\(podCgroup)", "allow_other"] + attributes.mountOptions
        if config.takeoverProblem != nil { opts.removeAll { $0 == "takeover" } }
        if readOnly { opts.append("ro") }
        let options = opts
        let mounter = config.mounter
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
            if let err = mounter.mountVolume(target: target, options: options, logFile: logFile) {
                if created && rmdir(target) != 0 && errno != ENOENT {
                    return err + "; and removing \(target) failed: \(String(cString: strerror(errno)))"
                }
                return err
            }
            return nil
        }
        if let failure {
            throw CSIError(.internal, "pod cgroup \(podCgroup): \(failure)")
        }
    }

    // MARK: - NodeUnpublishVolume

    func unpublish(volumeID: String, targetPath: String) async throws(CSIError) {
        guard !volumeID.isEmpty else { throw CSIError(.invalidArgument, "volume_id is missing") }
        guard !targetPath.isEmpty else { throw CSIError(.invalidArgument, "target_path is missing") }
        let target = Self.normalise(targetPath)
        // A publish of it still in progress could finish after an OK here: the CO retries.
        guard !busyVolumes.contains(volumeID) else {
            throw CSIError(.aborted, "an operation on volume \(volumeID) is already in progress")
        }
        // Unknown, or already unpublished: nothing to do, and that is success (idempotent).
        guard let record = volumes[volumeID], record.targetPath == target else { return }
        try claim(volumeID: volumeID, target: target)
        defer { release(volumeID: volumeID, target: target) }
        let mounter = config.mounter
        let failure: String? = await blocking {
            if let err = mounter.unmountVolume(target: target) { return err }
            // The spec: the plugin removes the target_path it created.
            if !mounter.hasMount(at: target) && rmdir(target) != 0 && errno != ENOENT {
                return "unmounted, but cannot remove target_path \(target): \(String(cString: strerror(errno)))"
            }
            return nil
        }
        if let failure {
            throw CSIError(.internal, "pod \(record.podUID) cgroup \(record.podCgroup): \(failure)")
        }
        do {
            try config.state.remove(volumeID)
        } catch {
            recordsNotRemoved.insert(volumeID)
            log("unpublish volume=\(volumeID): unmounted, but its record stays until a retry removes it (\(recordsNotRemoved.count) such): \(error.message)")
            throw error
        }
        recordsNotRemoved.remove(volumeID)
        volumes[volumeID] = nil
        log("unpublish volume=\(volumeID) pod=\(record.podUID) cgroup=\(record.podCgroup) size=\(record.attributes.sizeBytes.map(String.init) ?? "default") target=\(target)")
    }

    // MARK: - NodeGetVolumeStats

    /// The volume's figures (nil when its mount does not answer) and its condition: abnormal
    /// when nothing serves it any more (ENOTCONN, ECONNABORTED), when it does not answer within
    /// the probe's deadline, or when the target is no longer a chargefs mount.
    func stats(volumeID: String, volumePath: String) async throws(CSIError) -> VolumeStats {
        guard !volumeID.isEmpty else { throw CSIError(.invalidArgument, "volume_id is missing") }
        guard !volumePath.isEmpty else { throw CSIError(.invalidArgument, "volume_path is missing") }
        let path = Self.normalise(volumePath)
        guard let record = volumes[volumeID] else {
            throw CSIError(.notFound, "volume \(volumeID) is not published on this node")
        }
        guard record.targetPath == path else {
            throw CSIError(.notFound, "volume \(volumeID) is not published at \(path) (it is at \(record.targetPath))")
        }
        let mounter = config.mounter
        let probe = await blocking { mounter.probeVolume(path) }
        let condition = VolumeCondition.of(probe)
        if case .answered(_, let usage) = probe {
            // A mount that answered the status but not statvfs (died in between): no figures.
            return VolumeStats(usage: try? usage.get(), condition: condition)
        }
        return VolumeStats(usage: nil, condition: condition)
    }

    private static func normalise(_ p: String) -> String {
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
