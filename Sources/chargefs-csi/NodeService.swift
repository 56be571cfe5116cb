import CSIProto
import GRPCCore

/// CSI Node: thin translations between the wire messages and VolumeManager.
struct NodeService: Csi_V1_Node.SimpleServiceProtocol {
    let nodeID: String
    let manager: VolumeManager
    /// Every failed publish/unpublish is logged with its cause (successes are logged by
    /// VolumeManager, which knows the pod's cgroup).
    let log: @Sendable (String) -> Void

    func nodePublishVolume(request: Csi_V1_NodePublishVolumeRequest, context: ServerContext) async throws -> Csi_V1_NodePublishVolumeResponse {
        var access = PublishRequest.Access.none
        if request.hasVolumeCapability {
            switch request.volumeCapability.accessType {
            case .mount?: access = .mount
            case .block?: access = .block
            case nil: access = .unspecified
            }
        }
        let req = PublishRequest(volumeID: request.volumeID, targetPath: request.targetPath, access: access,
                                 readOnly: request.readonly, volumeContext: request.volumeContext)
        do {
            try await manager.publish(req)
        } catch {
            let pod = request.volumeContext[VolumeManager.podUIDKey] ?? "?"
            log("publish volume=\(request.volumeID) pod=\(pod) target=\(request.targetPath) failed: \(error.code): \(error.message)")
            throw RPCError(error)
        }
        return Csi_V1_NodePublishVolumeResponse()
    }

    func nodeUnpublishVolume(request: Csi_V1_NodeUnpublishVolumeRequest, context: ServerContext) async throws -> Csi_V1_NodeUnpublishVolumeResponse {
        do {
            try await manager.unpublish(volumeID: request.volumeID, targetPath: request.targetPath)
        } catch {
            log("unpublish volume=\(request.volumeID) target=\(request.targetPath) failed: \(error.code): \(error.message)")
            throw RPCError(error)
        }
        return Csi_V1_NodeUnpublishVolumeResponse()
    }

    func nodeGetVolumeStats(request: Csi_V1_NodeGetVolumeStatsRequest, context: ServerContext) async throws -> Csi_V1_NodeGetVolumeStatsResponse {
        let stats: VolumeStats
        do {
            stats = try await manager.stats(volumeID: request.volumeID, volumePath: request.volumePath)
        } catch {
            throw RPCError(error)
        }
        var r = Csi_V1_NodeGetVolumeStatsResponse()
        var condition = Csi_V1_VolumeCondition()
        condition.abnormal = stats.condition.abnormal
        condition.message = stats.condition.message
        r.volumeCondition = condition
        // usage is optional in the spec: an abnormal volume has no figures to give.
        guard let u = stats.usage else { return r }
        var bytes = Csi_V1_VolumeUsage()
        bytes.unit = .bytes
        bytes.total = u.totalBytes
        bytes.used = u.usedBytes
        bytes.available = u.availableBytes
        var inodes = Csi_V1_VolumeUsage()
        inodes.unit = .inodes
        inodes.total = u.totalInodes
        inodes.used = u.usedInodes
        inodes.available = u.availableInodes
        r.usage = [bytes, inodes]
        return r
    }

    /// GET_VOLUME_STATS and VOLUME_CONDITION: no staging (nothing is shared between pods), no
    /// expansion.
    func nodeGetCapabilities(request: Csi_V1_NodeGetCapabilitiesRequest, context: ServerContext) async throws -> Csi_V1_NodeGetCapabilitiesResponse {
        var r = Csi_V1_NodeGetCapabilitiesResponse()
        r.capabilities = [Csi_V1_NodeServiceCapability.RPC.TypeEnum.getVolumeStats, .volumeCondition].map { type in
            var rpc = Csi_V1_NodeServiceCapability.RPC()
            rpc.type = type
            var cap = Csi_V1_NodeServiceCapability()
            cap.rpc = rpc
            return cap
        }
        return r
    }

    /// No volume limit (a volume costs a daemon of a few MiB) and no topology.
    func nodeGetInfo(request: Csi_V1_NodeGetInfoRequest, context: ServerContext) async throws -> Csi_V1_NodeGetInfoResponse {
        var r = Csi_V1_NodeGetInfoResponse()
        r.nodeID = nodeID
        r.maxVolumesPerNode = 0
        return r
    }
}

extension RPCError {
    init(_ e: CSIError) {
        let code: RPCError.Code
        switch e.code {
        case .invalidArgument: code = .invalidArgument
        case .notFound: code = .notFound
        case .alreadyExists: code = .alreadyExists
        case .failedPrecondition: code = .failedPrecondition
        case .aborted: code = .aborted
        case .unavailable: code = .unavailable
        case .internal: code = .internalError
        }
        self.init(code: code, message: e.message)
    }
}
