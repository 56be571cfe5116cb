import CFuse
import CFuseTransport
import Glibc
import SystemPackage

/// FUSE over io_uring (Linux 6.14+): a second transport beside /dev/fuse. INIT still comes over
/// /dev/fuse; when the kernel offers FUSE_OVER_IO_URING and the mount wants it, the rings are set
/// up before the INIT reply claims the flag (so a host refusing io_uring costs nothing), and
/// registered right after it. From then on the kernel holds every request until each queue has
/// registered, and sends all but FORGET and INTERRUPT (still /dev/fuse's) over the rings.
///
/// The kernel has one queue per possible CPU and needs them all before it uses any. Each has
/// its workers (UringQueue), bound to its CPU where the daemon may run there (unbound otherwise).
/// Teardown: unmounting ends every entry with ENOTCONN, so the threads return by themselves;
/// `stop` ends their waits through an eventfd for the other exits.
final class UringTransport: @unchecked Sendable {

    /// What the host allows, from /sys/module/fuse/parameters/enable_uring (Linux 6.14+, and
    /// CONFIG_FUSE_IO_URING: the file exists; Y: FUSE offers io_uring to new mounts).
    enum HostSupport: Equatable {
        case enabled
        case disabled
        case absent
    }
    static let enableKnob = "/sys/module/fuse/parameters/enable_uring"

    static func hostSupport() -> HostSupport {
        guard let file = fopen(enableKnob, "r") else { return .absent }
        defer { fclose(file) }
        return fgetc(file) == Int32(UInt8(ascii: "Y")) ? .enabled : .disabled
    }

    /// CPUs the kernel makes queues for (num_possible_cpus: /sys/devices/system/cpu/possible,
    /// e.g. "0-3" or "0,2-5"); nil when it cannot be read.
    static func possibleCPUs() -> Int? {
        guard let file = fopen("/sys/devices/system/cpu/possible", "r") else { return nil }
        defer { fclose(file) }
        var buffer = [CChar](repeating: 0, count: 256)
        guard fgets(&buffer, Int32(buffer.count), file) != nil else { return nil }
        let text = String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var count = 0
        for range in text.split(separator: ",") {
            let ends = range.trimmingPrefix(" ").split(separator: "-").map { Int($0.filter(\.isNumber)) }
            guard let first = ends.first, let low = first else { return nil }
            let high = ends.count > 1 ? (ends[1] ?? low) : low
            count += high - low + 1
        }
        return count > 0 ? count : nil
    }

    /// Whether this process may set up an io_uring at all (kernel.io_uring_disabled, seccomp).
    static func probe() -> Errno? {
        let rc = cfuse_uring_probe()
        return rc == 0 ? nil : Errno(rawValue: -rc)
    }

    private let queues: [UringQueue]

    /// Sets up one ring per possible CPU with payload buffers of `payloadSize` bytes.
    init(connection session: FuseConnection, fuseFD: Int32, payloadSize: Int) throws(Errno) {
        guard let cpus = Self.possibleCPUs() else { throw .noSuchFileOrDirectory }
        let page = PageSize.bytes
        let size = max(8192, (payloadSize + page - 1) / page * page)
        var queues: [UringQueue] = []
        for qid in 0..<cpus {
            queues.append(try UringQueue(qid: UInt32(qid), session: session, fuseFD: fuseFD, payloadSize: size))
        }
        self.queues = queues
    }

    var queueCount: Int { queues.count }

    /// Starts each queue's thread and waits until all have registered (or one failed). Returns
    /// nil on success, else the first error.
    func start() -> Errno? {
        let latch = Latch(count: queues.count * UringQueue.initialWorkers)
        for queue in queues { queue.start(registered: { latch.arrive($0) }) }
        let rc = latch.wait()
        return rc == 0 ? nil : Errno(rawValue: -rc)
    }

    func stop() {
        for queue in queues { queue.stop() }
    }
}

/// Waits for `count` threads to report; keeps the first failure.
private final class Latch: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var remaining: Int
    private var firstError: Int32 = 0

    init(count: Int) {
        remaining = count
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    func arrive(_ rc: Int32) {
        pthread_mutex_lock(&mutex)
        if rc != 0 && firstError == 0 { firstError = rc }
        remaining -= 1
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&mutex)
    }

    func wait() -> Int32 {
        pthread_mutex_lock(&mutex)
        while remaining > 0 { pthread_cond_wait(&cond, &mutex) }
        let rc = firstError
        pthread_mutex_unlock(&mutex)
        return rc
    }
}
