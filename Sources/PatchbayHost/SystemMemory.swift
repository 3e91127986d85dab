import Foundation

/// How the host asks glibc's allocator to give memory back. Models come and go in one long
/// process; without this, what an unloaded engine freed stays in malloc's arenas.
/// Both functions live in `malloc.h`, which Swift's Glibc module leaves out, so they are found
/// at run time; under another C library they are absent and these calls do nothing.
public enum SystemMemory {
    /// Caps malloc at two arenas (unless the operator set `MALLOC_ARENA_MAX`). glibc's default,
    /// eight per core, spreads each engine's and each request thread's leftovers over arenas
    /// of their own; with two, the host's memory after an unload is within a few MiB of
    /// before the load. (host_bench's streaming throughput was the same either way.)
    public static func limitArenas() {
        guard ProcessInfo.processInfo.environment["MALLOC_ARENA_MAX"] == nil,
              let mallopt = function("mallopt", as: (@convention(c) (Int32, Int32) -> Int32).self) else { return }
        let arenaMax: Int32 = -8  // M_ARENA_MAX
        _ = mallopt(arenaMax, 2)
    }

    /// Returns the free memory of every arena to the system (after an unload).
    public static func giveBackFreed() {
        _ = function("malloc_trim", as: (@convention(c) (Int) -> Int32).self)?(0)
    }

    private static func function<F>(_ name: String, as type: F.Type) -> F? {
        guard let symbol = dlsym(dlopen(nil, RTLD_NOW), name) else { return nil }
        return unsafeBitCast(symbol, to: type)
    }
}
