import SystemPackage
@testable import ChargeFS

extension PageStore {
    /// The store's three charging steps in one, under no lock, as the tests drive the store:
    /// hands out up to `count` zero-filled pages, charging more when the reserve runs short.
    /// Returns how many it got: fewer than asked only when the charger refused (ENOSPC). Throws
    /// only when it got none. (The file system runs the same steps, with its lock released
    /// around the charge: `FileSystem.charging`.)
    @discardableResult
    func allocate(_ count: Int, into pages: inout [UInt32]) throws(Errno) -> Int {
        var got = takeCharged(count, into: &pages)
        while got < count {
            guard let pending = pickForCharging(count - got) else { break }
            let (charged, failure) = pending.charge()
            settle(pending, charged: charged)
            got += takeCharged(count - got, into: &pages)
            if let failure, got == 0 { throw failure }
            if failure != nil || charged < pending.wanted { break }  // the charger refused the rest
        }
        if got == 0 { throw .noSpace }
        return got
    }
}
