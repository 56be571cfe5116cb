import Glibc

/// Appends little-endian values to a byte buffer: what a journal transaction or a checkpoint is
/// written in. The buffer is kept and reused (no allocation per transaction once it has grown).
public struct StateWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 4096) { bytes.reserveCapacity(capacity) }

    public mutating func reset() { bytes.removeAll(keepingCapacity: true) }

    @inline(__always)
    public mutating func u8(_ v: UInt8) { bytes.append(v) }

    @inline(__always)
    public mutating func u32(_ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    @inline(__always)
    public mutating func u64(_ v: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    @inline(__always)
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }

    /// A length (UInt32) and the bytes.
    public mutating func blob(_ v: [UInt8]) {
        u32(UInt32(truncatingIfNeeded: v.count))
        bytes.append(contentsOf: v)
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
