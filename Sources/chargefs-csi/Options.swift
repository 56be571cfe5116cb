/// The command line: `chargefs-csi --endpoint unix:///csi/csi.sock --node-id NODE
/// [--cgroup-root PATH] [--state-dir DIR] [--chargefsd PATH] [--daemon-cgroup PATH]
/// [--pod-cgroup-wait SECONDS] [--daemon-bundle DIR] [--daemon-dir DIR]`. Bad input is one line
/// on stderr and exit status 2.
struct Options: Sendable {
    var endpoint = ""
    var nodeID = ""
    var cgroupRoot = "/sys/fs/cgroup"
    var stateDir = "/var/lib/kubelet/plugins/csi.chargefs.io/state"
    var chargefsd: String?
    /// Where the daemons run; relative paths are below the memory hierarchy's root.
    var daemonCgroup = "csi.chargefs.io"
    var podCgroupWait = 30.0
    /// The daemon's files for the host (deploy/build-image.sh makes them); nil: --chargefsd.
    var daemonBundle: String?
    var daemonDir = "/var/lib/kubelet/plugins/csi.chargefs.io/daemon"

    static let usage = """
        usage: chargefs-csi --endpoint unix:///csi/csi.sock --node-id NODE [options]
          --endpoint URL          unix:///PATH (or unix:PATH, or PATH) of the CSI socket
          --node-id NODE          this node's name, as NodeGetInfo reports it
          --cgroup-root PATH      the node's cgroup mount (default /sys/fs/cgroup; on a cgroup v1
                                  host its memory/ hierarchy is used)
          --state-dir DIR         where published volumes are recorded, on the node's disk so that a
                                  restarted plugin finds them (default /var/lib/kubelet/plugins/csi.chargefs.io/state)
          --chargefsd PATH        the chargefsd binary (default: next to chargefs-csi, then PATH)
          --daemon-cgroup PATH    node-level memory cgroup for the chargefsd daemons themselves
                                  (default csi.chargefs.io, relative to the memory hierarchy's root;
                                  the same path on every other hierarchy where the plugin has a cgroup)
          --pod-cgroup-wait SECS  how long NodePublishVolume waits for the pod's cgroup (default 30)
          --daemon-bundle DIR     run in a container: copy the daemon from DIR to --daemon-dir on the
                                  host and start daemons in the host's mount namespace from there, so
                                  that they outlive the container (see deploy/kubernetes/README.md)
          --daemon-dir DIR        the host folder for those copies (default
                                  /var/lib/kubelet/plugins/csi.chargefs.io/daemon)
          --version, --help
        """

    enum Parsed { case run(Options), help, version }

    static func parse(_ rawArgs: [String]) -> Result<Parsed, OptionError> {
        // "--name=value" is the same as "--name value"
        let args = rawArgs.flatMap { a -> [String] in
            guard a.hasPrefix("--"), let eq = a.firstIndex(of: "=") else { return [a] }
            return [String(a[..<eq]), String(a[a.index(after: eq)...])]
        }
        var o = Options()
        var i = 0
        while i < args.count {
            let a = args[i]
            switch a {
            case "-h", "--help": return .success(.help)
            case "-V", "--version": return .success(.version)
            case "--endpoint", "--node-id", "--cgroup-root", "--state-dir", "--chargefsd", "--daemon-cgroup", "--pod-cgroup-wait",
                 "--daemon-bundle", "--daemon-dir":
                guard i + 1 < args.count, !args[i + 1].isEmpty else { return .failure(OptionError("\(a) needs a value")) }
                if let e = set(a, args[i + 1], into: &o) { return .failure(e) }
                i += 2
            default:
                return .failure(OptionError("unknown argument \"\(a)\" (see --help)"))
            }
        }
        if o.endpoint.isEmpty { return .failure(OptionError("--endpoint is required (e.g. unix:///csi/csi.sock)")) }
        if o.nodeID.isEmpty { return .failure(OptionError("--node-id is required")) }
        return .success(.run(o))
    }

    private static func set(_ name: String, _ v: String, into o: inout Options) -> OptionError? {
        switch name {
        case "--endpoint":
            guard Server.socketPath(endpoint: v) != nil else {
                return OptionError("--endpoint \"\(v)\" is not a unix socket (unix:///path/to/csi.sock)")
            }
            o.endpoint = v
        case "--node-id": o.nodeID = v
        case "--cgroup-root":
            guard v.hasPrefix("/") else { return OptionError("--cgroup-root \"\(v)\" is not an absolute path") }
            o.cgroupRoot = v
        case "--state-dir":
            guard v.hasPrefix("/") else { return OptionError("--state-dir \"\(v)\" is not an absolute path") }
            o.stateDir = v
        case "--chargefsd": o.chargefsd = v
        case "--daemon-cgroup":
            guard !v.split(separator: "/").contains("..") else { return OptionError("--daemon-cgroup \"\(v)\" must not contain ..") }
            o.daemonCgroup = v
        case "--daemon-bundle":
            guard v.hasPrefix("/") else { return OptionError("--daemon-bundle \"\(v)\" is not an absolute path") }
            o.daemonBundle = v
        case "--daemon-dir":
            guard v.hasPrefix("/"), !v.split(separator: "/").contains("..") else {
                return OptionError("--daemon-dir \"\(v)\" is not an absolute path without ..")
            }
            o.daemonDir = v
        case "--pod-cgroup-wait":
            guard let s = Double(v), s >= 0, s <= 3600 else {
                return OptionError("--pod-cgroup-wait \"\(v)\" is not a number of seconds (0 to 3600)")
            }
            o.podCgroupWait = s
        default: return OptionError("unknown argument \"\(name)\"")
        }
        return nil
    }
}

struct OptionError: Error {
    let message: String
    init(_ m: String) { message = m }
}
