import Glibc

/// Appends little-endian values to a buffer of its own: what a journal transaction or a
/// checkpoint is written in. Kept and reused (no allocation per transaction once it has grown),
/// and written with plain stores: a record costs tens of nanoseconds, not one generic append per
/// field.
public final class StateWriter {
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

    @inline(__always)
    private func reserve(_ n: Int) {
        if count + n > capacity { grow(count + n) }
    }

    private func grow(_ needed: Int) {
        var size = capacity * 2
        while size < needed { size *= 2 }
        let bigger = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        bigger.copyMemory(from: base, byteCount: count)
        base.deallocate()
        base = bigger
        capacity = size
    }

    /// Writes up to `maximum` bytes through `body` in one step (one check of room, one update of
    /// the count: a record's fixed fields then cost plain stores); `body` returns how many it wrote.
    @inline(__always)
    public func fixed(_ maximum: Int, _ body: (inout FixedFields) -> Void) {
        reserve(maximum)
        var fields = FixedFields(base: base + count)
        body(&fields)
        count += min(fields.offset, maximum)
    }

    @inline(__always)
    public func u8(_ v: UInt8) {
        reserve(1)
        base.storeBytes(of: v, toByteOffset: count, as: UInt8.self)
        count += 1
    }

    @inline(__always)
    public func u32(_ v: UInt32) {
        reserve(4)
        base.storeBytes(of: v.littleEndian, toByteOffset: count, as: UInt32.self)
        count += 4
    }

    @inline(__always)
    public func u64(_ v: UInt64) {
        reserve(8)
        base.storeBytes(of: v.littleEndian, toByteOffset: count, as: UInt64.self)
        count += 8
    }

    @inline(__always)
    public func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }

    /// A length (UInt32) and the bytes.
    public func blob(_ v: [UInt8]) {
        u32(UInt32(truncatingIfNeeded: v.count))
        reserve(v.count)
        v.withUnsafeBytes { p in
            if let src = p.baseAddress { (base + count).copyMemory(from: src, byteCount: p.count) }
        }
        count += v.count
    }
}

/// Stores into room `StateWriter.fixed` reserved.
public struct FixedFields {
    let base: UnsafeMutableRawPointer
    public private(set) var offset = 0

    @inline(__always)
    public mutating func put<T: FixedWidthInteger>(_ v: T) {
        base.storeBytes(of: v.littleEndian, toByteOffset: offset, as: T.self)
        offset += MemoryLayout<T>.size
    }
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
        guard n >= 0, bytes.count - offset >= n else { throw .corrupt("a record ends past its transaction (at byte \(offset))") }
        defer { offset += n }
        return offset
    }

    public mutating func u8() throws(StateError) -> UInt8 { bytes[try take(1)] }

    public mutating func u32() throws(StateError) -> UInt32 {
        UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(4), as: UInt32.self))
    }

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
        case .version(let v): "state version \(v) is not one this chargefsd reads (it reads \(StateFiles.version))"
        case .unsupported(let what): "state cannot be taken over: \(what)"
        }
    }
}

/// A checksum that detects a torn or overwritten transaction (not an adversary: the memfd is the
/// daemon's own). Eight bytes per step, so that a 200-byte record costs a few nanoseconds.
public func stateChecksum(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
    var h: UInt64 = 0x243F_6A88_85A3_08D3 ^ seed ^ UInt64(bytes.count)
    var i = 0
    while i + 8 <= bytes.count {
        h = (h ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0x9E37_79B9_7F4A_7C15
        h ^= h >> 29
        i += 8
    }
    var last: UInt64 = 0
    var shift: UInt64 = 0
    while i < bytes.count {
        last |= UInt64(bytes[i]) << shift
        shift += 8
        i += 1
    }
    h = (h ^ last ^ 0xFF) &* 0xBF58_476D_1CE4_E5B9
    return h ^ (h >> 31)
}
