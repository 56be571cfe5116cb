import CSIProto
import GRPCCore
import SwiftProtobuf

/// CSI Identity: who this plugin is and that it is alive.
struct IdentityService: Csi_V1_Identity.SimpleServiceProtocol {
    static let driverName = "csi.chargefs.io"
    static let version = "0.1.0"

    func getPluginInfo(request: Csi_V1_GetPluginInfoRequest, context: ServerContext) async throws -> Csi_V1_GetPluginInfoResponse {
        var r = Csi_V1_GetPluginInfoResponse()
        r.name = Self.driverName
        r.vendorVersion = Self.version
        return r
    }

    /// No CONTROLLER_SERVICE: ephemeral inline volumes need none, and the CO then calls no
    /// controller RPC. No topology constraints: any node with the plugin can serve a volume.
    func getPluginCapabilities(request: Csi_V1_GetPluginCapabilitiesRequest, context: ServerContext) async throws -> Csi_V1_GetPluginCapabilitiesResponse {
        Csi_V1_GetPluginCapabilitiesResponse()
    }

    /// Ready once serving: the socket only answers after the state store is loaded. A plugin
    /// that cannot see the host's cgroups still answers ready (a restart would not help); it
    /// said why at start and refuses NodePublishVolume with FAILED_PRECONDITION.
    func probe(request: Csi_V1_ProbeRequest, context: ServerContext) async throws -> Csi_V1_ProbeResponse {
        var r = Csi_V1_ProbeResponse()
        r.ready = Google_Protobuf_BoolValue(true)
        return r
    }
}
