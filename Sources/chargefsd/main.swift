import CFuse
import ChargeFS
import Glibc

// First: a successor's log line of phases starts its own code here (exec and the runtime's
// start come before).
ProcessStart.mark()

// chargefsd: parse, check, (background: fork and wait for readiness), build the store and its
// charger, mount, serve, then tear down in reverse order.

func fail(_ message: String, status: Int32 = 1) -> Never {
    Daemon.printError(message)
    exit(status)
}

let options: MountOptions
do throws(UsageError) {
    options = try MountOptions.parse(Array(CommandLine.arguments.dropFirst()))
} catch {
    fail(error.description, status: 2)
}
if options.showHelp {
    print(MountOptions.usage)
    exit(0)
}
if options.showVersion {
    print("chargefsd \(chargefsVersion) (libfuse \(String(cString: fuse_pkgversion())))")
    exit(0)
}
if let mountpoint = options.upgradeMountpoint {
    exit(Upgrade.run(mountpoint: mountpoint))
}
if let target = options.cleanupTarget {
    // Removes the leaves dead daemons left below the target; a leaf holding a process (a live
    // daemon's helper, whatever its PID namespace) is kept, and nothing is killed.
    do throws(CgroupError) {
        let result = try StaleLeafCleanup.run(target: target)
        for leaf in result.removed { print("removed \(leaf)") }
        for leaf in result.inUse { print("kept \(leaf) (in use)") }
        if result.removed.isEmpty && result.inUse.isEmpty { print("nothing to clean below \(target)") }
        exit(0)
    } catch {
        fail(error.description)
    }
}

// A successor (started by the keeper) serves a mount that exists already.
if !options.isSuccessor {
    do throws(UsageError) {
        try Daemon.checkMountpoint(options.mountpoint)
    } catch {
        fail(error.description)
    }
}
// Resolved once, before anything starts, so a bad target mounts nothing.
var target: CgroupTarget?
if let memcg = options.chargeTargetPath {
    do throws(CgroupError) {
        target = try CgroupTarget.resolve(memcg, limitPolicy: options.memcgLimit)
    } catch {
        // Under memcg=auto the path checked is memcg_scope's: name that option.
        let message = error.description
        fail(options.memcgAuto && message.hasPrefix("memcg=") ? "memcg_scope=" + message.dropFirst(6) : message)
    }
}

let readiness = options.foreground || options.isSuccessor ? nil : Daemon.detach()
let status = Daemon.run(options: options, target: target, readiness: readiness)
exit(status)
