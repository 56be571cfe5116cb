// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "chargefs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "chargefsd", targets: ["chargefsd"]),
        .library(name: "ChargeFS", targets: ["ChargeFS"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
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
