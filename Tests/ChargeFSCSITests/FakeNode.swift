import Dispatch
import Foundation
@testable import chargefs_csi

/// A stand-in for chargefsd and the node's mount table: records mounts by target path, answers
/// their state, and fails or holds a mount when a test says so. Real mounting and charging are
/// tested by scripts/tests/csi.sh.
final class FakeMounter: VolumeMounter, @unchecked Sendable {
    private let lock = NSLock()
    private var mounts: [String: [String]] = [:]
    private var states: [String: Chargefsd.MountState] = [:]
    private var calls: [String] = []
    private var stackedMounts = 0
    private var nextMountError: String?
    private var nextUnmountError: String?
    private var pendingHold: DispatchSemaphore?
    private var probes: [String: VolumeProbe] = [:]
    private var held: DispatchSemaphore?

    private func locked<T>(_ body: () -> T) -> T {
        lock.lock()
        defer { lock.unlock() }
        return body()
    }

    // What tests set up.
    func failNextMount(_ message: String) { locked { nextMountError = message } }
    func failNextUnmount(_ message: String) { locked { nextUnmountError = message } }
    /// The next mount waits until `release` is called.
    func holdNextMount() { locked { pendingHold = DispatchSemaphore(value: 0) } }
    func releaseHeldMount() { locked { held }?.signal() }
    func setState(_ target: String, _ state: Chargefsd.MountState) { locked { states[target] = state } }
    /// What the next looks at `target` find (nil: a serving mount's answer, or nothing).
    func setProbe(_ target: String, _ probe: VolumeProbe?) { locked { probes[target] = probe } }
    /// Forgets every mount, as a reboot does.
    func reboot() { locked { mounts = [:]; states = [:] } }

    // What tests read.
    var mountedTargets: [String: [String]] { locked { mounts } }
    var callLog: [String] { locked { calls } }
    var mountCalls: Int { locked { calls.filter { $0.hasPrefix("mount ") }.count } }
    /// Mounts made on a target that already had one (what the target-path race produced).
    var stacked: Int { locked { stackedMounts } }

    func mountVolume(target: String, options: [String], logFile: String) -> String? {
        let (error, gate): (String?, DispatchSemaphore?) = locked {
            calls.append("mount \(target)")
            defer { nextMountError = nil; pendingHold = nil }
            if let hold = pendingHold { held = hold }
            return (nextMountError, pendingHold)
        }
        // bounded, so that a test whose release never comes fails instead of hanging
        if let gate, gate.wait(timeout: .now() + 10) == .timedOut { return "fake mount: held for 10 s, never released" }
        if let error { return error }
        locked {
            if mounts[target] != nil { stackedMounts += 1 }
            mounts[target] = options
            states[target] = .serving
        }
        return nil
    }

    func unmountVolume(target: String) -> String? {
        locked {
            calls.append("unmount \(target)")
            if let e = nextUnmountError { nextUnmountError = nil; return e }
            mounts[target] = nil
            states[target] = nil
            return nil
        }
    }

    func volumeState(_ path: String) -> Chargefsd.MountState {
        locked { states[path] ?? (mounts[path] == nil ? .absent : .serving) }
    }

    func hasMount(at path: String) -> Bool { locked { mounts[path] != nil } }

    func probeVolume(_ path: String) -> VolumeProbe {
        if let p = locked({ probes[path] }) { return p }
        guard hasMount(at: path) else { return .notChargefs(nil) }
        return .answered(status: "transport=dev\n", usage: volumeUsage(path))
    }

    func volumeUsage(_ path: String) -> Result<Chargefsd.Usage, CSIError> {
        locked {
            guard mounts[path] != nil else { return .failure(CSIError(.internal, "no mount at \(path)")) }
            return .success(Chargefsd.Usage(totalBytes: 64 << 20, usedBytes: 1 << 20, availableBytes: 63 << 20,
                                            totalInodes: 1000, usedInodes: 1, availableInodes: 999))
        }
    }
}

/// A node in a temporary directory: a cgroup tree (directories where the kubelet would put pod
/// cgroups), a state directory, and the kubelet's pods folder holding the targets' parents.
final class FakeNode: @unchecked Sendable {
    let dir: String
    var cgroupRoot: String { dir + "/cgroup" }
    var stateDir: String { dir + "/state" }
    let mounter = FakeMounter()
    let logLines = LogLines()

    init() throws {
        dir = NSTemporaryDirectory() + "chargefs-csi-tests-" + UUID().uuidString
        for d in [cgroupRoot, stateDir, dir + "/pods"] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }

    /// Creates the pod's cgroup as the kubelet's cgroupfs driver does for a burstable pod.
    @discardableResult
    func addPod(_ uid: String) throws -> String {
        let p = cgroupRoot + "/kubepods/burstable/pod" + uid
        try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        return p
    }

    /// A target path whose parent exists (the CO makes the parent; the plugin the target).
    func target(_ name: String) throws -> String {
        let parent = dir + "/pods/" + name + "/volumes"
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        return parent + "/mount"
    }

    func manager(hostViewProblem: String? = nil, podCgroupWait: Double = 0.3, takeoverProblem: String? = nil,
                 unlinkFile: (@Sendable (String) -> Int32)? = nil) throws -> VolumeManager {
        let state = try unlinkFile.map { try StateStore(dir: stateDir, unlinkFile: $0) } ?? StateStore(dir: stateDir)
        let lines = logLines
        return VolumeManager(
            config: .init(tree: CgroupTree(root: cgroupRoot, version: .v2), hostViewProblem: hostViewProblem,
                          mounter: mounter, state: state, podCgroupWait: podCgroupWait,
                          takeoverProblem: takeoverProblem),
            log: { lines.append($0) })
    }

    var recordFiles: [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: stateDir)) ?? []).filter { $0.hasSuffix(".json") }
    }
}

final class LogLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ s: String) { lock.lock(); lines.append(s); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}

/// A publish request as the kubelet sends it for an inline ephemeral volume.
func publishRequest(volumeID: String, target: String, podUID: String, size: String = "16Mi",
                    readOnly: Bool = false, access: PublishRequest.Access = .mount,
                    extra: [String: String] = [:]) -> PublishRequest {
    var context = [VolumeManager.ephemeralKey: "true", VolumeManager.podUIDKey: podUID, "size": size]
    context.merge(extra) { _, new in new }
    return PublishRequest(volumeID: volumeID, targetPath: target, access: access, readOnly: readOnly,
                          volumeContext: context)
}
