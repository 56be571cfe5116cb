import Foundation
import XCTest
@testable import chargefs_csi

/// VolumeManager driven in-process: a fake mounter and a cgroup tree in a temporary directory,
/// a real state directory. No root, no mount.
final class VolumeManagerTests: XCTestCase {
    let podA = "0f6a3c1e-2b4d-4e5f-8a9b-0c1d2e3f4a5b"
    let podB = "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d"
    var node: FakeNode!

    override func setUpWithError() throws { node = try FakeNode() }
    override func tearDown() { node?.remove() }

    /// Runs `body` and asserts it fails with `code`; returns the message.
    @discardableResult
    func expect(_ code: CSIError.Code, file: StaticString = #filePath, line: UInt = #line,
                _ body: () async throws -> Void) async -> String {
        do {
            try await body()
            XCTFail("expected \(code), got success", file: file, line: line)
        } catch let e as CSIError {
            XCTAssertEqual(e.code, code, "message: \(e.message)", file: file, line: line)
            return e.message
        } catch {
            XCTFail("expected CSIError \(code), got \(error)", file: file, line: line)
        }
        return ""
    }

    /// The usual start: pod A's cgroup, a target for its volume, a manager.
    func start() throws -> (VolumeManager, String) {
        try node.addPod(podA)
        return (try node.manager(), try node.target("a"))
    }

    func assertPublished(_ m: VolumeManager, _ count: Int, _ message: String = "",
                         file: StaticString = #filePath, line: UInt = #line) async {
        let published = await m.publishedCount
        XCTAssertEqual(published, count, message, file: file, line: line)
    }

    // MARK: publish

    func testPublishMountsChargedToThePodAndRecordsIt() async throws {
        let pod = try node.addPod(podA)
        let target = try node.target("a")
        let m = try node.manager()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA, size: "16Mi", readOnly: true))
        let opts = try XCTUnwrap(node.mounter.mountedTargets[target])
        XCTAssertEqual(opts.first, "memcg=\(pod)")
        XCTAssertTrue(opts.contains("allow_other"))
        XCTAssertTrue(opts.contains("size=\(16 << 20)"), "\(opts)")
        XCTAssertTrue(opts.contains("ro"))
        var isDir: ObjCBool = false
        XCTAssertTrue(FileManager.default.fileExists(atPath: target, isDirectory: &isDir) && isDir.boolValue)
        XCTAssertEqual(node.recordFiles.count, 1)
        await assertPublished(m, 1)
    }

    func testTheSamePublishAgainIsOKAndMountsOnce() async throws {
        let (m, target) = try start()
        let req = publishRequest(volumeID: "v1", target: target, podUID: podA)
        try await m.publish(req)
        try await m.publish(req)
        // a trailing slash names the same target
        var slashed = req
        slashed.targetPath += "/"
        try await m.publish(slashed)
        XCTAssertEqual(node.mounter.mountCalls, 1)
    }

    func testPublishAgainWithOtherParametersIsAlreadyExists() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA, size: "16Mi"))
        await expect(.alreadyExists) { try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA, size: "32Mi")) }
        await expect(.alreadyExists) { try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA, readOnly: true)) }
        await expect(.alreadyExists) { try await m.publish(publishRequest(volumeID: "v1", target: try self.node.target("b"), podUID: podA)) }
        XCTAssertEqual(node.mounter.mountCalls, 1)
    }

    func testATargetHoldingAnotherVolumeIsAlreadyExists() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        let msg = await expect(.alreadyExists) { try await m.publish(publishRequest(volumeID: "v2", target: target, podUID: podA)) }
        XCTAssertTrue(msg.contains("v1"), msg)
        XCTAssertEqual(node.mounter.mountCalls, 1)
    }

    /// Two volume ids on one target path at once: the second is refused while the first mounts,
    /// and only one mount is made. Before the target was claimed with the volume id in one step,
    /// both passed the check, both mounted, and the second stacked on the first.
    func testTwoVolumesRacingForOneTargetMountOnce() async throws {
        let (m, target) = try start()
        let first = try await publishHeld(m, publishRequest(volumeID: "v1", target: target, podUID: podA))
        let msg = await expect(.aborted) { try await m.publish(publishRequest(volumeID: "v2", target: target, podUID: podA)) }
        XCTAssertTrue(msg.contains("v1"), msg)
        node.mounter.releaseHeldMount()
        try await first.value
        XCTAssertEqual(node.mounter.mountCalls, 1)
        XCTAssertEqual(node.mounter.stacked, 0)
        // once the first is published, the path is taken for good
        await expect(.alreadyExists) { try await m.publish(publishRequest(volumeID: "v2", target: target, podUID: podA)) }
    }

    func testTheSameVolumeTwiceAtOnceIsAborted() async throws {
        let (m, target) = try start()
        let req = publishRequest(volumeID: "v1", target: target, podUID: podA)
        let first = try await publishHeld(m, req)
        await expect(.aborted) { try await m.publish(req) }
        // an unpublish racing the publish must not pass it by (the CO would think it gone)
        await expect(.aborted) { try await m.unpublish(volumeID: "v1", targetPath: target) }
        node.mounter.releaseHeldMount()
        try await first.value
        try await m.publish(req)  // done now: the same request is OK
        XCTAssertEqual(node.mounter.mountCalls, 1)
    }

    func testMalformedRequestsAreInvalidArgumentAndMountNothing() async throws {
        let (m, target) = try start()
        let good = publishRequest(volumeID: "v1", target: target, podUID: podA)
        var cases: [(String, PublishRequest)] = []
        func variant(_ name: String, _ change: (inout PublishRequest) -> Void) {
            var r = good
            change(&r)
            cases.append((name, r))
        }
        variant("no volume id") { $0.volumeID = "" }
        variant("no target") { $0.targetPath = "" }
        variant("relative target") { $0.targetPath = "pods/a" }
        variant("target with ..") { $0.targetPath = target + "/../../etc" }
        variant("no capability") { $0.access = .none }
        variant("no access type") { $0.access = .unspecified }
        variant("block") { $0.access = .block }
        variant("not ephemeral") { $0.volumeContext[VolumeManager.ephemeralKey] = nil }
        variant("ephemeral false") { $0.volumeContext[VolumeManager.ephemeralKey] = "false" }
        variant("no pod uid") { $0.volumeContext[VolumeManager.podUIDKey] = nil }
        variant("pod uid a path") { $0.volumeContext[VolumeManager.podUIDKey] = "../../etc" }
        variant("bad size") { $0.volumeContext["size"] = "lots" }
        variant("unknown attribute") { $0.volumeContext["colour"] = "blue" }
        for (name, req) in cases {
            let msg = await expect(.invalidArgument) { try await m.publish(req) }
            XCTAssertFalse(msg.isEmpty, name)
        }
        XCTAssertEqual(node.mounter.mountCalls, 0)
        XCTAssertEqual(node.recordFiles, [])
        XCTAssertFalse(FileManager.default.fileExists(atPath: target))
    }

    func testWithoutTheHostsCgroupTreePublishIsFailedPrecondition() async throws {
        try node.addPod(podA)
        let m = try node.manager(hostViewProblem: "a private cgroup namespace")
        let msg = await expect(.failedPrecondition) { try await m.publish(publishRequest(volumeID: "v1", target: try self.node.target("a"), podUID: podA)) }
        XCTAssertTrue(msg.contains("a private cgroup namespace"), msg)
        XCTAssertEqual(node.mounter.mountCalls, 0)
    }

    func testAPodCgroupThatNeverAppearsIsUnavailable() async throws {
        let m = try node.manager(podCgroupWait: 0.2)
        let msg = await expect(.unavailable) { try await m.publish(publishRequest(volumeID: "v1", target: try self.node.target("a"), podUID: podA)) }
        XCTAssertTrue(msg.contains(podA), msg)
        XCTAssertEqual(node.mounter.mountCalls, 0)
    }

    func testAPodCgroupThatAppearsLateIsWaitedFor() async throws {
        let m = try node.manager(podCgroupWait: 10)
        let target = try node.target("a")
        let pod = podA
        let n = node!
        let late = Task { try await Task.sleep(for: .milliseconds(300)); try n.addPod(pod) }
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        try await late.value
        XCTAssertEqual(node.mounter.mountedTargets[target]?.first, "memcg=\(node.cgroupRoot)/kubepods/burstable/pod\(podA)")
    }

    func testAFailedMountIsInternalAndLeavesNothing() async throws {
        let (m, target) = try start()
        node.mounter.failNextMount("chargefsd failed (exit 1): memcg=...: no room")
        let msg = await expect(.internal) { try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA)) }
        XCTAssertTrue(msg.contains("no room"), msg)
        XCTAssertFalse(FileManager.default.fileExists(atPath: target), "the target it created is removed")
        XCTAssertEqual(node.recordFiles, [])
        await assertPublished(m, 0)
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))  // a retry works
    }

    func testATargetThatIsAFileIsInternal() async throws {
        try node.addPod(podA)
        let target = try node.target("a")
        XCTAssertTrue(FileManager.default.createFile(atPath: target, contents: Data("x".utf8)))
        let m = try node.manager()
        await expect(.internal) { try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA)) }
        XCTAssertEqual(node.mounter.mountCalls, 0)
    }

    func testARecordThatCannotBeSavedUndoesTheMount() async throws {
        let (m, target) = try start()
        // the state directory replaced by a file: every save fails
        try FileManager.default.removeItem(atPath: node.stateDir)
        XCTAssertTrue(FileManager.default.createFile(atPath: node.stateDir, contents: nil))
        await expect(.internal) { try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA)) }
        XCTAssertEqual(node.mounter.mountCalls, 1)
        XCTAssertEqual(node.mounter.mountedTargets, [:], "mounted without a record: unmounted again")
        await assertPublished(m, 0)
    }

    func testADeadDaemonIsRemountedOnTheSamePublish() async throws {
        let (m, target) = try start()
        let req = publishRequest(volumeID: "v1", target: target, podUID: podA)
        try await m.publish(req)
        node.mounter.setState(target, .dead)
        try await m.publish(req)
        XCTAssertEqual(node.mounter.callLog, ["mount \(target)", "unmount \(target)", "mount \(target)"])
        node.mounter.setState(target, .dead)
        node.mounter.failNextUnmount("cannot unmount: EBUSY")
        await expect(.internal) { try await m.publish(req) }
    }

    // MARK: unpublish

    func testUnpublishUnmountsRemovesTargetAndRecordAndIsIdempotent() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        try await m.unpublish(volumeID: "v1", targetPath: target)
        XCTAssertEqual(node.mounter.mountedTargets, [:])
        XCTAssertFalse(FileManager.default.fileExists(atPath: target))
        XCTAssertEqual(node.recordFiles, [])
        try await m.unpublish(volumeID: "v1", targetPath: target)  // again: OK
        try await m.unpublish(volumeID: "never", targetPath: target)  // unknown: OK
        XCTAssertEqual(node.mounter.callLog.filter { $0.hasPrefix("unmount") }.count, 1)
        await expect(.invalidArgument) { try await m.unpublish(volumeID: "", targetPath: target) }
        await expect(.invalidArgument) { try await m.unpublish(volumeID: "v1", targetPath: "") }
    }

    func testAFailedUnmountIsInternalAndKeepsTheVolume() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        node.mounter.failNextUnmount("cannot unmount \(target): Device or resource busy")
        await expect(.internal) { try await m.unpublish(volumeID: "v1", targetPath: target) }
        XCTAssertEqual(node.recordFiles.count, 1)
        await assertPublished(m, 1)
        try await m.unpublish(volumeID: "v1", targetPath: target)
        XCTAssertEqual(node.recordFiles, [])
    }

    /// A record the store cannot remove: the unpublish is INTERNAL (the CO retries), the volume
    /// stays known and counted, a restarted plugin still finds it, and the retry removes it.
    func testARecordThatCannotBeRemovedIsKeptAndCountedUntilARetry() async throws {
        try node.addPod(podA)
        let target = try node.target("a")
        let failing = FailSwitch()
        let m = try node.manager(unlinkFile: { path in failing.on ? EIO : (unlink(path) == 0 ? 0 : errno) })
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        failing.on = true
        let msg = await expect(.internal) { try await m.unpublish(volumeID: "v1", targetPath: target) }
        XCTAssertTrue(msg.contains("Input/output error"), msg)
        let notRemoved = await m.recordsNotRemoved
        XCTAssertEqual(notRemoved, ["v1"])
        XCTAssertEqual(node.recordFiles.count, 1)
        XCTAssertEqual(node.mounter.mountedTargets, [:], "the volume itself is unmounted")
        let restarted = try node.manager()
        await assertPublished(restarted, 1, "a restarted plugin still knows it and can unpublish it")
        failing.on = false
        try await m.unpublish(volumeID: "v1", targetPath: target)
        let after = await m.recordsNotRemoved
        XCTAssertEqual(after, [])
        XCTAssertEqual(node.recordFiles, [])
    }

    // MARK: stats

    func testStats() async throws {
        let (m, target) = try start()
        await expect(.notFound) { _ = try await m.stats(volumeID: "v1", volumePath: target) }
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        let s = try await m.stats(volumeID: "v1", volumePath: target)
        XCTAssertEqual(s.usage?.totalBytes, 64 << 20)
        XCTAssertEqual(s.usage?.availableInodes, 999)
        XCTAssertEqual(s.condition, VolumeCondition(abnormal: false, message: "serving"))
        await expect(.notFound) { _ = try await m.stats(volumeID: "v1", volumePath: target + "-other") }
        await expect(.invalidArgument) { _ = try await m.stats(volumeID: "", volumePath: target) }
        await expect(.invalidArgument) { _ = try await m.stats(volumeID: "v1", volumePath: "") }
        // Still published, but its mount is gone: abnormal, no figures (usage is optional).
        node.mounter.reboot()
        let gone = try await m.stats(volumeID: "v1", volumePath: target)
        XCTAssertNil(gone.usage)
        XCTAssertTrue(gone.condition.abnormal)
        XCTAssertTrue(gone.condition.message.hasPrefix("not mounted"), gone.condition.message)
    }

    // MARK: volume condition

    /// The probe as chargefsd -o takeover answers it: normal, counting the takeovers.
    func testConditionCountsTakeovers() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        let usage = Chargefsd.Usage(totalBytes: 1 << 20, usedBytes: 4096, availableBytes: (1 << 20) - 4096,
                                    totalInodes: 10, usedInodes: 2, availableInodes: 8)
        node.mounter.setProbe(target, .answered(status: "transport=dev\npid=5314 keeper=5288 takeovers=0 resent=0\n", usage: .success(usage)))
        var s = try await m.stats(volumeID: "v1", volumePath: target)
        XCTAssertEqual(s.condition, VolumeCondition(abnormal: false, message: "serving"))
        XCTAssertEqual(s.usage?.usedBytes, 4096)
        node.mounter.setProbe(target, .answered(status: "transport=dev\npid=5320 keeper=5288 takeovers=3 resent=1\nlast_takeover=signal 9, 2.1 ms\n", usage: .success(usage)))
        s = try await m.stats(volumeID: "v1", volumePath: target)
        XCTAssertEqual(s.condition, VolumeCondition(abnormal: false, message: "serving, 3 takeovers (last: signal 9, 2.1 ms)"))
        node.mounter.setProbe(target, .answered(status: "pid=5320 keeper=5288 takeovers=1\n", usage: .success(usage)))
        s = try await m.stats(volumeID: "v1", volumePath: target)
        XCTAssertEqual(s.condition, VolumeCondition(abnormal: false, message: "serving, 1 takeover"))
    }

    /// Server and keeper gone (ENOTCONN), a keeper that gave up (ECONNABORTED), a hung server,
    /// another filesystem over the target: abnormal, each with its cause, and no figures.
    func testConditionOfADeadMount() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        let cases: [(VolumeProbe, String)] = [
            (.failed(ENOTCONN), "ENOTCONN"), (.failed(ECONNABORTED), "ECONNABORTED"),
            (.noAnswer(3.0), "did not answer within 3.0 s"), (.notChargefs("tmpfs"), "no longer a chargefs mount (tmpfs"),
        ]
        for (probe, words) in cases {
            node.mounter.setProbe(target, probe)
            let s = try await m.stats(volumeID: "v1", volumePath: target)
            XCTAssertTrue(s.condition.abnormal, words)
            XCTAssertTrue(s.condition.message.contains(words), s.condition.message)
            XCTAssertNil(s.usage, words)
        }
    }

    /// The real probe on a plain directory: mountinfo says no chargefs mount, and no request is
    /// sent anywhere (a hung mount is covered by csi.sh takeover, which stops a server).
    func testRealProbeOfAPlainDirectory() throws {
        let dir = try node.target("plain")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        guard case .notChargefs(nil) = Chargefsd.probe(dir, timeout: 1) else {
            return XCTFail("a plain directory probed as \(Chargefsd.probe(dir, timeout: 1))")
        }
        XCTAssertEqual(Chargefsd.mountState(dir), .absent)
    }

    func testStatusFieldsKeepSpacedValues() {
        let f = VolumeCondition.statusFields("transport=uring\npid=7 keeper=6 takeovers=2 resent=0\nlast_takeover=exit 3, 40.2 ms\n")
        XCTAssertEqual(f["transport"], "uring")
        XCTAssertEqual(f["takeovers"], "2")
        XCTAssertEqual(f["keeper"], "6")
        XCTAssertEqual(f["last_takeover"], "exit 3, 40.2 ms")
    }

    // MARK: takeover

    func testTakeoverIsOnUnlessThePodTurnsItOff() async throws {
        let (m, target) = try start()
        try await m.publish(publishRequest(volumeID: "v1", target: target, podUID: podA))
        XCTAssertEqual(node.mounter.mountedTargets[target]?.contains("takeover"), true)
        try node.addPod(podB)
        let tb = try node.target("b")
        try await m.publish(publishRequest(volumeID: "v2", target: tb, podUID: podB, extra: ["takeover": "false"]))
        XCTAssertEqual(node.mounter.mountedTargets[tb]?.contains("takeover"), false)
        await expect(.invalidArgument) {
            try await m.publish(publishRequest(volumeID: "v3", target: try self.node.target("c"), podUID: self.podA, extra: ["takeover": "yes"]))
        }
    }

    func testTakeoverUnavailableOnTheNode() async throws {
        try node.addPod(podA)
        let m = try node.manager(takeoverProblem: "no keeper")
        let ta = try node.target("a")
        try await m.publish(publishRequest(volumeID: "v1", target: ta, podUID: podA))
        XCTAssertEqual(node.mounter.mountedTargets[ta]?.contains("takeover"), false)
        let tb = try node.target("b")
        await expect(.failedPrecondition) {
            try await m.publish(publishRequest(volumeID: "v2", target: tb, podUID: self.podA, extra: ["takeover": "true"]))
        }
    }

    // MARK: restart

    func testARestartedPluginFindsItsVolumes() async throws {
        try node.addPod(podA)
        try node.addPod(podB)
        let ta = try node.target("a"), tb = try node.target("b")
        let reqA = publishRequest(volumeID: "v1", target: ta, podUID: podA)
        do {
            let m = try node.manager()
            try await m.publish(reqA)
            try await m.publish(publishRequest(volumeID: "v2", target: tb, podUID: podB, size: "1Gi"))
        }
        let m = try node.manager()  // the daemons kept serving meanwhile (the fake's mounts stay)
        await assertPublished(m, 2)
        XCTAssertTrue(node.logLines.all.contains { $0.contains("volume=v1") && $0.contains("still mounted") })
        _ = try await m.stats(volumeID: "v2", volumePath: tb)
        try await m.publish(reqA)
        XCTAssertEqual(node.mounter.mountCalls, 2, "the same publish after a restart mounts nothing")
        await expect(.alreadyExists) { try await m.publish(publishRequest(volumeID: "v3", target: tb, podUID: podB)) }
        try await m.unpublish(volumeID: "v1", targetPath: ta)
        try await m.unpublish(volumeID: "v2", targetPath: tb)
        XCTAssertEqual(node.mounter.mountedTargets, [:])
        XCTAssertEqual(node.recordFiles, [])
    }

    func testAfterARebootTheSamePublishMountsAgain() async throws {
        try node.addPod(podA)
        let target = try node.target("a")
        let req = publishRequest(volumeID: "v1", target: target, podUID: podA)
        try await node.manager().publish(req)
        node.mounter.reboot()
        let m = try node.manager()
        XCTAssertTrue(node.logLines.all.contains { $0.contains("volume=v1") && $0.contains("not mounted") })
        try await m.publish(req)
        XCTAssertEqual(node.mounter.mountCalls, 2)
        XCTAssertNotNil(node.mounter.mountedTargets[target])
    }

    func testAnUnreadableRecordIsReportedAndIgnored() async throws {
        XCTAssertTrue(FileManager.default.createFile(atPath: node.stateDir + "/garbage.json", contents: Data("{".utf8)))
        let m = try node.manager()
        await assertPublished(m, 0)
        XCTAssertTrue(node.logLines.all.contains { $0.contains("cannot read") && $0.contains("garbage.json") })
    }

    /// Starts `req` with its mount held (until `releaseHeldMount`) and returns once that mount
    /// has begun.
    func publishHeld(_ m: VolumeManager, _ req: PublishRequest) async throws -> Task<Void, any Error> {
        node.mounter.holdNextMount()
        let task = Task { try await m.publish(req) }
        try await waitFor { self.node.mounter.mountCalls == 1 }
        return task
    }

    func testAnUnlistableStateDirectoryIsReported() async throws {
        let state = try StateStore(dir: node.stateDir)
        try FileManager.default.removeItem(atPath: node.stateDir)
        XCTAssertTrue(FileManager.default.createFile(atPath: node.stateDir, contents: nil))
        let lines = node.logLines
        let m = VolumeManager(config: .init(tree: CgroupTree(root: node.cgroupRoot, version: .v2), hostViewProblem: nil,
                                            mounter: node.mounter, state: state, podCgroupWait: 0.1),
                              log: { lines.append($0) })
        await assertPublished(m, 0)
        XCTAssertTrue(node.logLines.all.contains { $0.contains("cannot list") && $0.contains(node.stateDir) }, "\(node.logLines.all)")
    }

    /// Polls `condition` every 10 ms for up to 5 s.
    func waitFor(_ condition: () -> Bool, file: StaticString = #filePath, line: UInt = #line) async throws {
        let deadline = ContinuousClock.now + .seconds(5)
        while !condition() {
            guard ContinuousClock.now < deadline else {
                XCTFail("condition not met within 5 s", file: file, line: line)
                throw CancellationError()
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }
}

final class FailSwitch: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var on: Bool {
        get { lock.lock(); defer { lock.unlock() }; return value }
        set { lock.lock(); value = newValue; lock.unlock() }
    }
}
