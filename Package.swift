// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "chargefs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "chargefsd", targets: ["chargefsd"]),
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
        .target(
            name: "ChargeFS",
            dependencies: [
                "CFuse",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(
            name: "chargefsd",
            dependencies: ["ChargeFS", "CFuse"]
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
        .testTarget(
            name: "ChargeFSTests",
            dependencies: [
                "ChargeFS",
                "CFuse",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
