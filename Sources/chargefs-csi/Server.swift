import Dispatch
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix

/// The gRPC server on the CSI unix socket.
enum Server {
    /// The socket path of a CSI endpoint: unix:///path, unix:/path or a bare absolute path.
    static func socketPath(endpoint: String) -> String? {
        var p = endpoint
        if p.hasPrefix("unix://") { p = String(p.dropFirst("unix://".count)) }
        else if p.hasPrefix("unix:") { p = String(p.dropFirst("unix:".count)) }
        guard p.hasPrefix("/"), p.count > 1, p.utf8.count < 108 else { return nil }  // sun_path
        return p
    }

    /// Serves Identity and Node until SIGTERM or SIGINT, then finishes the calls in flight.
    static func run(socket: String, services: [any RegistrableRPCService], log: @escaping @Sendable (String) -> Void) async throws {
        let dir = (socket as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // A socket left by a killed predecessor would make bind fail with EADDRINUSE.
        var st = stat()
        if lstat(socket, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw OptionError("\(socket) exists and is not a socket")
            }
            unlink(socket)
        }
        let server = GRPCServer(
            transport: .http2NIOPosix(address: .unixDomainSocket(path: socket), transportSecurity: .plaintext),
            services: services
        )
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        let sources = [SIGTERM, SIGINT].map { sig in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                log("signal \(sig): stopping the gRPC server; the volumes' daemons keep serving")
                server.beginGracefulShutdown()
            }
            s.resume()
            return s
        }
        defer { sources.forEach { $0.cancel() } }
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            if try await server.listeningAddress != nil {
                log("listening on unix://\(socket)")
            }
        }
        unlink(socket)
    }
}
