// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "chargefs",
    products: [
        .executable(name: "chargefsd", targets: ["chargefsd"]),
        // Installed next to chargefsd: the daemon starts it from there (memcg= mounts).
        .executable(name: "chargefs-charge-helper", targets: ["chargefs-charge-helper"]),
        // Installed next to chargefsd: -o takeover mounts run it (the keeper of a mount's files).
        .executable(name: "chargefs-keeper", targets: ["chargefs-keeper"]),
        .library(name: "ChargeFS", targets: ["ChargeFS"]),
        .executable(name: "chargefs-csi", targets: ["chargefs-csi"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        // chargefs-csi: CSI v1 over gRPC (HTTP/2 on a unix socket).
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        // libfuse3's low-level API; a shim header turns its macros into functions Swift can call.
        .systemLibrary(
            name: "CFuse",
            pkgConfig: "fuse3",
            providers: [.apt(["libfuse3-dev"])]
        ),
        // The transport's loops in C: the /dev/fuse worker pool and a minimal io_uring client for
        // FUSE over io_uring (CFuse brings libfuse's headers and library).
        .target(name: "CFuseTransport", dependencies: ["CFuse"]),
        // The charge helper's protocol, and the daemon's side of starting it (C: between fork
        // and exec only async-signal-safe calls); the mounter's permission check (access_as).
        .target(name: "CChargeHelper"),
        // The charge helper program: a small C executable exec'd into the target's leaf cgroup.
        // Linked statically and without the Swift runtime: its memory is charged to the target.
        .executableTarget(
            name: "chargefs-charge-helper",
            dependencies: ["CChargeHelper"],
            linkerSettings: [.unsafeFlags(["-static-executable", "-Xlinker", "--gc-sections"])]
        ),
        // The keeper's protocol, both sides, and the daemon's split into keeper and server (C:
        // fork and exec before the daemon has threads).
        .target(name: "CKeeper"),
        // The keeper (-o takeover): holds a mount's files while its server may die and starts a
        // successor. Static and without the Swift runtime, like the charge helper.
        .executableTarget(
            name: "chargefs-keeper",
            dependencies: ["CKeeper"],
            linkerSettings: [.unsafeFlags(["-static-executable", "-Xlinker", "--gc-sections"])]
        ),
        // Folders by layer, each with a README whose "May call" line the layer check reads:
        // Bridge -> Transport, and Bridge -> FileSystem -> Inodes/Pages -> Charging -> Cgroup ->
        // Support (Daemon on top; API holds the values they all speak).
        .target(
            name: "ChargeFS",
            dependencies: [
                "CFuse",
                "CFuseTransport",
                "CChargeHelper",
                "CKeeper",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            exclude: ["API", "Bridge", "Transport", "FileSystem", "Inodes", "Pages", "Charging", "Cgroup", "Daemon", "Support", "State"]
                .map { "\($0)/README.md" }
        ),
        .executableTarget(
            name: "chargefsd",
            dependencies: ["ChargeFS", "CFuse"]
        ),
        // What state kept for a successor costs (docs/takeover.md): not installed, run by hand.
        .executableTarget(
            name: "chargefs-state-bench",
            dependencies: ["ChargeFS", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // The CSI messages and services chargefs-csi serves, generated from Sources/CSIProto/csi.proto by
        // scripts/gen-proto.sh and committed, so that a build never needs the protoc plugins.
        .target(
            name: "CSIProto",
            dependencies: [
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            exclude: ["csi.proto"]
        ),
        // The Kubernetes CSI node driver; it runs chargefsd as a separate program.
        .executableTarget(
            name: "chargefs-csi",
            dependencies: [
                "CSIProto",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]
        ),
        // Helpers every test target shares (no XCTest, no root).
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        // No root, no mount: the tree, pages, options, page map, directories, inode table.
        .testTarget(
            name: "ChargeFSUnitTests",
            dependencies: [
                "TestSupport",
                "ChargeFS",
                "CFuse",
                "CFuseTransport",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // Black box through a real mount of the built chargefsd (root, /dev/fuse).
        .testTarget(name: "ChargeFSMountTests", dependencies: ["TestSupport"]),
        // chargefs-csi's VolumeManager in-process: a fake mounter and a cgroup tree in a temporary
        // directory (no root, no mount; scripts/tests/csi.sh is the end-to-end test).
        .testTarget(name: "ChargeFSCSITests", dependencies: ["chargefs-csi"]),
        // Real kernel charging: cgroups of this host (root).
        .testTarget(
            name: "ChargeFSCgroupTests",
            dependencies: [
                "ChargeFS",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
