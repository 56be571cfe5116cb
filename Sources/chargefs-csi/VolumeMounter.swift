/// What VolumeManager needs of the node: starting and stopping a volume's daemon and reading its
/// mount. `Chargefsd` is the real one; the unit tests drive VolumeManager with a fake. Blocking
/// calls: VolumeManager runs them off the async executor.
protocol VolumeMounter: Sendable {
    /// Mounts a volume at `target` (an existing directory) with chargefsd `options`; nil on
    /// success, else the daemon's own error. `logFile` takes the daemon's words meanwhile.
    func mountVolume(target: String, options: [String], logFile: String) -> String?
    /// Unmounts whatever is mounted at `target` and waits for its daemon to go; nil on success.
    func unmountVolume(target: String) -> String?
    /// Whether a chargefs mount is at `path` and its daemon answers.
    func volumeState(_ path: String) -> Chargefsd.MountState
    /// Whether anything at all is mounted at `path` (the target may only be removed when not).
    func hasMount(at path: String) -> Bool
    /// The mount's type, status attribute and figures, never waiting past a deadline.
    func probeVolume(_ path: String) -> VolumeProbe
}

extension Chargefsd: VolumeMounter {
    func mountVolume(target: String, options: [String], logFile: String) -> String? {
        mount(target: target, options: options, logFile: logFile, timeout: 60)
    }

    func unmountVolume(target: String) -> String? {
        Self.unmount(target: target, timeout: 10)
    }

    func volumeState(_ path: String) -> MountState {
        Self.mountState(path)
    }

    func hasMount(at path: String) -> Bool {
        Self.mountType(path) != nil
    }

    func probeVolume(_ path: String) -> VolumeProbe {
        Self.probe(path)
    }
}
