/// Validates the text of one event on its own: patchbay.h says a plugin must not split a
/// UTF-8 sequence across events, so every event's bytes must be whole characters.
struct UTF8Check {
    enum Problem: Equatable {
        /// A byte that cannot be where it is.
        case invalid(at: Int)
        /// The text ends inside a character: `have` of its `length` bytes.
        case endsInside(have: Int, length: Int)
        /// The text starts with continuation bytes: the rest of a character split off before.
        case startsInside(count: Int)
    }

    var problem: Problem?
    /// Characters of more than one byte.
    var multiByteCharacters = 0

    init(_ bytes: UnsafeRawBufferPointer) {
        var index = 0
        var leading = 0
        while index < bytes.count, bytes[index] & 0xC0 == 0x80, leading < 3 {
            index += 1
            leading += 1
        }
        if leading > 0 {
            problem = .startsInside(count: leading)
            return
        }
        while index < bytes.count {
            let lead = bytes[index]
            let length: Int
            var lower: UInt8 = 0x80, upper: UInt8 = 0xBF  // the allowed range of the second byte
            switch lead {
            case 0x00...0x7F: length = 1
            case 0xC2...0xDF: length = 2
            case 0xE0: length = 3; lower = 0xA0
            case 0xE1...0xEC, 0xEE...0xEF: length = 3
            case 0xED: length = 3; upper = 0x9F  // no surrogates
            case 0xF0: length = 4; lower = 0x90
            case 0xF1...0xF3: length = 4
            case 0xF4: length = 4; upper = 0x8F
            default:
                problem = .invalid(at: index)
                return
            }
            for offset in 1..<max(1, length) {
                guard index + offset < bytes.count else {
                    problem = .endsInside(have: offset, length: length)
                    return
                }
                let byte = bytes[index + offset]
                let (low, high) = offset == 1 ? (lower, upper) : (0x80, 0xBF)
                guard byte >= low && byte <= high else {
                    problem = .invalid(at: index + offset)
                    return
                }
            }
            if length > 1 { multiByteCharacters += 1 }
            index += length
        }
    }

    init(_ bytes: [UInt8]) {
        self = bytes.withUnsafeBytes { UTF8Check($0) }
    }

    var description: String? {
        switch problem {
        case nil: nil
        case .invalid(let at): "invalid UTF-8 at byte \(at)"
        case .endsInside(let have, let length): "ends inside a character (\(have) of its \(length) bytes): a character split across events"
        case .startsInside(let count): "starts with \(count) continuation byte\(count == 1 ? "" : "s"): the rest of a character split across events"
        }
    }
}
