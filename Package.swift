// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "chargefs",
    products: [
        .executable(name: "chargefsd", targets: ["chargefsd"]),
        // Installed next to chargefsd: the daemon starts it from there (memcg= mounts).
        .executable(name: "chargefs-charge-helper", targets: ["chargefs-charge-helper"]),
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
        // Folders by layer, each with a README saying what lives there and what it may call:
        // Bridge -> FileSystem -> Inodes/Pages -> Charging -> Cgroup -> Support (Daemon on top).
        .target(
            name: "ChargeFS",
            dependencies: [
                "CFuse",
                "CChargeHelper",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            exclude: ["Bridge", "FileSystem", "Inodes", "Pages", "Charging", "Cgroup", "Daemon", "Support"]
                .map { "\($0)/README.md" }
        ),
        .executableTarget(
            name: "chargefsd",
            dependencies: ["ChargeFS", "CFuse"]
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
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // Black box through a real mount of the built chargefsd (root, /dev/fuse).
        .testTarget(name: "ChargeFSMountTests", dependencies: ["TestSupport"]),
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
