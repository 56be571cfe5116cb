import CFuse
import CFuseTransport
@testable import ChargeFS
import XCTest

final class FuseKernelFeaturesTests: XCTestCase {
    /// FuseKernelFeatures reads and patches INIT's flags at byte 12 and the reply's flags2 at
    /// byte 32, which must match the kernel's headers.
    func testInitFlagsOffsetsMatchKernelHeaders() {
        XCTAssertEqual(MemoryLayout<fuse_init_in>.offset(of: \.flags), 12)
        XCTAssertEqual(MemoryLayout<fuse_init_in>.offset(of: \.flags2), 16)
        XCTAssertEqual(MemoryLayout<fuse_init_out>.offset(of: \.flags), 12)
        XCTAssertEqual(MemoryLayout<fuse_init_out>.offset(of: \.flags2), 32)
    }

    private func patched(replyFlags: UInt32, replyFlags2: UInt32 = 0, length: Int = MemoryLayout<fuse_init_out>.size,
                         offered: UInt64) -> (flags: UInt32, flags2: UInt32, result: UInt64) {
        var out = fuse_init_out()
        out.flags = replyFlags
        out.flags2 = replyFlags2
        return withUnsafeMutableBytes(of: &out) { raw in
            let result = FuseKernelFeatures.patchInitReply(UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]),
                                                           offered: offered)
            return (raw.load(fromByteOffset: 12, as: UInt32.self), raw.load(fromByteOffset: 32, as: UInt32.self), result)
        }
    }

    func testOfferedFlagsAreAddedToInitReply() {
        let killPriv = UInt64(FUSE_HANDLE_KILLPRIV_V2), ext = UInt64(FUSE_INIT_EXT)
        let offered = killPriv | ext | FuseKernelFeatures.directIOAllowMmap | UInt64(FUSE_ASYNC_READ)
        let r = patched(replyFlags: UInt32(FUSE_ASYNC_READ), offered: offered)
        XCTAssertEqual(r.flags, UInt32(FUSE_ASYNC_READ) | UInt32(FUSE_HANDLE_KILLPRIV_V2) | UInt32(FUSE_INIT_EXT))
        XCTAssertEqual(r.flags2, 1 << 4, "DIRECT_IO_ALLOW_MMAP is bit 4 of flags2")
        XCTAssertEqual(r.result & FuseKernelFeatures.directIOAllowMmap, FuseKernelFeatures.directIOAllowMmap)
    }

    /// FUSE_OVER_IO_URING (bit 41: bit 9 of flags2) is claimed only when added (the rings are
    /// ready) and offered (enable_uring on).
    func testIoUringFlagIsClaimedOnlyWhenAddedAndOffered() {
        let uring = UInt64(CFUSE_OVER_IO_URING), ext = UInt64(FUSE_INIT_EXT)
        XCTAssertEqual(uring, 1 << 41)
        func patch(offered: UInt64, adding: UInt64) -> UInt32 {
            var out = fuse_init_out()
            return withUnsafeMutableBytes(of: &out) { raw in
                _ = FuseKernelFeatures.patchInitReply(raw, offered: offered, adding: adding)
                return raw.load(fromByteOffset: 32, as: UInt32.self)
            }
        }
        XCTAssertEqual(patch(offered: uring | ext, adding: FuseKernelFeatures.addedFlags | uring), 1 << 9)
        XCTAssertEqual(patch(offered: uring | ext, adding: FuseKernelFeatures.addedFlags), 0, "rings not set up: not claimed")
        XCTAssertEqual(patch(offered: ext, adding: FuseKernelFeatures.addedFlags | uring), 0, "not offered: not claimed")
    }

    /// The io_uring entry's header, as the kernel lays it out (include/uapi/linux/fuse.h).
    func testUringHeaderLayoutMatchesKernel() {
        XCTAssertEqual(MemoryLayout<cfuse_uring_req_header>.size, 288)
        XCTAssertEqual(MemoryLayout<cfuse_uring_req_header>.offset(of: \.op_in), 128)
        XCTAssertEqual(MemoryLayout<cfuse_uring_req_header>.offset(of: \.ring_ent_in_out), 256)
        XCTAssertEqual(MemoryLayout<cfuse_uring_ent_in_out>.offset(of: \.payload_sz), 16)
        XCTAssertEqual(UringWorker.opInOffset, 128, "as Swift reads it")
    }

    func testFlagsTheKernelDidNotOfferStayOff() {
        let r = patched(replyFlags: UInt32(FUSE_ASYNC_READ), offered: UInt64(FUSE_ASYNC_READ))
        XCTAssertEqual(r.flags, UInt32(FUSE_ASYNC_READ))
        XCTAssertEqual(r.flags2, 0)
        // Without FUSE_INIT_EXT from the kernel there is no flags2 to answer in.
        let noExt = patched(replyFlags: 0, offered: UInt64(FUSE_HANDLE_KILLPRIV_V2) | FuseKernelFeatures.directIOAllowMmap)
        XCTAssertEqual(noExt.flags, UInt32(FUSE_HANDLE_KILLPRIV_V2))
        XCTAssertEqual(noExt.flags2, 0)
    }

    func testLibfuseFlags2AreKeptAndShortRepliesGetNone() {
        let offered = UInt64(FUSE_INIT_EXT) | FuseKernelFeatures.directIOAllowMmap
        let kept = patched(replyFlags: UInt32(FUSE_INIT_EXT), replyFlags2: 1 << 1, offered: offered)
        XCTAssertEqual(kept.flags2, (1 << 1) | (1 << 4))
        let short = patched(replyFlags: 0, length: 24, offered: offered)
        XCTAssertEqual(short.flags, 0)
        XCTAssertEqual(short.result, 0)
    }
}
