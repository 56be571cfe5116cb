import CSIProto
import Foundation
import GRPCCore

// chargefs-csi: the CSI node plugin serving chargefs ephemeral inline volumes.

let log: @Sendable (String) -> Void = { msg in
    FileHandle.standardError.write(Data(("chargefs-csi: " + msg + "\n").utf8))
}
/// Command-line and start-up errors: one line, non-zero exit.
func fail(_ msg: String, status: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data(("chargefs-csi: " + msg + "\n").utf8))
    exit(status)
}

let options: Options
switch Options.parse(Array(CommandLine.arguments.dropFirst())) {
case .success(.help):
    print(Options.usage)
    exit(0)
case .success(.version):
    print("chargefs-csi \(IdentityService.version) (\(IdentityService.driverName), CSI v1)")
    exit(0)
case .success(.run(let o)):
    options = o
case .failure(let e):
    fail(e.message, status: 2)
}

guard let socket = Server.socketPath(endpoint: options.endpoint) else {
    fail("--endpoint \"\(options.endpoint)\" is not a unix socket", status: 2)
}
guard let chargefsdPath = Chargefsd.locate(explicit: options.chargefsd) else {
    fail(options.chargefsd.map { "--chargefsd \($0) is not an executable file" }
         ?? "chargefsd not found next to chargefs-csi nor on PATH (use --chargefsd PATH)", status: 2)
}
let tree: CgroupTree
switch CgroupTree.find(cgroupRoot: options.cgroupRoot) {
case .success(let t): tree = t
case .failure(let e): fail(e.message)
}
let hostViewProblem = tree.hostViewProblem()
if let problem = hostViewProblem {
    log("WARNING: cannot see the host's cgroup tree: \(problem). NodePublishVolume will be refused (FAILED_PRECONDITION): a volume whose pod limits cannot be read could end in OOM kills.")
}

// The node-level cgroup of the daemons.
let daemonCgroup = options.daemonCgroup.hasPrefix("/") ? options.daemonCgroup : tree.root + "/" + options.daemonCgroup
do {
    if tree.version == .v2 {
        // the memory controller must be on for the new cgroup (best effort: it usually is)
        let parent = (daemonCgroup as NSString).deletingLastPathComponent
        if let sc = try? String(contentsOfFile: parent + "/cgroup.subtree_control", encoding: .utf8),
           !sc.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") {
            try? "+memory".write(toFile: parent + "/cgroup.subtree_control", atomically: false, encoding: .utf8)
        }
    }
    try FileManager.default.createDirectory(atPath: daemonCgroup, withIntermediateDirectories: true)
} catch {
    fail("cannot create the daemons' cgroup \(daemonCgroup): \(error.localizedDescription)")
}
guard FileManager.default.isWritableFile(atPath: daemonCgroup + "/cgroup.procs") else {
    fail("\(daemonCgroup) is not a cgroup this process can move daemons into (no writable cgroup.procs)")
}
// The same cgroup on every other hierarchy where the plugin has one of its own (a container's).
let daemonCgroupProcs: [String]
// (its path below the memory hierarchy's mount, e.g. csi.chargefs.io, names it on the others)
let memoryMount = tree.mountPoint(containing: daemonCgroup)?.path ?? tree.root
let relativeDaemonCgroup = daemonCgroup.hasPrefix(memoryMount + "/")
    ? String(daemonCgroup.dropFirst(memoryMount.count + 1)) : (daemonCgroup as NSString).lastPathComponent
switch DaemonCgroups.prepare(memoryCgroup: daemonCgroup, relative: relativeDaemonCgroup) {
case .success(let p): daemonCgroupProcs = p
case .failure(let e): fail(e.message)
}
// In a container (an ancestor in another mount namespace), daemons start in the host's.
var hostDaemon: HostDaemon?
if getpid() == 1 {
    log("WARNING: this plugin is PID 1 of its own PID namespace (no hostPID): every daemon it starts is killed when it exits, and its volumes with them")
} else if let ancestor = HostDaemon.runtimeAncestor() {
    if let bundle = options.daemonBundle {
        switch HostDaemon.install(bundle: bundle, hostPid: ancestor, hostDir: options.daemonDir) {
        case .success(let h): hostDaemon = h
        case .failure(let e): fail(e.message)
        }
    } else {
        log("WARNING: this plugin runs in its own mount namespace (its ancestor \(ancestor) does not) and has no --daemon-bundle: daemons start in the plugin's mount namespace, on its root filesystem, and lose both when its container goes")
    }
}

// -o takeover needs chargefs-keeper beside the daemon (the host bundle carries one: its keeper
// restarts a server by the same loader command line).
let takeoverProblem: String?
if let hostDaemon {
    takeoverProblem = FileManager.default.isExecutableFile(atPath: hostDaemon.dir + "/chargefs-keeper") ? nil
        : "the daemon bundle \(hostDaemon.dir) has no chargefs-keeper (rebuild the image: deploy/build-image.sh)"
} else if !FileManager.default.isExecutableFile(atPath: URL(fileURLWithPath: chargefsdPath).resolvingSymlinksInPath()
            .deletingLastPathComponent().appendingPathComponent("chargefs-keeper").path) {
    takeoverProblem = "chargefs-keeper is not installed next to \(chargefsdPath)"
} else {
    takeoverProblem = nil
}
if let takeoverProblem {
    log("WARNING: volumes are mounted without -o takeover (a killed chargefsd loses the volume's files): \(takeoverProblem)")
}

let state: StateStore
do {
    state = try StateStore(dir: options.stateDir)
} catch {
    fail(error.message)
}

let manager = VolumeManager(
    config: .init(tree: tree, hostViewProblem: hostViewProblem,
                  mounter: Chargefsd(binary: hostDaemon?.command.last ?? chargefsdPath, daemonCgroupProcs: daemonCgroupProcs, host: hostDaemon),
                  state: state, podCgroupWait: options.podCgroupWait, takeoverProblem: takeoverProblem),
    log: log)
log("\(IdentityService.driverName) \(IdentityService.version) node=\(options.nodeID) cgroups=\(tree.root) (v\(tree.version == .v2 ? 2 : 1)) daemons=\(daemonCgroupProcs.map { ($0 as NSString).deletingLastPathComponent }.joined(separator: ",")) chargefsd=\(hostDaemon.map { "\($0.dir) in the mount namespace of pid \($0.namespacePid)" } ?? chargefsdPath) state=\(options.stateDir) volumes=\(await manager.publishedCount)")

do {
    try await Server.run(socket: socket,
                         services: [IdentityService(), NodeService(nodeID: options.nodeID, manager: manager, log: log)],
                         log: log)
} catch let e as OptionError {
    fail(e.message)
} catch {
    fail("gRPC server on \(socket): \(error)")
}
