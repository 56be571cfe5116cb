import CFuse
import Glibc
import SystemPackage

/// The memfds a successor takes the mount's metadata from: a journal and two checkpoint slots.
///
/// The journal's file starts with a header page:
///   0 magic, 8 version, 16 tail (bytes of published transactions after the header page;
///   release-stored), 24 the active checkpoint word (0: none; else generation * 2 + slot;
///   release-stored), 32 and 56 the two checkpoint descriptors {seq, length, checksum},
///   80 the saved INIT's length and from 88 its bytes.
/// Then transactions, each {payload length u32, kind u32, seq u64, checksum u64} and the payload,
/// padded to 8 bytes. A transaction counts once the tail passes it (the one commit point: a crash
/// before the store leaves it unpublished, rolled back); a successor also checks each one's
/// checksum and that seqs follow one another, and stops at the first that fails (a tail whose
/// bytes were torn or overwritten is dropped, never applied).
///
/// A checkpoint is the whole metadata in the inactive slot's memfd, then its descriptor, then
/// the active word switched to it (release): a crash before the switch leaves the old one. The
/// journal then restarts at offset 0; a crash before that restart only leaves transactions whose
/// seq the checkpoint already holds, which the scan skips.
public final class StateFiles: StateRoom, @unchecked Sendable {
    public static let magic: UInt64 = 0x4554_4154_5353_4643  // "CFSSTATE"
    /// 2: inode records carry memcg=auto users and the passthrough backing id; transactions and
    /// checkpoints carry the charge-target table. 3: a parent directory's times and link count
    /// as a record of their own, an answer that names an inode recorded in its transaction, and
    /// a four-lane checksum. 4: the ahead range of a backing file (a record of its own after
    /// the inode's in a transaction, a table at a checkpoint's end): additions only, so a
    /// version-3 state reads as one with no ahead ranges and is still taken over; the header
    /// says 4 once the files hold anything of 4 (`raiseVersion`), so that an older chargefsd
    /// refuses them instead of stopping at a record it does not know.
    public static let version: UInt64 = 4
    /// The versions this chargefsd takes over.
    public static let readableVersions: ClosedRange<UInt64> = 3...version
    static let headerBytes = 4096
    static let transactionHeaderBytes = 24
    public static let initMaxBytes = 2048
    /// Address space reserved for the journal's mapping (the file grows into it).
    static let journalReserve = 1 << 36

    public let journal: FileDescriptor
    public let checkpoints: [FileDescriptor]
    private let base: UnsafeMutableRawPointer
    /// Bytes of the journal file (header page included).
    @exclusivity(unchecked) private var fileBytes: Int
    // The mutable properties below skip Swift's dynamic exclusivity check: the journal has one
    // writer at a time, under the file system's lock.
    /// The next transaction's seq.
    @exclusivity(unchecked) public private(set) var nextSeq: UInt64 = 1
    /// The published tail as this process last stored it (it is the journal's only writer):
    /// where the next transaction goes, without a load of the header word.
    @exclusivity(unchecked) private var appendAt: Int
    /// Set when a transaction being encoded could not get room (the file could not grow): its
    /// bytes went to `spill` instead, and its commit fails with this.
    @exclusivity(unchecked) private var roomFailure: StateError?
    @exclusivity(unchecked) private var spill: UnsafeMutableRawPointer?

    private init(journal: FileDescriptor, checkpoints: [FileDescriptor], base: UnsafeMutableRawPointer, fileBytes: Int) {
        self.journal = journal
        self.checkpoints = checkpoints
        self.base = base
        self.fileBytes = fileBytes
        appendAt = Int(cfuse_load_acquire_u64((base + 16).assumingMemoryBound(to: UInt64.self)))
    }

    deinit {
        for room in slotRooms { if let room { munmap(room.base, Self.journalReserve) } }
        spill?.deallocate()
        munmap(base, Self.journalReserve)
        close(journal.rawValue)
        for fd in checkpoints { close(fd.rawValue) }
    }

    /// New, empty state files.
    public static func create() throws(StateError) -> StateFiles {
        var fds: [Int32] = []
        for name in ["chargefs-journal", "chargefs-checkpoint-0", "chargefs-checkpoint-1"] {
            let fd = cfuse_memfd_create(name, UInt32(CFUSE_MFD_CLOEXEC))
            guard fd >= 0 else {
                let err = errno
                fds.forEach { close($0) }
                throw .system("memfd_create", err)
            }
            fds.append(fd)
        }
        do throws(StateError) {
            // The first MiB allocated and mapped now, as `grow` does for the rest: not a page
            // fault per 4 KiB on the first changes (measured: 2.4% of a run's samples).
            let initial = 1 << 20
            guard cfuse_fallocate(fds[0], 0, 0, Int64(initial)) == 0 else { throw .system("fallocate", errno) }
            let base = try map(fds[0])
            _ = cfuse_madvise(base, initial, Int32(CFUSE_MADV_POPULATE_WRITE))
            let files = StateFiles(journal: FileDescriptor(rawValue: fds[0]),
                                   checkpoints: fds[1...].map { FileDescriptor(rawValue: $0) }, base: base, fileBytes: initial)
            files.word(8).pointee = version
            files.word(0).pointee = magic
            return files
        } catch {
            fds.forEach { close($0) }
            throw error
        }
    }

    /// Takes over state files by descriptor (duplicates: the caller keeps its own). Checks the
    /// header; the transactions are read by `transactions()`.
    public static func adopt(journal: FileDescriptor, checkpoints: [FileDescriptor]) throws(StateError) -> StateFiles {
        guard checkpoints.count == 2 else { throw .corrupt("\(checkpoints.count) checkpoint files (2 expected)") }
        var fds: [Int32] = []
        for fd in [journal] + checkpoints {
            let copy = fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0)
            guard copy >= 0 else {
                let err = errno
                fds.forEach { close($0) }
                throw .system("dup", err)
            }
            fds.append(copy)
        }
        do throws(StateError) {
            var st = stat()
            guard fstat(fds[0], &st) == 0 else { throw .system("fstat", errno) }
            guard st.st_size >= headerBytes else { throw .corrupt("the journal has \(st.st_size) bytes, less than its header") }
            let base = try map(fds[0])
            let v = base.load(fromByteOffset: 8, as: UInt64.self)
            let m = base.load(as: UInt64.self)
            guard m == magic, readableVersions.contains(v) else {
                // The words are read before the unmap (reading them after was a SIGSEGV: an
                // older state crashed the successor instead of being refused).
                munmap(base, journalReserve)
                throw m == magic ? .version(v) : .corrupt("the journal's header has no chargefs magic")
            }
            return StateFiles(journal: FileDescriptor(rawValue: fds[0]),
                              checkpoints: fds[1...].map { FileDescriptor(rawValue: $0) }, base: base, fileBytes: Int(st.st_size))
        } catch {
            fds.forEach { close($0) }
            throw error
        }
    }

    static func map(_ fd: Int32) throws(StateError) -> UnsafeMutableRawPointer {
        // The whole reserve: the file grows into it without a remap (touching past the file's
        // end would be SIGBUS, so `append` grows the file first).
        let mapped = mmap(nil, journalReserve, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        guard let mapped, mapped != MAP_FAILED else { throw .system("mmap", errno) }
        // Names, attributes and xattr values stay out of core dumps, as file data does.
        _ = cfuse_madvise(mapped, journalReserve, Int32(CFUSE_MADV_DONTDUMP))
        return mapped
    }

    @inline(__always)
    private func word(_ offset: Int) -> UnsafeMutablePointer<UInt64> {
        (base + offset).assumingMemoryBound(to: UInt64.self)
    }

    /// Bytes of published transactions.
    public var tail: Int { Int(cfuse_load_acquire_u64(word(16))) }

    /// The version the header says (an older readable one for state taken over from an older
    /// chargefsd, until `raiseVersion`).
    public var headerVersion: UInt64 { word(8).pointee }

    /// Says this version in the header, before the first record or checkpoint only it can read
    /// is published (a no-op once it does: one compare).
    func raiseVersion() {
        if word(8).pointee != Self.version { word(8).pointee = Self.version }
    }

    // MARK: - INIT

    /// Keeps the negotiated INIT (the request the kernel sent, to replay into a new session).
    public func saveInit(_ bytes: [UInt8]) throws(StateError) {
        guard bytes.count <= Self.initMaxBytes else { throw .unsupported("an INIT of \(bytes.count) bytes (at most \(Self.initMaxBytes))") }
        bytes.withUnsafeBytes { p in if let src = p.baseAddress { (base + 88).copyMemory(from: src, byteCount: p.count) } }
        cfuse_store_release_u64(word(80), UInt64(bytes.count))
    }

    /// The INIT saved by `saveInit`, nil when none was.
    public var savedInit: [UInt8]? {
        let n = Int(cfuse_load_acquire_u64(word(80)))
        guard n > 0, n <= Self.initMaxBytes else { return nil }
        return Array(UnsafeRawBufferPointer(start: base + 88, count: n))
    }

    // MARK: - Journal

    /// Appends one transaction and publishes it (the release store of the tail is its commit).
    public func append(kind: UInt32, _ payload: UnsafeRawBufferPointer) throws(StateError) {
        var e = beginTransaction()
        if let src = payload.baseAddress { e.take(payload.count).copyMemory(from: src, byteCount: payload.count) }
        try commitTransaction(kind: kind, e)
    }

    /// An encoder whose bytes go straight into the journal's mapping, past the published tail
    /// (unpublished until `commitTransaction`: a crash meanwhile leaves them ignored). One
    /// transaction at a time, under the caller's lock.
    @inline(__always)
    func beginTransaction() -> StateEncoder {
        let start = Self.headerBytes + appendAt + Self.transactionHeaderBytes
        return StateEncoder(base: base + start, capacity: fileBytes - start, room: self)
    }

    /// Room past the file's end: the file grows under the mapping (the base stays). If it
    /// cannot, the bytes go to a heap buffer and the commit fails.
    func grow(_ at: UnsafeMutableRawPointer, used: Int, needed: Int) -> (base: UnsafeMutableRawPointer, capacity: Int) {
        let start = at - base
        if roomFailure == nil {
            do throws(StateError) {
                // Padding to 8 bytes included, so that the commit never grows the file.
                try grow(to: start + needed + 8)
                return (at, fileBytes - start)
            } catch {
                roomFailure = error
            }
        }
        let bigger = UnsafeMutableRawPointer.allocate(byteCount: needed, alignment: 16)
        bigger.copyMemory(from: at, byteCount: used)
        spill?.deallocate()
        spill = bigger
        return (bigger, needed)
    }

    /// Seals what `e` (from `beginTransaction`) wrote into a transaction and publishes it: its
    /// header and checksum, then the release store of the tail.
    func commitTransaction(kind: UInt32, _ e: StateEncoder) throws(StateError) {
        if let roomFailure { throw roomFailure }
        let count = e.count
        let padded = (count + 7) & ~7
        let at = base + Self.headerBytes + appendAt
        let end = Self.headerBytes + appendAt + Self.transactionHeaderBytes + padded
        if end > fileBytes { try grow(to: end) }
        at.storeBytes(of: UInt32(count).littleEndian, as: UInt32.self)
        (at + 4).storeBytes(of: kind.littleEndian, as: UInt32.self)
        (at + 8).storeBytes(of: nextSeq.littleEndian, as: UInt64.self)
        (at + 16).storeBytes(of: Self.checksum(at, payloadCount: count).littleEndian, as: UInt64.self)
        appendAt += Self.transactionHeaderBytes + padded
        cfuse_store_release_u64(word(16), UInt64(appendAt))
        nextSeq += 1
    }

    /// The checksum of a transaction at `at`: its length, kind and seq, and its payload.
    private static func checksum(_ at: UnsafeRawPointer, payloadCount: Int) -> UInt64 {
        let head = stateChecksum(UnsafeRawBufferPointer(start: at, count: 16))
        return stateChecksum(UnsafeRawBufferPointer(start: at + transactionHeaderBytes, count: payloadCount), seed: head)
    }

    private func grow(to bytes: Int) throws(StateError) {
        guard bytes <= Self.journalReserve else { throw .unsupported("a journal past \(Self.journalReserve) bytes") }
        // Doubling, up to 64 MiB at a time: one ftruncate per many transactions.
        var size = fileBytes
        while size < bytes { size += min(size, 64 << 20) }
        // fallocate rather than ftruncate: the pages are allocated here, in one call, not by a
        // page fault at the first touch of each (one fault per ~13 records on the hot path).
        guard cfuse_fallocate(journal.rawValue, 0, Int64(fileBytes), Int64(size - fileBytes)) == 0 else {
            throw .system("fallocate", errno)
        }
        // And mapped in one call, not by a minor fault at the first store into each 4 KiB
        // (measured: 2% of a run's samples). Before 5.14 (EINVAL) the faults just happen.
        _ = cfuse_madvise(base + fileBytes, size - fileBytes, Int32(CFUSE_MADV_POPULATE_WRITE))
        fileBytes = size
    }

    /// One transaction as read back.
    public struct Transaction {
        public let kind: UInt32
        public let seq: UInt64
        public let payload: UnsafeRawBufferPointer
    }

    /// The published transactions after the active checkpoint, in order, up to the first that is
    /// torn (bad checksum, bad length, a seq out of order): that one and what follows are dropped
    /// and the tail is set back to the last good one. Also sets where appends go on.
    public func transactions(after checkpointSeq: UInt64) -> (transactions: [Transaction], dropped: Int) {
        let published = tail
        var offset = 0
        var out: [Transaction] = []
        var expected: UInt64? = nil
        var goodEnd = 0
        while offset + Self.transactionHeaderBytes <= published {
            let at = base + Self.headerBytes + offset
            let count = Int(UInt32(littleEndian: at.loadUnaligned(as: UInt32.self)))
            let kind = UInt32(littleEndian: (at + 4).loadUnaligned(as: UInt32.self))
            let seq = UInt64(littleEndian: (at + 8).loadUnaligned(as: UInt64.self))
            let sum = UInt64(littleEndian: (at + 16).loadUnaligned(as: UInt64.self))
            let padded = (count + 7) & ~7
            guard offset + Self.transactionHeaderBytes + padded <= published,
                  Self.checksum(at, payloadCount: count) == sum,
                  expected.map({ seq == $0 }) ?? true else { break }
            if seq > checkpointSeq {
                if expected == nil && seq != checkpointSeq + 1 { break }  // a gap after the checkpoint
                out.append(Transaction(kind: kind, seq: seq,
                                       payload: UnsafeRawBufferPointer(start: at + Self.transactionHeaderBytes, count: count)))
                expected = seq + 1
            }
            offset += Self.transactionHeaderBytes + padded
            goodEnd = offset
        }
        let dropped = published - goodEnd
        if dropped > 0 { cfuse_store_release_u64(word(16), UInt64(goodEnd)) }
        appendAt = goodEnd
        nextSeq = (out.last?.seq ?? checkpointSeq) + 1
        return (out, dropped)
    }

    // MARK: - Checkpoints

    /// The active checkpoint (its seq: the last transaction it holds) read in place, through a
    /// read-only mapping of its slot (no copy: at 1M files a checkpoint is over 100 MiB),
    /// checked against its checksum; nil if none.
    public func withActiveCheckpoint<T>(_ body: (_ seq: UInt64, _ bytes: UnsafeRawBufferPointer) throws(StateError) -> T)
        throws(StateError) -> T? {
        let active = cfuse_load_acquire_u64(word(24))
        guard active != 0 else { return nil }
        let slot = Int(active & 1)
        let seq = word(32 + slot * 24).pointee
        let length = Int(word(40 + slot * 24).pointee)
        let sum = word(48 + slot * 24).pointee
        guard length >= 0, length < 1 << 40 else { throw .corrupt("a checkpoint of \(length) bytes") }
        var st = stat()
        guard fstat(checkpoints[slot].rawValue, &st) == 0 else { throw .system("fstat", errno) }
        guard Int(st.st_size) >= length else { throw .corrupt("checkpoint \(slot) is shorter than its \(length) bytes") }
        guard length > 0 else { return try body(seq, UnsafeRawBufferPointer(start: nil, count: 0)) }
        let mapped = mmap(nil, length, PROT_READ, MAP_SHARED, checkpoints[slot].rawValue, 0)
        guard let mapped, mapped != MAP_FAILED else { throw .system("mmap", errno) }
        defer { munmap(mapped, length) }
        let bytes = UnsafeRawBufferPointer(start: mapped, count: length)
        guard stateChecksum(bytes) == sum else { throw .corrupt("checkpoint \(slot)'s checksum") }
        return try body(seq, bytes)
    }

    /// The active checkpoint copied out (tests, the state bench); nil when none.
    public func activeCheckpoint() throws(StateError) -> (seq: UInt64, bytes: [UInt8])? {
        try withActiveCheckpoint { seq, bytes in (seq, [UInt8](bytes)) }
    }

    /// Writes a checkpoint holding every transaction up to `nextSeq - 1` into the inactive slot,
    /// switches to it, and restarts the journal (see the type's comment for why each step may be
    /// cut short by a crash).
    public func checkpoint(_ bytes: UnsafeRawBufferPointer) throws(StateError) {
        let active = cfuse_load_acquire_u64(word(24))
        let slot = active == 0 ? 0 : Int((active & 1) ^ 1)
        let fd = checkpoints[slot].rawValue
        guard ftruncate(fd, off_t(bytes.count)) == 0 else { throw .system("ftruncate", errno) }
        var done = 0
        while done < bytes.count {
            let n = bytes.baseAddress.map { pwrite(fd, $0 + done, bytes.count - done, off_t(done)) } ?? 0
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw .system("pwrite", errno) }
            done += n
        }
        publishCheckpoint(slot: slot, active: active, bytes)
    }

    /// The slot's descriptor, then the active word switched to it (release), then the journal
    /// restarted (see the type's comment for a crash between any two).
    private func publishCheckpoint(slot: Int, active: UInt64, _ bytes: UnsafeRawBufferPointer) {
        let seq = nextSeq - 1
        word(32 + slot * 24).pointee = seq
        word(40 + slot * 24).pointee = UInt64(bytes.count)
        word(48 + slot * 24).pointee = stateChecksum(bytes)
        let generation = (active >> 1) + 1
        cfuse_store_release_u64(word(24), generation << 1 | UInt64(slot))
        cfuse_store_release_u64(word(16), 0)
        appendAt = 0
    }

    /// Each checkpoint slot's mapping, made at its first `writeCheckpoint`.
    private var slotRooms: [SlotRoom?] = [nil, nil]

    /// Writes a checkpoint as `checkpoint(_:)` does, but encoded by `body` straight into the
    /// inactive slot's memfd through a mapping: no heap buffer (fresh pages, each faulted in,
    /// then copied by pwrite) and the slot's pages, allocated by an earlier checkpoint, reused.
    /// Returns its size.
    func writeCheckpoint(_ body: (inout StateEncoder) throws(StateError) -> Void) throws(StateError) -> Int {
        let active = cfuse_load_acquire_u64(word(24))
        let slot = active == 0 ? 0 : Int((active & 1) ^ 1)
        let room: SlotRoom
        if let made = slotRooms[slot] {
            room = made
        } else {
            room = SlotRoom(fd: checkpoints[slot].rawValue, base: try Self.map(checkpoints[slot].rawValue))
            slotRooms[slot] = room
        }
        try room.start()
        var e = StateEncoder(base: room.base, capacity: room.allocated, room: room)
        try body(&e)
        if let failure = room.failure { throw failure }
        raiseVersion()  // the checkpoint is this version's
        publishCheckpoint(slot: slot, active: active, e.bytes)
        return e.count
    }

    /// Test hook: the journal's bytes after the header, to tear a transaction.
    public func withJournalBytes<T>(_ body: (UnsafeMutableRawBufferPointer) -> T) -> T {
        body(UnsafeMutableRawBufferPointer(start: base + Self.headerBytes, count: tail))
    }
}

/// A checkpoint slot's memfd as a `StateRoom`: mapped like the journal (64 GiB of address space
/// reserved, MADV_DONTDUMP), grown by fallocate and populated; its pages stay allocated for the
/// next checkpoint into the same slot (the file is not truncated: the descriptor's length says
/// how much is the checkpoint).
final class SlotRoom: StateRoom {
    let fd: Int32
    let base: UnsafeMutableRawPointer
    private(set) var allocated = 0
    private(set) var failure: StateError?
    private var spill: UnsafeMutableRawPointer?

    init(fd: Int32, base: UnsafeMutableRawPointer) {
        self.fd = fd
        self.base = base
    }

    deinit { spill?.deallocate() }

    /// Before each checkpoint: the file's size as it is now (a test, or `checkpoint(_:)`,
    /// may have truncated it; stores past it would be SIGBUS).
    func start() throws(StateError) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .system("fstat", errno) }
        allocated = Int(st.st_size)
        failure = nil
    }

    func grow(_ at: UnsafeMutableRawPointer, used: Int, needed: Int) -> (base: UnsafeMutableRawPointer, capacity: Int) {
        if failure == nil, at == base {
            var size = max(allocated, 1 << 20)
            while size < needed { size += min(size, 64 << 20) }
            if size <= StateFiles.journalReserve,
               cfuse_fallocate(fd, 0, Int64(allocated), Int64(size - allocated)) == 0 {
                _ = cfuse_madvise(base + allocated, size - allocated, Int32(CFUSE_MADV_POPULATE_WRITE))
                allocated = size
                return (base, size)
            }
            failure = size > StateFiles.journalReserve ? .unsupported("a checkpoint past \(StateFiles.journalReserve) bytes")
                                                       : .system("fallocate", errno)
        }
        // Out of room: the bytes go to the heap and the checkpoint fails.
        let bigger = UnsafeMutableRawPointer.allocate(byteCount: needed, alignment: 16)
        bigger.copyMemory(from: at, byteCount: used)
        spill?.deallocate()
        spill = bigger
        return (bigger, needed)
    }
}
