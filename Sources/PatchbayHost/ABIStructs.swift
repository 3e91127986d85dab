import CPatchbayABI

/// The versioning rule of patchbay.h, on the host's side: a struct the other side wrote is
/// read only within the `struct_size` its writer declared, and every field past that
/// reads as zero. Each read below copies the declared prefix into a zeroed struct of the
/// host's own version, so the rest of the host can use plain field access safely.
enum ABIStructs {
    /// The bytes of a table or struct up to and including `field`: what a writer of the
    /// version that ended with `field` declares (patchbay.h's `PB_SIZE_THROUGH`).
    static func size<T, F>(through field: KeyPath<T, F>) -> Int {
        MemoryLayout<T>.offset(of: field)! + MemoryLayout<F>.size
    }

    /// `PB_PLUGIN_API_SIZE_1_0`: the smallest table a 1.x plugin may have.
    static let pluginTableSize1_0 = size(through: \pb_plugin_api.embed)

    /// Copies the struct at `pointer`, whose first field is its writer's `struct_size`.
    static func read<T>(_ type: T.Type, at pointer: UnsafeRawPointer) -> T {
        let declared = Int(pointer.load(as: UInt32.self))
        return withUnsafeTemporaryAllocation(byteCount: MemoryLayout<T>.size, alignment: MemoryLayout<T>.alignment) { storage in
            let base = storage.baseAddress!
            base.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
            base.copyMemory(from: pointer, byteCount: min(declared, MemoryLayout<T>.size))
            return base.load(as: T.self)
        }
    }
}
