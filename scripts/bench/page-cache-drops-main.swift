// Driver of scripts/bench/page-cache-drops.sh: THREADS threads each release OPS inodes of their
// own (PageCacheDrops.take, as every last release asks), one in EVERY of them marked first by a
// writeback (noteWriteback); prints wall and CPU time per release.
import Dispatch
import Glibc

let args = CommandLine.arguments.dropFirst().compactMap { Int($0) }
let threads = args.count > 0 ? args[0] : 2, ops = args.count > 1 ? args[1] : 2_000_000
let every = args.count > 2 ? args[2] : 64

func seconds(_ clock: clockid_t) -> Double {
    var ts = timespec()
    clock_gettime(clock, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

let drops = PageCacheDrops()
let wall0 = seconds(CLOCK_MONOTONIC), cpu0 = seconds(CLOCK_PROCESS_CPUTIME_ID)
DispatchQueue.concurrentPerform(iterations: threads) { t in
    var hits = 0
    for i in 0..<ops {
        let ino = InodeNumber(rawValue: UInt64(t) << 40 | UInt64(i + 2))
        if every > 0 && i % every == 0 { drops.noteWriteback(ino) }
        if drops.take(ino) { hits += 1 }
    }
    precondition(hits == (every > 0 ? (ops + every - 1) / every : 0), "marks lost")
}
let wall = seconds(CLOCK_MONOTONIC) - wall0, cpu = seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu0
let n = Double(threads * ops)
func tenths(_ x: Double) -> String { let t = Int((x * 10).rounded()); return "\(t / 10).\(t % 10)" }
print("threads=\(threads) releases=\(threads * ops) marked=\(every > 0 ? "1/\(every)" : "none") wall_ns_per_release=\(tenths(wall / n * 1e9)) cpu_ns_per_release=\(tenths(cpu / n * 1e9))")
