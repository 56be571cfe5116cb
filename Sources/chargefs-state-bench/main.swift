// What keeping state for a successor costs (docs/takeover.md, "Measured"): per operation with and
// without state, a checkpoint, and a successor's rebuild from the journal alone and from a
// checkpoint, in-process (no mount: no kernel round trip is counted).
// Build in release: swift build -c release --product chargefs-state-bench
// Usage: chargefs-state-bench FILES [OPS [with|without|requests [warm]]]   e.g. 10000 20000, or 1000000 0
// (rebuild only), or 0 100000 with (one pass of the operations with state only, for
// `perf stat -e instructions:u` or `perf record`, which a loaded machine does not skew as it
// skews time). `requests`: with state, each change passing a RequestContext as the Bridge does
// (its answer kept for a resend), which `with` leaves out. `warm`: see `perOp`.
import ChargeFS
import Glibc
import SystemPackage

func now() -> Double { Double(MonotonicClock.nanoseconds()) / 1e9 }

/// This thread's CPU time: the per-operation figures leave out the time the thread waited for a
/// CPU (the machine this ran on is shared and loaded; wall time moved 1.7x between runs).
func cpuNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func fail(_ message: String) -> Never {
    let line = "chargefs-state-bench: \(message)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    exit(1)
}

func fixed(_ v: Double, _ digits: Int = 1) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (v * scale).rounded() / scale
    return "\(r)"
}

let args = CommandLine.arguments
guard args.count >= 2, let files = Int(args[1]), files >= 0 else { fail("usage: chargefs-state-bench FILES [OPS [with|without]]") }
let ops = args.count > 2 ? Int(args[2]) ?? -1 : 20_000
guard ops >= 0 else { fail("OPS must be a number") }
let only = args.count > 3 ? args[3] : nil
let warm = args.count > 4 && args[4] == "warm"
guard only == nil || only == "with" || only == "without" || only == "requests" else {
    fail("the third argument is with, without or requests, not \(args[3])")
}
let me = Caller(uid: 0, gid: 0)
let page = [UInt8](repeating: 0x5a, count: 4096)

func config() -> FileSystemConfig {
    var config = FileSystemConfig()
    config.noatime = true
    return config
}

func makeFS(state: Bool, keeper: InProcessKeeper) throws -> FileSystem {
    let arena = try Arena(capacityPages: 1 << 22)
    let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
    if !state { return FileSystem(config: config(), store: store) }
    return try FileSystem(config: config(), store: store, state: try StateFiles.create(), keeper: keeper)
}

/// ns per operation: mknod, a 4 KiB write to a new page, an overwrite of it, getattr, unlink.
/// `requests`: each change passes a unique, as the Bridge does with state kept.
/// `warm`: the same operations run once untimed first (and, with state, a checkpoint then
/// restarts the journal at offset 0), so the timed pass finds the journal's pages already
/// allocated and mapped, as a mount does once its journal has reached its largest size; a
/// fresh mount's journal allocates a page per ~25 records as it grows.
func perOp(state: Bool, requests: Bool = false, warm: Bool = false) throws -> [(String, Double)] {
    let fs = try makeFS(state: state, keeper: InProcessKeeper())
    if warm {
        for i in 0..<ops {
            let name: FileName = Array("w\(i)".utf8)
            let ino = try fs.mknod(parent: .root, name: name, mode: 0o100644, rdev: 0, caller: me).ino
            for _ in 0..<2 { _ = try page.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false) } }
            try fs.unlink(parent: .root, name: name)
        }
        fs.checkpointNow()
    }
    var unique: UInt64 = 0
    func request() -> RequestContext? {
        guard requests else { return nil }
        unique += 2
        return RequestContext(unique: unique)
    }
    let names: [FileName] = (0..<ops).map { Array("f\($0)".utf8) }
    var inos: [InodeNumber] = []
    inos.reserveCapacity(ops)
    var out: [(String, Double)] = []
    func timed(_ what: String, _ body: () throws -> Void) rethrows {
        let t = cpuNow()
        try body()
        out.append((what, (cpuNow() - t) / Double(ops) * 1e9))
    }
    try timed("mknod") { for name in names { inos.append(try fs.mknod(parent: .root, name: name, mode: 0o100644, rdev: 0, caller: me, request: request()).ino) } }
    try timed("write 4 KiB, new page") {
        for ino in inos {
            let r = request()
            _ = try page.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false, request: r) }
        }
    }
    try timed("write 4 KiB, overwrite") {
        for ino in inos {
            let r = request()
            _ = try page.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false, request: r) }
        }
    }
    try timed("getattr") { for ino in inos { _ = try fs.getattr(ino) } }
    try timed("unlink") { for name in names { try fs.unlink(parent: .root, name: name, request: request()) } }
    return out
}

func stateFiles(_ keeper: InProcessKeeper) throws -> StateFiles {
    guard let journal = keeper.descriptor(.journal), let c0 = keeper.descriptor(.checkpoint(0)),
          let c1 = keeper.descriptor(.checkpoint(1)) else { fail("the keeper lost a state file") }
    return try StateFiles.adopt(journal: journal, checkpoints: [c0, c1])
}

func takeOver(_ keeper: InProcessKeeper) throws -> FileSystem {
    guard let fd = keeper.descriptor(.arena) else { fail("the keeper has no arena") }
    let arena = try Arena(adopting: fd, tmpfsRoot: keeper.descriptor(.arenaRoot), backing: .memfd)
    return try FileSystem(takingOver: try stateFiles(keeper), keeper: keeper, config: config()) {
        PageStore(adopting: arena, charger: DaemonCharger(arena: arena.fileDescriptor), inUse: $0, backingPages: $1)
    }
}

do {
    if let only {
        for (k, v) in try perOp(state: only != "without", requests: only == "requests", warm: warm) { print("  \(k): \(fixed(v, 0)) ns") }
        exit(0)
    }
    if ops > 0 {
        print("per operation, \(ops) of each, ns of the thread's CPU time, best of 3 (in-process: no FUSE round trip):")
        var without: [String: Double] = [:], with: [String: Double] = [:]
        var order: [String] = []
        for _ in 0..<3 {
            for (k, v) in try perOp(state: false) { without[k] = min(without[k] ?? .infinity, v); if !order.contains(k) { order.append(k) } }
            for (k, v) in try perOp(state: true) { with[k] = min(with[k] ?? .infinity, v) }
        }
        for k in order {
            let a = without[k] ?? 0, b = with[k] ?? 0
            print("  \(k): without \(fixed(a, 0)), with \(fixed(b, 0)), +\(fixed(b - a, 0))")
        }
    }

    if files == 0 { exit(0) }
    // A tree of FILES files in directories of 1000; every file with 100 bytes up to 100k files,
    // beyond that one in 16 (1M pages would be 4 GiB of arena on a shared machine).
    let keeper = InProcessKeeper()
    var fs: FileSystem? = try makeFS(state: true, keeper: keeper)
    guard let built = fs else { fail("no file system") }
    built.setCheckpointBytes(Int.max)  // the journal alone first
    let data = [UInt8](repeating: 0x61, count: 100)
    var t = now()
    var dir = InodeNumber.root
    for i in 0..<files {
        if i % 1000 == 0 { dir = try built.mkdir(parent: .root, name: Array("d\(i / 1000)".utf8), mode: 0o755, caller: me).ino }
        let ino = try built.mknod(parent: dir, name: Array("f\(i)".utf8), mode: 0o100644, rdev: 0, caller: me).ino
        if files <= 100_000 || i % 16 == 0 {
            _ = try data.withUnsafeBytes { try built.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false) }
        }
    }
    let buildSeconds = now() - t
    let journalBytes = try stateFiles(keeper).tail
    let used = built.storedBytes().used
    print("tree: \(files) files built in \(fixed(buildSeconds, 2)) s; journal \(journalBytes / 1024) KiB; \(used / 4096) pages in use")
    fs = nil  // the crash: nothing cleaned up; the keeper's descriptors remain

    t = now()
    var cpu = cpuNow()
    let second = try takeOver(keeper)
    let fromJournal = now() - t
    let fromJournalCPU = cpuNow() - cpu
    guard second.storedBytes().used == used else { fail("pages in use \(second.storedBytes().used) after the takeover, \(used) before") }
    print("rebuild from the journal alone (\(second.takeover?.transactions ?? 0) transactions): \(fixed(fromJournal * 1000)) ms, CPU \(fixed(fromJournalCPU * 1000)) ms")

    cpu = cpuNow()
    second.checkpointNow()
    let checkpointCPU = cpuNow() - cpu
    let figures = second.checkpointFigures
    let checkpointBytes = (try stateFiles(keeper).activeCheckpoint()?.bytes.count) ?? 0
    print("checkpoint (under the shared lock): \(fixed(Double(figures.lastNanoseconds) / 1e6)) ms, CPU \(fixed(checkpointCPU * 1000)) ms, \(checkpointBytes / 1024) KiB")
    fs = second
    fs = nil
    t = now()
    cpu = cpuNow()
    let third = try takeOver(keeper)
    let fromCheckpoint = now() - t
    let fromCheckpointCPU = cpuNow() - cpu
    guard third.storedBytes().used == used else { fail("pages in use differ after the second takeover") }
    print("rebuild from the checkpoint: \(fixed(fromCheckpoint * 1000)) ms, CPU \(fixed(fromCheckpointCPU * 1000)) ms (\(third.takeover?.inodes ?? 0) inodes)")
} catch {
    fail("\(error)")
}
