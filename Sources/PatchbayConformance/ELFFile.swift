import Foundation

/// The dynamic symbol table and the needed libraries of an ELF64 little-endian shared
/// library, read from the file's bytes: no dlopen, no external tool.
struct ELFFile {
    struct Symbol {
        var name: String
        var type: String
        var binding: String
    }

    enum Failure: Error, CustomStringConvertible {
        case notELF, unsupported(String), malformed(String)
        var description: String {
            switch self {
            case .notELF: "not an ELF file"
            case .unsupported(let why): "unsupported ELF file (\(why))"
            case .malformed(let why): "malformed ELF file (\(why))"
            }
        }
    }

    /// Defined symbols that another object can bind to: global, weak or unique binding with
    /// default or protected visibility.
    let exported: [Symbol]
    /// DT_NEEDED entries, e.g. "libasan.so.8".
    let needed: [String]

    /// Symbols every linker defines in every shared library; they are not the plugin's.
    static let linkerSymbols: Set<String> = ["_init", "_fini", "__bss_start", "_edata", "_end", "__bss_start__",
                                             "__bss_end__", "_bss_end__", "__end__"]

    init(path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else { throw Failure.malformed("cannot read \(path)") }
        try self.init(bytes: [UInt8](data))
    }

    init(bytes: [UInt8]) throws {
        guard bytes.count >= 64, bytes[0] == 0x7f, bytes[1] == 0x45, bytes[2] == 0x4c, bytes[3] == 0x46 else { throw Failure.notELF }
        guard bytes[4] == 2 else { throw Failure.unsupported("32-bit") }
        guard bytes[5] == 1 else { throw Failure.unsupported("big-endian") }
        func int<T: FixedWidthInteger>(_ offset: Int, _: T.Type) throws -> T {
            guard offset >= 0, offset + MemoryLayout<T>.size <= bytes.count else { throw Failure.malformed("offset \(offset) past the end") }
            var value: T = 0
            for index in 0..<MemoryLayout<T>.size { value |= T(truncatingIfNeeded: bytes[offset + index]) << (8 * index) }
            return value
        }
        func string(_ table: (offset: Int, size: Int), _ index: Int) throws -> String {
            guard index >= 0, index < table.size else { throw Failure.malformed("string index \(index) past its table") }
            var end = table.offset + index
            while end < table.offset + table.size, end < bytes.count, bytes[end] != 0 { end += 1 }
            return String(decoding: bytes[(table.offset + index)..<end], as: UTF8.self)
        }
        let sectionsAt = Int(try int(40, UInt64.self))
        let sectionSize = Int(try int(58, UInt16.self))
        let sectionCount = Int(try int(60, UInt16.self))
        guard sectionsAt > 0, sectionCount > 0, sectionSize >= 64 else { throw Failure.unsupported("no section headers") }
        struct Section { var type: UInt32; var offset: Int; var size: Int; var link: Int; var entrySize: Int }
        var sections: [Section] = []
        for index in 0..<sectionCount {
            let at = sectionsAt + index * sectionSize
            sections.append(Section(type: try int(at + 4, UInt32.self), offset: Int(try int(at + 24, UInt64.self)),
                                    size: Int(try int(at + 32, UInt64.self)), link: Int(try int(at + 40, UInt32.self)),
                                    entrySize: Int(try int(at + 56, UInt64.self))))
        }
        func linkedStrings(_ section: Section) throws -> (offset: Int, size: Int) {
            guard section.link < sections.count else { throw Failure.malformed("a section links to no string table") }
            let strings = sections[section.link]
            guard strings.offset + strings.size <= bytes.count else { throw Failure.malformed("string table past the end") }
            return (strings.offset, strings.size)
        }
        var exported: [Symbol] = []
        for section in sections where section.type == 11 /* SHT_DYNSYM */ {
            let strings = try linkedStrings(section)
            let entry = max(24, section.entrySize)
            for index in 1..<max(1, section.size / entry) {  // entry 0 is the null symbol
                let at = section.offset + index * entry
                let info = try int(at + 4, UInt8.self), other = try int(at + 5, UInt8.self)
                let sectionIndex = try int(at + 6, UInt16.self)
                let binding = info >> 4, visibility = other & 3
                guard sectionIndex != 0 /* SHN_UNDEF */, [1, 2, 10].contains(binding), visibility == 0 || visibility == 3 else { continue }
                let types = [0: "notype", 1: "object", 2: "function", 3: "section", 4: "file", 5: "common", 6: "tls", 10: "ifunc"]
                exported.append(Symbol(name: try string(strings, Int(try int(at, UInt32.self))), type: types[Int(info & 0xf)] ?? "other",
                                       binding: binding == 2 ? "weak" : binding == 10 ? "unique" : "global"))
            }
        }
        var needed: [String] = []
        for section in sections where section.type == 6 /* SHT_DYNAMIC */ {
            let strings = try linkedStrings(section)
            var at = section.offset
            while at + 16 <= section.offset + section.size {
                let tag = try int(at, Int64.self)
                if tag == 0 { break }
                if tag == 1 /* DT_NEEDED */ { needed.append(try string(strings, Int(try int(at + 8, UInt64.self)))) }
                at += 16
            }
        }
        self.exported = exported
        self.needed = needed
    }

    /// The sanitizer runtime the library was linked against (its DT_NEEDED name), if any.
    var sanitizerRuntime: String? {
        needed.first { name in ["libasan", "libtsan", "libubsan", "libclang_rt.asan", "libclang_rt.tsan", "libclang_rt.ubsan"]
            .contains { name.hasPrefix($0) } }
    }
}
