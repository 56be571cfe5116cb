/// An error for the CO with the gRPC status it maps to. VolumeManager throws these so that it
/// can be driven and tested without gRPC; NodeService turns them into RPCError.
struct CSIError: Error, Sendable, CustomStringConvertible {
    enum Code: Sendable {
        case invalidArgument, notFound, alreadyExists, failedPrecondition, aborted, unavailable, `internal`
    }
    let code: Code
    let message: String
    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    var description: String { message }
}
