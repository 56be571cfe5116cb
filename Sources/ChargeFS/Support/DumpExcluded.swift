import CFuse
import Glibc

/// Memory a core dump leaves out (MADV_DONTDUMP), for file data the daemon copies outside the
/// arena: a crashed server's core must hold no file contents (issue 21; docs/takeover.md, "Core
/// dumps"). The heap cannot be marked (malloc's chunks share pages with everything else, and a
/// freed chunk keeps its bytes), so such data goes into mappings of their own: whole pages, so
/// for buffers that are reused (a thread's scratch) or rare, not one mapping per request.
enum DumpExcluded {
    /// A private mapping of at least `byteCount` bytes, rounded up to pages, out of core dumps;
    /// nil when the kernel refuses either step.
    static func map(byteCount: Int) -> UnsafeMutableRawBufferPointer? {
        let size = max(1, (byteCount + PageSize.bytes - 1) / PageSize.bytes) * PageSize.bytes
        guard let mapped = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              mapped != MAP_FAILED else { return nil }
        guard cfuse_madvise(mapped, size, Int32(CFUSE_MADV_DONTDUMP)) == 0 else {
            munmap(mapped, size)
            return nil
        }
        return UnsafeMutableRawBufferPointer(start: mapped, count: size)
    }

    static func unmap(_ buffer: UnsafeMutableRawBufferPointer) {
        if let base = buffer.baseAddress { munmap(base, buffer.count) }
    }

    /// The calling thread's scratch buffer, at least `byteCount` bytes, out of core dumps: valid
    /// until the same thread asks again (it may move when it grows), freed when the thread ends.
    /// nil when it cannot be mapped (the caller then uses the heap: served, but dumpable).
    static func scratch(byteCount: Int) -> UnsafeMutableRawPointer? {
        if let raw = pthread_getspecific(scratchKey) {
            let current = Unmanaged<Scratch>.fromOpaque(raw).takeUnretainedValue()
            if current.buffer.count >= byteCount { return current.buffer.baseAddress }
            // Grows to the size asked (FUSE reads are at most 1 MiB): the old mapping goes.
            guard let bigger = map(byteCount: byteCount) else { return nil }
            unmap(current.buffer)
            current.buffer = bigger
            return bigger.baseAddress
        }
        guard let buffer = map(byteCount: byteCount) else { return nil }
        let scratch = Scratch(buffer)
        guard pthread_setspecific(scratchKey, Unmanaged.passRetained(scratch).toOpaque()) == 0 else {
            Unmanaged.passUnretained(scratch).release()
            return nil
        }
        return buffer.baseAddress
    }

    private final class Scratch {
        var buffer: UnsafeMutableRawBufferPointer
        init(_ buffer: UnsafeMutableRawBufferPointer) { self.buffer = buffer }
        deinit { DumpExcluded.unmap(buffer) }
    }

    /// The key of each thread's `Scratch` (released, so unmapped, when the thread ends).
    private static let scratchKey: pthread_key_t = {
        var key = pthread_key_t()
        let rc = pthread_key_create(&key) { raw in
            if let raw { Unmanaged<Scratch>.fromOpaque(raw).release() }
        }
        // Without a key (PTHREAD_KEYS_MAX reached) getspecific on key 0 finds nothing of ours:
        // scratch then maps per thread once and falls back to the heap when setspecific fails.
        return rc == 0 ? key : pthread_key_t.max
    }()
}
