// swift-tools-version:6.0
import PackageDescription

let pluginCSettings: [CSetting] = [.unsafeFlags(["-fvisibility=hidden"])]

let package = Package(
    name: "patchbay",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "patchbay", targets: ["patchbay"]),
        // The reference backend plugin: the scripted test engine (plugin name "reference", `.ref`
        // models) that the tests, benchmarks and `patchbay plugin check` drive. Authors start from
        // Examples/CPlugin, Examples/RustPlugin or Examples/SwiftPlugin instead.
        .library(name: "PatchbayReferencePlugin", type: .dynamic, targets: ["PatchbayReferencePlugin"]),
        // The backends that ship with Patchbay.
        .library(name: "PatchbayLlamaServerPlugin", type: .dynamic, targets: ["PatchbayLlamaServerPlugin"]),
    ],
    dependencies: [
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
        .package(url: "https://github.com/vapor/multipart-kit.git", from: "4.7.1"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // The plugin ABI: one C header, no state.
        .target(name: "CPatchbayABI", path: "Sources/CPatchbayABI"),
        // Schemas, validation, dialect translation and SSE encoding. Foundation only.
        .target(name: "PatchbayCore", path: "Sources/PatchbayCore"),
        // dlopen + ABI negotiation, model registry, cancel registry.
        .target(
            name: "PatchbayHost",
            dependencies: [
                "CPatchbayABI", "PatchbayCore",
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/PatchbayHost"
        ),
        // HTTP routes (Hummingbird 2).
        .target(
            name: "PatchbayServer",
            dependencies: [
                "PatchbayCore", "PatchbayHost",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "MultipartKit", package: "multipart-kit"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            path: "Sources/PatchbayServer",
            // The web chat page (WebRoutes.swift): plain HTML, CSS and JavaScript, served as is.
            resources: [.copy("Web")]
        ),
        // `patchbay plugin check`: runs a plugin library through the whole ABI contract, as its own host.
        .target(name: "PatchbayConformance", dependencies: ["CPatchbayABI"], path: "Sources/PatchbayConformance"),
        .executableTarget(
            name: "patchbay",
            dependencies: [
                "PatchbayServer", "PatchbayCore", "PatchbayConformance",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            path: "Sources/patchbay",
            // main.swift holds the @main command; with a second file in the target SwiftPM no
            // longer parses it as a library by itself.
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]
        ),
        // Plugins: plain C against the ABI header, each built into its own shared library
        // that exports nothing but `pb_plugin_entry`.
        .target(
            name: "PatchbayPluginSupport", dependencies: ["CPatchbayABI"], path: "Plugins/PluginSupport",
            cSettings: pluginCSettings),
        .target(
            name: "PatchbayReferencePlugin", dependencies: ["CPatchbayABI", "PatchbayPluginSupport"],
            path: "Tests/ScriptedPlugin", publicHeadersPath: ".", cSettings: pluginCSettings),
        .target(
            name: "PatchbayLlamaServerPlugin", dependencies: ["CPatchbayABI", "PatchbayPluginSupport"],
            path: "Plugins/LlamaServer", publicHeadersPath: ".", cSettings: pluginCSettings,
            linkerSettings: [.linkedLibrary("curl")]),
        .testTarget(name: "PatchbayCoreTests", dependencies: ["PatchbayCore"], path: "Tests/PatchbayCoreTests"),
        .testTarget(name: "PatchbayHostTests", dependencies: ["PatchbayHost", "CPatchbayABI"], path: "Tests/PatchbayHostTests"),
        .testTarget(name: "PatchbayServerTests", dependencies: ["PatchbayServer"], path: "Tests/PatchbayServerTests"),
    ]
)
