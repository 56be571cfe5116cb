import Glibc

/// Where a `StateEncoder` gets more room when a record outgrows what it was given: the
/// journal's file grown under its mapping (same base), or a heap buffer reallocated.
protocol StateRoom: AnyObject {
    /// Room for at least `needed` bytes from the returned base, whose first `used` bytes are
    /// those at `base`; and the room's size.
    func grow(_ base: UnsafeMutableRawPointer, used: Int, needed: Int) -> (base: UnsafeMutableRawPointer, capacity: Int)
}

/// Little-endian values stored straight where they go (the journal's mapping, or a
/// checkpoint's buffer). A struct passed inout: the hot path is a bounds compare and plain
/// stores, with no reference counting and no dynamic exclusivity check; only running out of
/// room calls its `StateRoom` (out of line).
struct StateEncoder {
    private(set) var base: UnsafeMutableRawPointer
    private(set) var count = 0
    private var capacity: Int
    unowned(unsafe) let room: any StateRoom

    init(base: UnsafeMutableRawPointer, capacity: Int, room: any StateRoom) {
        self.base = base
        self.capacity = capacity
        self.room = room
    }

    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }

    @inline(__always)
    mutating func reserve(_ n: Int) {
        if count + n > capacity { more(n) }
    }

    @inline(never)
    private mutating func more(_ n: Int) {
        (base, capacity) = room.grow(base, used: count, needed: count + n)
    }

    /// `n` bytes to store into at once (fixed fields: one check of room); they count as written.
    @inline(__always)
    mutating func take(_ n: Int) -> UnsafeMutableRawPointer {
        reserve(n)
        defer { count += n }
        return base + count
    }

    @inline(__always)
    mutating func u8(_ v: UInt8) {
        reserve(1)
        base.storeBytes(of: v, toByteOffset: count, as: UInt8.self)
        count += 1
    }

    @inline(__always)
    mutating func u32(_ v: UInt32) {
        reserve(4)
        base.storeBytes(of: v.littleEndian, toByteOffset: count, as: UInt32.self)
        count += 4
    }

    @inline(__always)
    mutating func u64(_ v: UInt64) {
        reserve(8)
        base.storeBytes(of: v.littleEndian, toByteOffset: count, as: UInt64.self)
        count += 8
    }

    @inline(__always)
    mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }

    /// Overwrites a UInt32 written earlier at `offset` (a count known only after its items).
    @inline(__always)
    mutating func patch(_ v: UInt32, at offset: Int) {
        base.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt32.self)
    }

    /// A length (UInt32) and the bytes.
    mutating func blob(_ v: [UInt8]) {
        v.withUnsafeBytes { p in blob(p) }
    }

    mutating func blob(_ p: UnsafeRawBufferPointer) {
        reserve(4 + p.count)
        base.storeBytes(of: UInt32(truncatingIfNeeded: p.count).littleEndian, toByteOffset: count, as: UInt32.self)
        if let src = p.baseAddress { (base + count + 4).copyMemory(from: src, byteCount: p.count) }
        count += 4 + p.count
    }
}

/// Stores into a little-endian record at fixed offsets (`StateEncoder.take`).
extension UnsafeMutableRawPointer {
    @inline(__always)
    func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
        storeBytes(of: v.littleEndian, toByteOffset: offset, as: T.self)
    }
}

/// Appends little-endian values to a buffer of its own: what a checkpoint is written in (a
/// journal transaction is encoded straight into the journal's mapping). Kept and reused.
public final class StateWriter: StateRoom {
    private var base: UnsafeMutableRawPointer
    private var capacity: Int
    public private(set) var count = 0

    public init(capacity: Int = 4096) {
        self.capacity = max(64, capacity)
        base = UnsafeMutableRawPointer.allocate(byteCount: self.capacity, alignment: 16)
    }

    deinit { base.deallocate() }

    public func reset() { count = 0 }

    /// What was written so far (valid until the next write or reset).
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }

    func grow(_ old: UnsafeMutableRawPointer, used: Int, needed: Int) -> (base: UnsafeMutableRawPointer, capacity: Int) {
        var size = capacity * 2
        while size < needed { size *= 2 }
        let bigger = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        bigger.copyMemory(from: old, byteCount: used)
        base.deallocate()
        base = bigger
        capacity = size
        return (bigger, size)
    }

    /// Appends through an encoder (the fast path: a struct on the caller's stack).
    func encode<E: Error>(_ body: (inout StateEncoder) throws(E) -> Void) throws(E) {
        var e = StateEncoder(base: base, capacity: capacity, room: self)
        // The encoder starts at the buffer's start: what was written so far is kept by
        // advancing it past those bytes first.
        _ = e.take(count)
        defer { count = e.count }
        try body(&e)
    }

    public func u8(_ v: UInt8) { encode { $0.u8(v) } }
    public func u32(_ v: UInt32) { encode { $0.u32(v) } }
    public func u64(_ v: UInt64) { encode { $0.u64(v) } }
    public func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    /// A length (UInt32) and the bytes.
    public func blob(_ v: [UInt8]) { encode { $0.blob(v) } }
}

/// Reads what `StateWriter` wrote. Every read is bounds-checked: state that does not parse is an
/// error (`StateError.corrupt`), never a trap, since a successor must not crash on it.
public struct StateReader {
    let bytes: UnsafeRawBufferPointer
    public private(set) var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var atEnd: Bool { offset >= bytes.count }

    @inline(__always)
    private mutating func take(_ n: Int) throws(StateError) -> Int {
        guard n >= 0, bytes.count - offset >= n else { throw Self.pastEnd(offset) }
        defer { offset += n }
        return offset
    }

    /// The error, out of line: with its message built inline, u32 and u64 were not inlined
    /// and calls to them were 7% of a successor's CPU (perf, 10,000 files).
    @inline(never)
    static func pastEnd(_ offset: Int) -> StateError { .corrupt("a record ends past its transaction (at byte \(offset))") }

    @inline(__always)
    public mutating func u8() throws(StateError) -> UInt8 { bytes[try take(1)] }

    @inline(__always)
    public mutating func u32() throws(StateError) -> UInt32 {
        UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(4), as: UInt32.self))
    }

    @inline(__always)
    public mutating func u64() throws(StateError) -> UInt64 {
        UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(8), as: UInt64.self))
    }

    public mutating func i64() throws(StateError) -> Int64 { Int64(bitPattern: try u64()) }

    public mutating func blob(max: Int = 1 << 20) throws(StateError) -> [UInt8] {
        let n = Int(try u32())
        guard n <= max else { throw .corrupt("a value of \(n) bytes (at most \(max))") }
        let start = try take(n)
        return Array(bytes[start..<(start + n)])
    }
}

/// Why a state could not be kept or taken over.
public enum StateError: Error, Equatable, CustomStringConvertible {
    case system(String, Int32)
    case corrupt(String)
    case version(UInt64)
    case unsupported(String)

    public var description: String {
        switch self {
        case .system(let call, let err): "state: \(call): \(String(cString: strerror(err)))"
        case .corrupt(let what): "state is corrupt: \(what)"
        case .version(let v): "state version \(v) is not one this chargefsd reads (it reads \(StateFiles.readableVersions.lowerBound) to \(StateFiles.version))"
        case .unsupported(let what): "state cannot be taken over: \(what)"
        }
    }
}

/// A checksum that detects a torn or overwritten transaction (not an adversary: the memfd is the
/// daemon's own). Four independent lanes of 8 bytes (a multiply and a shift each), so the CPU
/// runs them side by side: about 0.2 cycles a byte, ~25 ns for a 400-byte transaction. Each
/// step is a bijection of its lane, so any one changed word changes the result.
public func stateChecksum(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
    let k: UInt64 = 0x9E37_79B9_7F4A_7C15
    let n = bytes.count
    var a: UInt64 = 0x243F_6A88_85A3_08D3 ^ seed ^ UInt64(n)
    var b: UInt64 = 0x1319_8A2E_0370_7344 ^ seed
    var c: UInt64 = 0xA409_3822_299F_31D0
    var d: UInt64 = 0x082E_FA98_EC4E_6C89
    var i = 0
    while i + 32 <= n {
        a = (a ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* k; a ^= a >> 29
        b = (b ^ bytes.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)) &* k; b ^= b >> 29
        c = (c ^ bytes.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)) &* k; c ^= c >> 29
        d = (d ^ bytes.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)) &* k; d ^= d >> 29
        i += 32
    }
    while i + 8 <= n {
        a = (a ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* k; a ^= a >> 29
        i += 8
    }
    var last: UInt64 = 0
    var shift: UInt64 = 0
    while i < n {
        last |= UInt64(bytes[i]) << shift
        shift += 8
        i += 1
    }
    var h = (a ^ last ^ 0xFF) &* 0xBF58_476D_1CE4_E5B9
    h = (h ^ (h >> 31) ^ b) &* k
    h = (h ^ (h >> 29) ^ c) &* 0xBF58_476D_1CE4_E5B9
    h = (h ^ (h >> 31) ^ d) &* k
    return h ^ (h >> 32)
}
